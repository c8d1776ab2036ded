"""Instrumentation: per-rank records, the report and its diagnoses; GPU paths with fakes."""
from __future__ import annotations

import json
import re
import types

import pytest

from conftest import REPO, SCRIPTS, only_run_dir, run_fastlaunch
from fastlaunch.rank.instrument import memory
from fastlaunch.launcher.diagnose import diagnose

SCRIPT = SCRIPTS / "instrument_probe.py"
GOLDEN = REPO / "tests" / "golden"


def _run(tmp_path, mode, *flags):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_fastlaunch(["--cpu", "2", *flags, SCRIPT], tmp_path, env={"FL_PROBE_OUT": str(out), "FL_MODE": mode})
    run_dir = only_run_dir(tmp_path)
    report = json.loads((run_dir / "report.json").read_text()) if (run_dir / "report.json").exists() else None
    return proc, run_dir, report, out


def test_two_rank_run_writes_records_report_png_and_console_table(tmp_path):
    proc, run_dir, report, _ = _run(tmp_path, "plain")
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        lines = (run_dir / "metrics" / f"rank{rank}.jsonl").read_text().splitlines()
        assert len(lines) == 3  # one record per epoch
    assert report["ranks"] == [0, 1] and report["missing"] == []
    for rec in report["epochs"]:
        for key in ("rss_mb", "peak_rss_mb", "syncs_per_step", "data_wait_frac", "step_time", "work_time",
                    "epoch_end_wait", "attempt"):
            assert key in rec
        # figures that add up
        assert rec["peak_rss_mb"] >= rec["rss_mb"] > 0
        assert 0 <= rec["data_wait_frac"] <= 1
        assert rec["step_time"] >= rec["work_time"] >= 0
        assert rec["syncs_per_step"] >= 0 and rec["epoch_end_wait"] >= 0 and rec["steps"] > 0
    assert (run_dir / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # fastai's progress bars, piped and in the logs: each bar's final state, no carriage-return fragments
    logs = [(run_dir / "logs" / f"rank{rank}.log").read_text() for rank in (0, 1)]
    assert "\r" not in proc.stdout and not any("\r" in log for log in logs)
    assert proc.stdout.count("epoch     train_loss") == 1
    assert not [line for line in proc.stdout.splitlines() + logs[0].splitlines() if line.strip() == "\u2588"]
    assert proc.stdout.count("fastlaunch: epoch 2 per rank | r0:") == 1
    assert all(rec["syncs_per_step"] == 0 for rec in report["epochs"])  # fastai's defaults and fastlaunch: none
    assert "nothing slows this run down" in proc.stderr
    again = run_fastlaunch(["report", run_dir], tmp_path)
    assert again.returncode == 0 and "rank 1 (epoch 2, attempt 0)" in again.stdout
    # every file the run left is one the README's "What a run leaves" describes
    readme = (REPO / "README.md").read_text()
    listing = readme[readme.index("## What a run leaves"):].split("\n\n")[1]
    described = [re.sub(r"\d+", r"\\d+", re.escape(line.split()[0])) for line in listing.splitlines()[1:]
                 if line.startswith("      ") and not line.startswith("       ")]
    left = [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()]
    assert left and [f for f in left if not any(re.fullmatch(d + ".*", f) for d in described)] == [], described


def test_fastlaunch_report_breaks_a_run_of_several_fits_down_per_fit():
    from fastlaunch.launcher.report import render_text

    records = _report_records()
    text = render_text({"epochs": records, "diagnoses": []})
    assert "fastlaunch: fit 1, rank 0 (epoch 1, attempt 0)" in text and "fit 2, rank 1 (epoch 2, attempt 1)" in text
    single = render_text({"epochs": [r for r in records if r["fit"] == 0], "diagnoses": []})
    assert "fastlaunch: rank 0 (epoch 1, attempt 0)" in single and "fit 1" not in single


def test_item_in_a_callback_is_one_sync_per_step_attributed_to_it(tmp_path):
    proc, _, report, _ = _run(tmp_path, "item")
    assert proc.returncode == 0, proc.stderr
    for rec in report["epochs"]:
        assert rec["syncs_per_step"] == pytest.approx(1.0)
        assert rec["sync_sources"] == {"Probe.after_batch (item)": pytest.approx(1.0)}
    assert "1.0 syncs per step, 1.0 from Probe.after_batch (item)" in proc.stderr


def test_data_wait_matches_the_loaders_own_sleep_and_starvation_is_diagnosed(tmp_path):
    proc, _, report, out = _run(tmp_path, "sleepy")
    assert proc.returncode == 0, proc.stderr
    for rank in (0, 1):
        slept = json.loads((out / f"slept-rank{rank}.json").read_text())
        fetched = json.loads((out / f"fetched-rank{rank}.json").read_text())
        mine = [r for r in report["epochs"] if r["rank"] == rank]
        for epoch, rec in enumerate(mine):
            window = rec["step_time"] * rec["steps"]
            asleep = sum(slept[epoch][1:]) / window  # first batch left out, as the instrument does
            assert rec["data_wait_frac"] > asleep - 0.01  # a wait can't be shorter than the loader's sleep
            truth = sum(fetched[epoch][1:]) / window  # the loader's own clock around each batch
            assert abs(rec["data_wait_frac"] - truth) < 0.05
    cores = report["epochs"][0]["cores"]  # the advice follows the one rule (fastlaunch/advice.py)
    fix = f"use num_workers={cores - 1}" if cores > 1 else "use lighter item transforms"
    assert "rank 0 waits for data" in proc.stderr and fix in proc.stderr, proc.stderr


@pytest.mark.parametrize("cores_per_rank", [1, 2, 4])
@pytest.mark.parametrize("in_use", [0, 1, 3])
def test_doctor_and_the_diagnoses_give_one_advice_never_the_value_in_use(cores_per_rank, in_use):
    from fastlaunch.tools.doctor import check_cpu

    doctor = check_cpu(cores_per_rank * 2, 2)[0]
    record = {"rank": 0, "epoch": 0, "data_wait_frac": 0.5, "num_workers": in_use, "cores": cores_per_rank,
              "step_time": 0.2, "work_time": 0.1, "syncs_per_step": 0.0}
    said = next(d for d in diagnose([record]) if "waits for data" in d)
    evidence, fix = said.rsplit("): ", 1)
    assert "50%" in evidence and "100 ms of 200 ms" in evidence and f"num_workers={in_use}" in evidence
    assert f"num_workers={in_use}" not in fix  # never the value already in use
    best = cores_per_rank - 1
    assert f"use num_workers={best} per DataLoader" in doctor.fix
    assert (f"use num_workers={best}" in fix) == (in_use < best)  # the doctor's number, or no number at all


def test_no_starvation_diagnosis_without_the_sleep(tmp_path):
    proc, _, report, _ = _run(tmp_path, "plain")
    assert not [d for d in report["diagnoses"] if "waits for data" in d]


def test_a_slowed_rank_is_named_the_straggler(tmp_path):
    proc, _, report, _ = _run(tmp_path, "slow1")
    assert proc.returncode == 0, proc.stderr
    stragglers = [d for d in report["diagnoses"] if "slower than the median" in d]
    assert len(stragglers) == 1 and stragglers[0].startswith("rank 1 steps")


def test_a_rank_killed_mid_run_is_named_missing(tmp_path):
    proc, _, report, _ = _run(tmp_path, "die1")
    assert proc.returncode != 0
    assert report["missing"] == [1]
    assert any(d.startswith("rank 1 is missing from the report") for d in report["diagnoses"])


def test_no_instrument_writes_nothing(tmp_path):
    proc, run_dir, report, _ = _run(tmp_path, "plain", "--no-instrument")
    assert proc.returncode == 0 and report is None and not (run_dir / "metrics").exists()


class FakeNvml:
    def __init__(self, raise_on=None):
        self.raise_on = raise_on

    def nvmlDeviceGetHandleByUUID(self, uuid):
        if self.raise_on == "handle":
            raise RuntimeError("NVML_ERROR_NOT_FOUND")
        assert uuid == "GPU-1234-abcd"  # found by UUID, never by index
        return "h"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return types.SimpleNamespace(used=30 * 2**30, total=80 * 2**30)


def _fake_torch():
    stats = {"allocated_bytes.all.current": 11 * 2**30, "reserved_bytes.all.current": 18 * 2**30,
             "allocated_bytes.all.peak": 12 * 2**30, "reserved_bytes.all.peak": 19 * 2**30,
             "inactive_split_bytes.all.current": 7 * 2**30, "num_alloc_retries": 4, "num_ooms": 1}
    return types.SimpleNamespace(cuda=types.SimpleNamespace(
        memory_stats=lambda i: stats, get_device_properties=lambda i: types.SimpleNamespace(uuid="1234-abcd")))


def test_cuda_memory_from_one_stats_call_and_nvml_by_uuid():
    got = memory.sample("cuda", 0, torch_mod=_fake_torch(), nvml=FakeNvml(), rss_bytes=2**30)
    assert got["cuda_allocated_mb"] == 11 * 1024 and got["cuda_reserved_mb"] == 18 * 1024
    assert got["fragmentation"] == pytest.approx(7 / 18) and got["alloc_retries"] == 4 and got["ooms"] == 1
    assert got["gpu_total_mb"] == 80 * 1024 and got["gpu_others_mb"] == 12 * 1024 and got["rss_mb"] == 1024
    without = memory.sample("cuda", 0, torch_mod=_fake_torch(), nvml=FakeNvml(raise_on="handle"), rss_bytes=1)
    assert "gpu_used_mb" not in without and without["cuda_reserved_mb"] == 18 * 1024
    assert "cuda_reserved_mb" not in memory.sample("cpu", rss_bytes=1)


def test_gpu_diagnoses_from_records():
    base = {"rank": 0, "epoch": 0, "data_wait_frac": 0.0, "syncs_per_step": 0.0, "work_time": 0.01,
            "device": "cuda", "visible_gpus": None}
    frag = dict(base, cuda_reserved_mb=18.2 * 1024, cuda_allocated_mb=11.0 * 1024, fragmentation=0.39,
                alloc_retries=4)
    text = " | ".join(diagnose([frag]))
    assert "reserved 18.2 GB, allocated 11.0 GB: 39% fragmentation, 4 allocation retries" in text
    cpu = dict(base, device="cpu", visible_gpus=4)
    assert "rank 0 trained on cpu while 4 GPUs are visible" in " | ".join(diagnose([cpu]))


def _report_records() -> list[dict]:
    """Two ranks, two fits (2 and 3 epochs), a restart in the second: near-equal figures, as real runs have."""
    records, t = [], 1000.0
    for fit, attempt, epoch in ((0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), (1, 1, 1), (1, 1, 2)):
        t += 10
        for rank in (0, 1):
            records.append({"rank": rank, "node": 0, "attempt": attempt, "fit": fit, "epoch": epoch, "time": t,
                            "device": "cpu", "steps": 40, "step_time": 0.100 + 0.0001 * rank + 0.002 * epoch,
                            "work_time": 0.09, "data_wait_frac": 0.05 + 0.01 * rank, "syncs_per_step": 0.0,
                            "rss_mb": 837.1 + 0.1 * epoch + 0.2 * rank, "peak_rss_mb": 840.0})
    return records


def test_the_report_picture_matches_its_golden_image(tmp_path):
    """Title, whole epoch numbers, y axes from zero (837.1 vs 837.6 MB looks equal), fits and a restart marked,
    the diagnoses under the plots: compared with tests/golden/report.png (a tolerant pixel comparison)."""
    from matplotlib.testing.compare import compare_images

    from fastlaunch.launcher.report import _plot

    out = tmp_path / "report.png"
    _plot(_report_records(), out, "train.py, run 20260101-000000-train: 2 ranks x cpu, 5 epoch(s) recorded over 60 s",
          ["rank 1 waits for data 30% of each step (num_workers=0, 1 core(s) per rank): try num_workers=1"])
    # (the diagnosis text is drawn as given: the picture, not the advisor, is compared here)
    golden = GOLDEN / "report.png"
    assert compare_images(str(golden), str(out), tol=3) is None


def test_past_eight_ranks_the_report_draws_a_band_and_the_slowest_rank(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from fastlaunch.launcher import report

    records = [dict(r, rank=rank, step_time=r["step_time"] * (1.3 if rank == 7 else 1.0))
               for r in _report_records() if r["rank"] == 0 for rank in range(12)]
    drawn = []
    real = matplotlib.axes.Axes.plot

    def plot(ax, *args, **kwargs):
        drawn.append(kwargs.get("label"))
        return real(ax, *args, **kwargs)

    matplotlib.axes.Axes.plot = plot
    try:
        report._plot(records, tmp_path / "report.png", "title", [])
    finally:
        matplotlib.axes.Axes.plot = real
    assert drawn == ["median", "rank 7 (slowest)"] * 3 and (tmp_path / "report.png").stat().st_size > 0
