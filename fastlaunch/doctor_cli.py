"""`fastlaunch doctor [--json] [SCRIPT args...]`: print the findings; exit 1 only when one breaks a launch."""
from __future__ import annotations

import json
from typing import Sequence

from .doctor import Finding, exit_status, run_checks

__all__ = ["doctor_main", "render"]

_MARK = {"ok": "ok   ", "info": "info ", "warn": "WARN ", "error": "ERROR"}


def render(findings: list[Finding]) -> str:
    """One line per finding, its fix indented below."""
    lines = []
    for f in findings:
        lines.append(f"{_MARK[f.level]} {f.topic}: {f.message}")
        if f.fix:
            lines.append(f"        fix: {f.fix}")
    return "\n".join(lines) + "\n"


def doctor_main(argv: Sequence[str]) -> int:
    args = list(argv)
    if args and args[0] in ("-h", "--help"):
        print("usage: fastlaunch doctor [--json] [SCRIPT [script arguments...]]\n\n"
              "Checks this machine for distributed fastai; with a script, also runs it in one process\n"
              "until its first training batch (code before the fit, downloads included, still runs).")
        return 0
    as_json = "--json" in args[:1]
    if as_json:
        args = args[1:]
    findings = run_checks()
    if args:
        from .device import usable_cores
        from .dryrun import dry_run

        findings += dry_run(args[0], args[1:], usable_cores())
    if as_json:
        print(json.dumps({"findings": [f.as_dict() for f in findings], "exit_status": exit_status(findings)},
                         indent=2))
    else:
        print(render(findings), end="")
    return exit_status(findings)
