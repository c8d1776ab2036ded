# One venv for everything; `make demo` and `make test` create and fill it when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: install demo lint test bench clean

$(STAMP): pyproject.toml
	@echo "fastlaunch: installing torch, fastai, the notebook extra and the test tools into $(VENV) (a few minutes the first time)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --progress-bar off --disable-pip-version-check -e '.[test,notebook]'
	touch $(STAMP)

install: $(STAMP)

# The main job on its embedded default: the minimal template on generated data.
# Every visible GPU, or 2 CPU ranks (with a line saying why) where there is none.
demo: $(STAMP)
	cd templates/minimal && ../../$(BIN)/fastlaunch train.py --epochs 3

# Lint and types first (seconds), then the tests.
lint: $(STAMP)
	$(BIN)/ruff check fastlaunch benchmarks tests
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

# fastlaunch against torchrun and a plain PyTorch DDP loop, interleaved; writes benchmarks/RESULTS.md.
# Then notebook sessions against scripts: benchmarks/RESULTS-notebook.md.
bench: $(STAMP)
	$(BIN)/python -m benchmarks --runs 5
	$(BIN)/python -m benchmarks.session --rounds 3

clean:
	rm -rf $(VENV) runs templates/minimal/runs
