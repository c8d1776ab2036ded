"""fastai's own tests as the oracle: the test cells of fastai's notebooks (tests/fastai_nbs/, unchanged, with
fastai's licence; tests/fastai_nbs/README.md says how they were taken) run cell by cell in one plain process
and under `fastlaunch --cpu 2` (tests/scripts/notebook_cells.py). Every cell that passes in one process must
pass on both ranks, or be listed below with the reason it cannot: a count of what one rank sees (steps,
batches) is inherent to data parallelism; a wrong metric would not be. A notebook stops under 2 ranks where
its ranks stop running the same code (a cell failing on one rank only); the cell and its reason are listed.
The README's table is rendered from this list and the one-process run (FL_WRITE_README=1 rewrites it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, run_fastlaunch

NBS = Path(__file__).resolve().parent / "fastai_nbs"
RUNNER = Path(__file__).resolve().parent / "scripts" / "notebook_cells.py"
NOTEBOOKS = sorted(p.stem for p in NBS.glob("*.ipynb"))

STEPS = "per-rank count: each rank takes half the optimizer steps of an epoch (2 ranks), so a figure computed " \
        "from the number of steps differs"
TMPDIR = "`tempfile.TemporaryDirectory()` is a different folder on each rank: rank 0 saves into its own, " \
         "the other rank finds nothing to load"
# (notebook, cell) -> why it cannot pass under 2 ranks
DIFFERS = {
    ("13a_learner", 43): STEPS + " (weight decay applied over 2 steps, not 5)",
    ("14_callback.schedule", 40): STEPS + " (the learning rates of each step)",
    ("14_callback.schedule", 49): STEPS + " (the learning rates of each step)",
    ("14_callback.schedule", 59): STEPS + " (the learning rates of each step)",
    ("17_callback.tracker", 8): "TerminateOnNaNCallback raises in `after_batch` before the Recorder: the other ranks "
                                "learn of it with the next step's gradients, so the Recorder logs the batch (an inf "
                                "loss) that one process does not",
}
# notebook -> (cell, why): where its 2 ranks stop running the same code, inside the cell (one rank waits for
# the other forever); under 2 ranks the notebook is run up to that cell
STOPS = {
    "13a_learner": (100, TMPDIR),
    "14_callback.schedule": (65, TMPDIR),
    "17_callback.tracker": (28, "every rank deletes `tmp/` at once (`shutil.rmtree`): the second finds it gone"),
}


def _clean_env(out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    return {**env, "FL_OUT": str(out), "MPLBACKEND": "Agg"}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    paths = ",".join(str(NBS / f"{nb}.ipynb") for nb in NOTEBOOKS)
    proc = subprocess.run([sys.executable, str(RUNNER), paths], cwd=one, capture_output=True, text=True,
                          timeout=900, env=_clean_env(one))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one launch for every notebook (a notebook that stopped the job leaves the later ones unreached: a failure)
    stops = ",".join(f"{book}:{cell}" for book, (cell, _) in STOPS.items())  # not run: they part the ranks
    run_fastlaunch(["--cpu", "2", "--hang-timeout", "60", "--no-instrument", RUNNER, paths], two,
                   env={"FL_OUT": str(two), "MPLBACKEND": "Agg", "FL_STOP_BEFORE": stops}, timeout=900)

    def read(path: Path) -> dict[int, str]:
        return {c["cell"]: c["outcome"] for c in json.loads(path.read_text())} if path.exists() else {}

    return {nb: (read(one / f"{nb}-rank0.json"), read(two / f"{nb}-rank0.json"), read(two / f"{nb}-rank1.json"))
            for nb in NOTEBOOKS}


def unexplained(nb: str, single: dict, r0: dict, r1: dict) -> list[str]:
    """Cells passing in one process that do not pass on both ranks, and no reason is listed for."""
    found, stopped = [], False
    for cell, outcome in single.items():
        if outcome != "ok":
            continue  # fails in one process too (a notebook of another fastai release, a download)
        if stopped:
            continue
        both = r0.get(cell) == r1.get(cell) == "ok"
        if both:
            continue
        reached = cell in r0 and cell in r1 and not r0[cell].startswith("ranks differ")
        if (nb, cell) in DIFFERS:
            stopped = not reached  # a listed difference that also parted the ranks: the rest is not run
            continue
        if STOPS.get(nb, (None,))[0] == cell and not reached:
            stopped = True
            continue
        found.append(f"{nb} cell {cell}: {r0.get(cell, 'not reached')} / {r1.get(cell, 'not reached')}")
    return found


@pytest.mark.parametrize("nb", NOTEBOOKS)
def test_every_cell_passing_in_one_process_passes_on_two_ranks_or_its_reason_is_listed(outcomes, nb):
    single, r0, r1 = outcomes[nb]
    assert sum(o == "ok" for o in single.values()) >= 3, single  # the notebook really ran in one process
    assert not unexplained(nb, single, r0, r1)
    for (book, cell), _ in DIFFERS.items():  # a listed difference that passes now must leave the list
        if book == nb and cell in r0:
            assert not (r0[cell] == r1[cell] == "ok"), f"{nb} cell {cell} passes on 2 ranks now: take it off DIFFERS"


def render(outcomes) -> str:
    rows = ["| fastai notebook | test cells passing in one process | cells that cannot pass on 2 ranks, and why |",
            "| --- | --- | --- |"]
    for nb in NOTEBOOKS:
        single = outcomes[nb][0]
        notes = [f"cell {cell}: {why}" for (book, cell), why in sorted(DIFFERS.items()) if book == nb]
        if nb in STOPS:
            cell, why = STOPS[nb]
            notes.append(f"from cell {cell} on, not run: {why}")
        rows.append(f"| `{nb}` | {sum(o == 'ok' for o in single.values())} of {len(single)} | "
                    f"{'; '.join(notes) or 'none: every one passes'} |")
    return "\n".join(rows) + "\n"


def test_readme_table_is_this_list(outcomes):
    table = render(outcomes)
    readme = REPO / "README.md"
    text = readme.read_text()
    start, end = "<!-- fastai-notebooks:start -->\n", "<!-- fastai-notebooks:end -->"
    if os.environ.get("FL_WRITE_README"):
        head, rest = text.split(start)
        readme.write_text(head + start + table + end + rest.split(end, 1)[1])
    assert start + table + end in readme.read_text(), "README's fastai notebook table is stale: FL_WRITE_README=1\n" + table
