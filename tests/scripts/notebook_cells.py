"""Runs fastai's own notebooks' test cells, cell by cell: `python notebook_cells.py NB.ipynb[,NB2.ipynb...]`.

The preparation is mechanical, the same in one process and under fastlaunch (tests/fastai_nbs/README.md):
  - the library is fastai as installed: a notebook's `#|export` cells (the library's own source) are not run;
    instead every name of its `#|default_exp` module (private ones included) is put in the namespace first;
  - cells nbdev's test runner skips are skipped (`#|eval: false`, `#|skip`), and shell and magic lines
    (`!...`, `%...`) are dropped; `nbdev.showdoc` is a stand-in whose `show_doc` shows nothing;
  - every other code cell runs in order in one namespace per notebook; a failing cell is recorded and the
    notebook goes on (as `nbdev_test` would report it).
Under several ranks the ranks compare each cell's outcome (ok or the error's type); where they differ, the
ranks are no longer running the same code (a collective would wait forever), so the notebook stops there,
on every rank, with that cell recorded as "ranks differ".
$FL_STOP_BEFORE (`notebook:cell,...`) stops a notebook before a cell known to part its ranks inside the cell
(where no comparison after it could stop them before they wait on each other forever).
Each process writes $FL_OUT/<notebook>-rank<R>.json after every cell: per cell, its index, first line, and
"ok" or the error.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
import traceback
import types
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

OUT = Path(os.environ.get("FL_OUT", "."))
RANK = int(os.environ.get("RANK", 0))
SKIP_MARKS = ("#|eval: false", "#| eval: false", "#|skip", "#| skip", "#skip")
EXPORT_MARKS = ("#|export", "#| export", "#|exporti", "#| exporti", "#export")


def _showdoc_stand_in() -> None:
    nbdev = types.ModuleType("nbdev")
    showdoc = types.ModuleType("nbdev.showdoc")
    showdoc.show_doc = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    showdoc.__all__ = ["show_doc"]  # type: ignore[attr-defined]
    nbdev.showdoc = showdoc  # type: ignore[attr-defined]
    nbdev.nbdev_export = lambda *args, **kwargs: None  # type: ignore[attr-defined]
    sys.modules.setdefault("nbdev", nbdev)
    sys.modules.setdefault("nbdev.showdoc", showdoc)


def cells(path: Path) -> tuple[str | None, list[tuple[int, str]]]:
    """The notebook's default_exp module and its code cells to run: (index, source)."""
    nb = json.loads(path.read_text())
    module, out = None, []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        lines = source.splitlines()
        for line in lines:
            if line.strip().startswith(("#|default_exp", "#| default_exp")):
                module = line.split()[-1]
        if any(line.strip().startswith(EXPORT_MARKS) for line in lines[:3]):
            continue
        if any(line.strip().startswith(SKIP_MARKS) for line in lines[:3]):
            continue
        kept = [line for line in lines if not line.lstrip().startswith(("!", "%"))]
        if any(line.strip() and not line.strip().startswith("#") for line in kept):
            out.append((i, "\n".join(kept)))
    return module, out


def _agreed(outcome: str) -> bool:
    """Whether every rank had this cell's outcome (one process: always)."""
    if int(os.environ.get("WORLD_SIZE", 1)) <= 1:
        return True
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group()
    kinds: list = [None] * dist.get_world_size()
    dist.all_gather_object(kinds, outcome.split(":")[0])
    return len(set(kinds)) == 1


def run(path: Path) -> list[dict]:
    module, todo = cells(path)
    ns: dict = {"__name__": "__main__"}
    if module is not None:
        mod = importlib.import_module(f"fastai.{module}")
        ns.update({k: v for k, v in vars(mod).items() if not k.startswith("__")})
    results = []
    stop = {int(item.split(":")[1]) for item in os.environ.get("FL_STOP_BEFORE", "").split(",")
            if item.split(":")[0] == path.stem}
    for index, source in todo:
        if index in stop:
            break
        first = next((line for line in source.splitlines() if line.strip() and not line.startswith("#|")), "")
        try:
            exec(compile(source, f"<{path.stem} cell {index}>", "exec"), ns)
            outcome = "ok"
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001  (a failing cell is an outcome)
            last = traceback.extract_tb(exc.__traceback__)[-1]
            outcome = f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]} ({Path(last.filename).name}:{last.lineno})"
        same = _agreed(outcome)
        results.append({"cell": index, "first": first.strip()[:80], "outcome": outcome if same else
                        f"ranks differ: this rank: {outcome}"})
        (OUT / f"{path.stem}-rank{RANK}.json").write_text(json.dumps(results))
        if not same:
            break
    return results


if __name__ == "__main__":
    _showdoc_stand_in()
    for name in sys.argv[1].split(","):
        nb = Path(name)
        run(nb)
        print(f"NOTEBOOK {nb.stem}: done", flush=True)
