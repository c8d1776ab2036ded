"""Notebooks, the part both sides share. A notebook file as a job: its code cells, with a clear error for a
file that is not a notebook (the launcher checks it before any rank starts; rank/notebook.py runs it). An
interactive session: where each rank's kernel says it is ready, and the helpers every rank keeps."""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import UsageError

__all__ = ["is_notebook", "code_cells", "session_lines_removed", "executed_path", "ready_path", "FACTS_EXPRESSION",
           "RANK_HELPERS"]

# An interactive session's contract between a rank's kernel (rank/kernel.py) and the notebook's (session/):
RANK_HELPERS = "__fastlaunch__"  # a hidden name in every rank's namespace: {"facts": ..., "free": ...}
FACTS_EXPRESSION = f"{RANK_HELPERS}['facts']()"  # evaluated on every rank after each cell

# The magics that start an interactive session: a notebook run as a job is already one.
_SESSION_LINE = re.compile(r"^\s*%(load_ext\s+fastlaunch\b|fastlaunch\b).*$", re.M)


def is_notebook(script: str | Path) -> bool:
    return str(script).endswith(".ipynb")


def code_cells(path: Path) -> list[str]:
    """The source of each code cell, in order; a UsageError for a file that is not a notebook with code."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise UsageError("the notebook could not be read", f"{path}: {err}", "check the path") from None
    except json.JSONDecodeError as err:
        raise UsageError("the notebook is not valid JSON", f"{path}: line {err.lineno}: {err.msg}",
                         "open it in Jupyter and save it again, or restore it from version control") from None
    cells = data.get("cells") if isinstance(data, dict) else None
    if not isinstance(cells, list):
        raise UsageError("the file is not a Jupyter notebook (no cells)", str(path),
                         "give a .ipynb saved by Jupyter (nbformat 4)")
    sources = []
    for cell in cells:
        if isinstance(cell, dict) and cell.get("cell_type") == "code":
            source = cell.get("source", "")
            sources.append("".join(source) if isinstance(source, list) else str(source))
    if not any(s.strip() for s in sources):
        raise UsageError("the notebook has no code cells", str(path), "add the training code in code cells")
    return sources


def ready_path(folder: Path, rank: int) -> Path:
    """Where rank R's kernel says it listens, once it takes cells: {"pid", "connection_file"}."""
    return Path(folder) / f"rank{rank}.ready.json"


def session_lines_removed(source: str) -> str:
    """A cell without `%load_ext fastlaunch` and `%fastlaunch ...` lines (the job is the session)."""
    return _SESSION_LINE.sub("", source)


def executed_path(run_dir: Path, notebook: Path) -> Path:
    """Where rank 0 writes the notebook with its outputs: RUN_DIR/<name>.executed.ipynb."""
    return Path(run_dir) / f"{Path(notebook).stem}.executed.ipynb"
