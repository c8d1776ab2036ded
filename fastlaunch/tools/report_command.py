"""`fastlaunch report RUN_DIR`: print a run's report again, built anew from its records."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Sequence

from ..errors import UsageError
from ..launcher.parsing import parse_flags, wants_help

__all__ = ["report_main", "REPORT_HELP"]

REPORT_HELP = """\
usage: fastlaunch report RUN_DIR

Prints a run's report again: the last epoch of each rank, then the diagnoses. It is built anew from
the per-rank records in RUN_DIR/metrics (report.json and report.png are written again); a run launched
with --no-instrument has none.
"""


def report_main(argv: Sequence[str]) -> int:
    """`fastlaunch report`: exit 0, or 2 with a HINT for bad input."""
    args = list(argv)
    if wants_help(args):
        print(REPORT_HELP, end="")
        return 0
    try:
        _, run_dirs = parse_flags((), args, "fastlaunch report")
        if len(run_dirs) != 1:
            raise UsageError("fastlaunch report takes one run directory", " ".join(run_dirs) or "nothing",
                             "fastlaunch report runs/<stamp>-<stem>")
        run_dir = Path(run_dirs[0])
        if not (run_dir / "metrics").is_dir():
            raise UsageError("no metrics in that run directory", run_dir,
                             "pass a run directory of a fit run without --no-instrument")
    except UsageError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    from ..launcher.report import build_report, render_text

    report_file = run_dir / "report.json"
    world = json.loads(report_file.read_text())["world_size"] if report_file.exists() else 0
    print(render_text(build_report(run_dir, world)))
    return 0
