"""The benchmark harness at a tiny size, so it does not rot (its figures are not checked here)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import REPO


def test_benchmarks_run_end_to_end_at_a_tiny_size(tmp_path):
    out = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks", "--quick", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_quick_results(out.read_text())


def _line(text: str, start: str) -> str:
    return next((line for line in text.splitlines() if line.startswith(start)), f"no line {start!r}")


def check_quick_results(text: str) -> None:
    """What `python -m benchmarks --quick` must write (also callable on a file written by hand)."""
    for figure in ("## 1. Launch to first training step", "## 2. Throughput", "## 3. Scaling",
                   "## 4. Syncs and collectives", "## 5. Peak memory", "## 6. Faults",
                   "## 7. Tiny step (1-layer model, batch 8 per rank, 60 steps)",
                   "### fastlaunch's added time per step, by component"):
        assert figure in text, figure
    assert "- fastlaunch / torchrun + hand-wrapped fastai: " in text.split("## 5.", 1)[1].split("## 6.", 1)[0]
    tiny = text.split("## 7.", 1)[1].split("## Runs that failed", 1)[0]
    for figure in ("- main-thread CPU per step, fastlaunch / hand-wrapped fastai: ",
                   "- main-thread CPU per step, fastlaunch --no-instrument / hand-wrapped fastai: ",
                   "- steps/s, fastlaunch / hand-wrapped fastai: ",
                   "- steps/s, fastlaunch --no-instrument / hand-wrapped fastai: ",
                   "- launch to first step of a plain PyTorch DDP script, "):
        line = _line(tiny, figure)
        assert "n/a" not in line and "x (spread" in line, line
    assert "goal <= 1.03x" in _line(tiny, "- main-thread CPU per step, fastlaunch / hand-wrapped fastai: ")
    assert "goal <= 1.01x" in _line(tiny, "- main-thread CPU per step, fastlaunch --no-instrument / hand-wrapped")
    breakdown = tiny.split("### fastlaunch's added time per step, by component", 1)[1]
    assert "inflated by the profiler" in breakdown and "not measured" not in breakdown, breakdown
    added = _line(breakdown, "- fastlaunch's added time per step, by component: its own modules ")
    assert re.search(r"modules \d+ us/step \(-?\d+% of (the difference|its profiled step; no difference to share: "
                     r"its step is the shorter)\), \d+ calls/step", added), added
    assert re.search(r"^  - fastlaunch/rank/\S+\.py: [\d.]+ us/step", breakdown, re.M), breakdown
    assert re.search(r"^- fastai's own share of the profiled step: fastlaunch \d+%, hand-wrapped \d+%", breakdown,
                     re.M), breakdown
    failed = text.split("## Runs that failed", 1)[1] if "## Runs that failed" in text else ""
    assert "- fastlaunch" not in failed  # fastlaunch's own runs all succeed (a peer may fail: it is reported)
    assert "- fastlaunch: 0.0 Python-level collectives, 0.0 sync calls per step" in text
    assert "- torchrun + hand-wrapped fastai: " in text.split("## 4.", 1)[1]
    counts = text.split("## 4.", 1)[1].split("## 5.", 1)[0]
    for peer in ("fastlaunch", "fastlaunch, no instrumentation", "torchrun + hand-wrapped fastai"):
        probe = _line(counts, f"- probe, {peer}: ")
        assert re.search(r": [\d.]+ syncs, [\d.]+ collectives, [\d.]+ host reads per step over [1-9]\d* steps", probe), probe
    hand = _line(counts, "- probe, torchrun + hand-wrapped fastai: ")
    assert "c10d::allreduce_: 1" in hand, hand  # DDP's gradient all-reduce, seen by the dispatcher
    beyond = _line(counts, "- probe, fastlaunch beyond hand-wrapped DDP's gradient all-reduces ")
    assert re.search(r": -?[\d.]+ collectives, [\d.]+ syncs per step \(goal 0 and 0\)", beyond), beyond
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


def test_every_failed_run_is_listed_and_a_run_that_aborted_after_its_results_too():
    from benchmarks.stats import failures

    results = [{"ok": True, "aborted": None}, {"ok": False, "error": "exit 1: boom"},
               {"ok": True, "aborted": "every rank wrote its results, then aborted at exit"}]
    assert failures("peer (tiny step)", results) == [
        "- peer (tiny step): exit 1: boom", "- peer (tiny step): every rank wrote its results, then aborted at exit"]


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
