"""`fastlaunch doctor [--json] [SCRIPT args...]`: print the findings; exit 1 only when one breaks a launch."""
from __future__ import annotations

import json
import sys
from typing import Sequence

from .doctor import Finding, exit_status, run_checks
from ..env import launcher_environ
from ..errors import UsageError
from ..option_table import Option
from ..launcher.parsing import option_rows, parse_flags, split_argv, switch_flags, value_flags, wants_help

__all__ = ["doctor_main", "render", "DOCTOR_HELP", "DOCTOR_OPTIONS"]

DOCTOR_OPTIONS = (Option("json", False, "print the findings as JSON"),)
DOCTOR_HELP = f"""\
usage: fastlaunch doctor [--json] [SCRIPT [script arguments...]]

Checks this machine for distributed fastai; with a script, also runs it in one process
until its first training batch (code before the fit, downloads included, still runs).

{option_rows(DOCTOR_OPTIONS, 10)}"""

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
    """`fastlaunch doctor`: exit 1 when a finding breaks a launch, 2 for bad input, else 0."""
    try:
        tokens, script, script_args = split_argv(list(argv), value_flags(DOCTOR_OPTIONS),
                                                 switch_flags(DOCTOR_OPTIONS), what="doctor flag",
                                                 help_command="fastlaunch doctor")
        if wants_help(tokens):
            print(DOCTOR_HELP, end="")
            return 0
        given, _ = parse_flags(DOCTOR_OPTIONS, tokens, "fastlaunch doctor")
    except UsageError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    as_json = given.get("json", False)
    findings = run_checks(launcher_environ())
    if script is not None:
        from ..device import usable_cores
        from .dryrun import dry_run

        findings += dry_run(script, script_args, usable_cores())
    if as_json:
        print(json.dumps({"findings": [f.as_dict() for f in findings], "exit_status": exit_status(findings)},
                         indent=2))
    else:
        print(render(findings), end="")
    return exit_status(findings)
