"""The benchmark harness at a tiny size, so it does not rot (its figures are not checked here)."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import REPO


def test_benchmarks_run_end_to_end_at_a_tiny_size(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    for figure in ("## 1. Launch to first training step", "## 2. Throughput", "## 3. Scaling",
                   "## 4. Syncs and collectives", "## 5. Peak memory", "## 6. Faults"):
        assert figure in text
    failed = text.split("## Runs that failed", 1)[1] if "## Runs that failed" in text else ""
    assert "- fastlaunch" not in failed  # fastlaunch's own runs all succeed (a peer may fail: it is reported)
    assert "- fastlaunch: 0.0 Python-level collectives, 0.0 sync calls per step" in text
    assert "- torchrun + hand-wrapped fastai: " in text.split("## 4.", 1)[1]
    per_event = next(line for line in text.splitlines() if line.startswith("- instrumentation, per event:"))
    assert "us of hooks per steady step (8 instrument events x" in per_event, per_event  # fastai's 8 step events


def test_ratios_pair_the_same_round_and_leave_out_a_failed_one():
    from benchmarks.__main__ import _median, _ratio, _values

    runs = {"a": [{"ok": True, "v": 2.0}, {"ok": False, "error": "x"}, {"ok": True, "v": 4.0}],
            "b": [{"ok": True, "v": 1.0}, {"ok": True, "v": 100.0}, {"ok": True, "v": 4.0}]}
    a, b = _values(runs, "a", "v"), _values(runs, "b", "v")
    assert a == [2.0, None, 4.0]
    assert _ratio(a, b) == "1.50x (spread 1.00-2.00, 2 rounds)"  # round 2 left out, not paired with round 3
    assert _median(a) == 3.0 and _median([None]) != _median([None])  # nan when nothing ran


def test_the_notebook_session_benchmark_runs_at_a_tiny_size(tmp_path):
    pytest.importorskip("ipykernel", reason="needs the notebook extra (pip install 'fastlaunch[notebook]'; make test has it)")
    out = tmp_path / "RESULTS-notebook.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.session", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = out.read_text()
    assert "Rounds that failed" not in text, text
    for figure in ("session start to ready / script launch to first step: ", "a trivial cell's round trip",
                   "the script as one cell / the same script under fastlaunch: "):
        line = next(ln for ln in text.splitlines() if figure in ln)
        assert "n/a" not in line, line
