"""`fastlaunch new DIR --template NAME`: a ready project from a template, never overwriting a file."""
from __future__ import annotations

import ast
import json
import sys
from pathlib import Path
from string import Template
from typing import Sequence

from ..errors import UsageError
from ..option_table import Option
from ..launcher.parsing import option_rows, parse_flags, wants_help
from ..resources import data_path
from ..lines import launcher_line

__all__ = ["TEMPLATES", "template_files", "notebook_of", "create_project", "new_main"]

TEMPLATES = ("minimal", "vision", "tabular", "text")
_COMMON = ("README.md", "launch.yaml", "test_smoke.py")

NEW_OPTIONS = (Option("template", "minimal", f"{' | '.join(TEMPLATES)} (default minimal)", "NAME", aliases=("-t",)),
               Option("force", False, "overwrite the template's own files (others stay)"))
NEW_HELP = f"""\
usage: fastlaunch new DIR [--template minimal|vision|tabular|text] [--force]

Creates DIR with train.py (an ordinary fastai script), notebook.ipynb (the same training for Jupyter),
README.md, launch.yaml and test_smoke.py.
Existing files are never overwritten; --force overwrites the template's own files only.

{option_rows(NEW_OPTIONS, 21)}"""


_MAIN_GUARD = 'if __name__ == "__main__":\n    main()\n'


def notebook_of(train: str, title: str) -> str:
    """notebook.ipynb: the same training as train.py, in Jupyter, on every rank of a session."""
    body = train.replace(_MAIN_GUARD, "").rstrip() + "\n"
    intro = (f"# {title}\n\nThe same training as `train.py`. The first cell starts the ranks: `%fastlaunch` uses "
             "every GPU of this machine (or 2 CPU processes where there is none; `%fastlaunch --gpus 2` or "
             "`--cpu 2` to choose); from then on every cell runs on every rank and rank 0's output shows here. "
             "`%%local` runs a cell in this kernel only; `%fastlaunch stop` ends the ranks.")
    cells = [("markdown", intro), ("code", "%load_ext fastlaunch\n%fastlaunch"), ("code", body),
             ("code", 'import sys\nsys.argv = ["train.py", "--epochs", "1"]  # the flags train.py takes\nmain()')]
    notebook = {"cells": [{"cell_type": kind, "metadata": {}, "source": text.splitlines(keepends=True),
                           **({"outputs": [], "execution_count": None} if kind == "code" else {})}
                          for kind, text in cells],
                "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
                             "language_info": {"name": "python"}},
                "nbformat": 4, "nbformat_minor": 5}
    return json.dumps(notebook, indent=1) + "\n"


def template_files(template: str, project: str) -> dict[str, str]:
    """The files of a template, rendered for a project: {relative name: text}."""
    if template not in TEMPLATES:
        raise UsageError("unknown template", template, f"use one of: {', '.join(TEMPLATES)}")
    train = data_path("templates", template, "train.py").read_text()
    title = (ast.get_docstring(ast.parse(train)) or "").splitlines()[0]
    assert _MAIN_GUARD in train, f"templates/{template}/train.py ends with the main guard"
    files = {"train.py": train, "notebook.ipynb": notebook_of(train, title)}
    for name in _COMMON:
        text = data_path("templates", "_common", name).read_text()
        files[name] = Template(text).safe_substitute(project=project, title=title, template=template)
    return files


def create_project(target: Path, template: str = "minimal", force: bool = False) -> list[Path]:
    """Write the template into target; refuse (listing them) when its files exist, unless force."""
    files = template_files(template, target.name)
    existing = sorted(name for name in files if (target / name).exists())
    if existing and not force:
        raise UsageError(f"{target} already holds files of the template", ", ".join(existing),
                         "choose another directory, or pass --force to overwrite these files (others stay)")
    target.mkdir(parents=True, exist_ok=True)
    written = []
    for name, text in files.items():
        (target / name).write_text(text)
        written.append(target / name)
    return written


def new_main(argv: Sequence[str]) -> int:
    """`fastlaunch new`: exit 0, or 2 with a HINT for bad input."""
    args = list(argv)
    if not args or wants_help(args):
        print(NEW_HELP, end="")
        return 0
    try:
        given, args = parse_flags(NEW_OPTIONS, args, "fastlaunch new", needs_value=lambda flag: UsageError(
            "--template needs a name", "nothing", f"use one of: {', '.join(TEMPLATES)}"))
        template, force = given.get("template", "minimal"), given.get("force", False)
        if len(args) != 1 or args[0].startswith("-"):
            raise UsageError("fastlaunch new takes one directory", " ".join(args) or "nothing",
                             "fastlaunch new my_project --template vision")
        written = create_project(Path(args[0]), template, force)
    except UsageError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    launcher_line(f"fastlaunch: created {args[0]} from the {template} template: "
                  + ", ".join(p.name for p in written))
    launcher_line(f"fastlaunch: next: cd {args[0]} && fastlaunch --cpu 2 train.py --epochs 1")
    return 0
