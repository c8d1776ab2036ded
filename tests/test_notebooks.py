"""Notebook files as jobs: `fastlaunch --cpu 2 train.ipynb` runs the code cells on every rank in order and
writes RUN_DIR/train.executed.ipynb with rank 0's outputs; a failing cell names the culprit; a file that is
not a notebook is one line with a HINT and nothing started."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import only_run_dir, run_fastlaunch

pytest.importorskip("IPython", reason="needs the notebook extra (pip install 'fastlaunch[notebook]'; make test has it)")
pytest.importorskip("nbformat", reason="needs the notebook extra (pip install 'fastlaunch[notebook]'; make test has it)")

SETUP = '''\
import json, os
import numpy as np, pandas as pd, torch
from fastai.tabular.all import *

rng = np.random.default_rng(0)
df = pd.DataFrame({"a": rng.normal(size=384), "b": rng.normal(size=384), "g": rng.integers(0, 3, 384)})
df["y"] = ((df.a + df.b * (df.g - 1)) > 0).astype(int)
'''
TRAIN = '''\
%matplotlib inline
dls = TabularDataLoaders.from_df(df, cat_names=["g"], cont_names=["a", "b"], y_names="y", y_block=CategoryBlock(),
                                 procs=[Categorify, Normalize], valid_idx=list(range(256, 384)), bs=32)
learn = tabular_learner(dls, layers=[16], metrics=accuracy)
learn.fit_one_cycle(2, 1e-2)
'''
PLOT = "learn.recorder.plot_loss()\nshown = display('step 0', display_id=True)\nshown.update('step 9')\n"
TABLE = "pd.DataFrame({'epoch': [0, 1], 'accuracy': [float(v[-1]) for v in learn.recorder.values]})\n"
SAVE = '''\
if int(os.environ.get("RANK", 0)) == 0:
    torch.save(learn.model.state_dict(), os.environ["FL_NB_OUT"] + "/weights.pt")
    json.dump([float(x) for x in learn.recorder.values[-1]], open(os.environ["FL_NB_OUT"] + "/values.json", "w"))
print("cells done")
'''


def _text(output: dict) -> str:
    text = output.get("text", "")
    return "".join(text) if isinstance(text, list) else text


def _notebook(path: Path, *sources: str, markdown: str = "# A fastai notebook") -> Path:
    cells = [{"cell_type": "markdown", "metadata": {}, "source": markdown}]
    cells += [{"cell_type": "code", "metadata": {}, "source": s, "outputs": [], "execution_count": None}
              for s in sources]
    path.write_text(json.dumps({"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return path


def test_a_notebook_runs_on_two_ranks_and_rank_zeros_outputs_are_written_once(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    nb = _notebook(tmp_path / "train.ipynb", "%load_ext fastlaunch\n%fastlaunch --cpu 2\n" + SETUP, TRAIN, PLOT,
                   TABLE, SAVE)
    proc = run_fastlaunch(["--cpu", "2", "--seed", "3", nb], tmp_path, env={"FL_NB_OUT": str(out)}, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("cells done") == 1  # rank 0's output on the console, once
    executed = json.loads((only_run_dir(tmp_path) / "train.executed.ipynb").read_text())
    code = [c for c in executed["cells"] if c["cell_type"] == "code"]
    assert [c["execution_count"] for c in code] == [1, 2, 3, 4, 5]
    texts = [_text(o) for c in code for o in c["outputs"] if o["output_type"] == "stream"]
    assert sum("accuracy" in t for t in texts) == 1  # fastai's results table, once
    assert any("image/png" in o.get("data", {}) for o in code[2]["outputs"])  # plot_loss's figure
    shown = ["".join(o["data"]["text/plain"]) for o in code[2]["outputs"] if "text/plain" in o.get("data", {})]
    assert "'step 9'" in shown and "'step 0'" not in shown  # an updated display keeps its final state
    assert all("id" in c for c in executed["cells"])  # nbformat 4.5 cells get their ids
    result = [o for o in code[3]["outputs"] if o["output_type"] == "execute_result"]
    assert len(result) == 1 and "text/html" in result[0]["data"] and result[0]["execution_count"] == 4
    assert "cells done" in "".join(_text(o) for o in code[4]["outputs"])
    # the reported metrics are what one process computes on the final weights
    values = json.loads((out / "values.json").read_text())
    check = tmp_path / "check.py"
    check.write_text(SETUP + TRAIN.replace("%matplotlib inline\n", "").replace("learn.fit_one_cycle(2, 1e-2)\n", "")
                     + f"learn.model.load_state_dict(torch.load({str(out / 'weights.pt')!r}))\n"
                     + "print(json.dumps([float(x) for x in learn.validate()]))\n")
    one = subprocess.run([sys.executable, str(check)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-2000:]
    valid_loss, acc = json.loads(one.stdout.strip().splitlines()[-1])
    assert values[1] == pytest.approx(valid_loss, abs=1e-4) and values[2] == pytest.approx(acc, abs=1e-4)


def test_a_failing_cell_names_the_rank_and_its_error_is_in_the_executed_notebook(tmp_path):
    nb = _notebook(tmp_path / "fails.ipynb", "x = 41\n", "x += 1\nraise ValueError(f'bad cell {x}')\n",
                   "print('never')\n")
    proc = run_fastlaunch(["--cpu", "2", nb], tmp_path, timeout=300)
    assert proc.returncode == 1
    assert "failed (exit code 1): ValueError: bad cell 42" in proc.stderr, proc.stderr[-3000:]
    executed = json.loads((only_run_dir(tmp_path) / "fails.executed.ipynb").read_text())
    code = [c for c in executed["cells"] if c["cell_type"] == "code"]
    errors = [o for o in code[1]["outputs"] if o["output_type"] == "error"]
    assert [(e["ename"], e["evalue"]) for e in errors] == [("ValueError", "bad cell 42")]
    assert code[2]["outputs"] == [] and code[2]["execution_count"] is None  # never ran


@pytest.mark.parametrize("content, what", [("{not json", "the notebook is not valid JSON"),
                                           (json.dumps({"cells": [{"cell_type": "markdown", "source": "hi"}]}),
                                            "the notebook has no code cells"),
                                           (json.dumps([1, 2]), "the file is not a Jupyter notebook")])
def test_a_file_that_is_not_a_notebook_with_code_is_one_line_and_nothing_starts(tmp_path, content, what):
    bad = tmp_path / "bad.ipynb"
    bad.write_text(content)
    proc = subprocess.run([sys.executable, "-m", "fastlaunch", "--cpu", "2", str(bad)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and what in lines[0] and "HINT" in lines[0], proc.stderr
    assert not (tmp_path / "runs").exists()
