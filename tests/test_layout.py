"""The split between the launcher and the rank: the launcher never imports fastai or the rank side, and the
rank side keeps its facts in the rank context (no module-level state written at run time)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "fastlaunch"
LAUNCHER = ["fastlaunch.launcher.cli", "fastlaunch.launcher.engine", "fastlaunch.launcher.options",
            "fastlaunch.launcher.resolve", "fastlaunch.launcher.rendezvous", "fastlaunch.launcher.logs",
            "fastlaunch.launcher.hangwatch", "fastlaunch.launcher.failwatch", "fastlaunch.launcher.outcome",
            "fastlaunch.launcher.rundir", "fastlaunch.launcher.report", "fastlaunch.config", "fastlaunch.env",
            "fastlaunch.tools.report_command", "fastlaunch.tools.cluster.slurm_command", "fastlaunch.tools.doctor_cli",
            "fastlaunch.tools.scaffold"]


def test_the_launcher_never_imports_fastai_or_the_rank_side():
    probe = (f"import sys, torch; item = torch.Tensor.item\n"
             f"for name in {LAUNCHER!r}: __import__(name)\n"
             f"from fastlaunch.launcher.cli import main\n"
             f"assert main(['--help']) == 0\n"
             f"bad = sorted(m for m in sys.modules if m.split('.')[0] == 'fastai' or m.startswith('fastlaunch.rank'))\n"
             f"assert not bad, bad\n"
             f"assert torch.Tensor.item is item, 'a torch patch was applied'\n")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


def _rank_side_sources():
    return sorted((PACKAGE / "rank").rglob("*.py")) + [PACKAGE / f for f in ("heartbeat.py", "checkpoint.py", "device.py")]


def test_the_rank_side_has_no_global_statement_no_private_learner_field_and_no_stray_collective():
    found = []
    collective = re.compile(r"\bdist\.(all_reduce|broadcast|all_gather|barrier|gather|reduce|"
                            r"broadcast_object_list|all_gather_object|gather_object)\(")
    for path in _rank_side_sources():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            where = f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
            if re.match(r"\s*global\s", line) or re.search(r"[.'\"]_fastlaunch_", line):
                found.append(where)
            if collective.search(line) and path.name != "comm.py":
                found.append(where)
            if "os.environ" in line and path.name not in ("worker.py", "failure.py"):  # the engine's error file
                found.append(where)
    assert not found, "\n".join(found)


def test_fastlaunch_lines_go_through_logging_unchanged_and_can_be_quieted(capsys):
    import logging

    from fastlaunch.lines import LAUNCHER, RANK, launcher_line, rank_line, rank_warning

    launcher_line("fastlaunch: a launcher line")
    rank_line("fastlaunch: a rank line")
    rank_warning("fastlaunch: a rank's problem")
    out, err = capsys.readouterr()
    assert out == "fastlaunch: a rank line\n"
    assert err == "fastlaunch: a launcher line\nfastlaunch: a rank's problem\n"  # the message alone, as printed
    for name in (LAUNCHER, RANK):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        launcher_line("hidden")
        rank_warning("hidden")
        assert capsys.readouterr() == ("", "")
    finally:
        for name in (LAUNCHER, RANK):
            logging.getLogger(name).setLevel(logging.INFO)
