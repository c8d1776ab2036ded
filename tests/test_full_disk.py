"""A full disk under the run directory: every write a rank or the launcher makes there fails in one line, keeps
what was there whole, and the run goes on; a run directory too full for the heartbeat file is a HINT error
before any rank starts (never a SIGBUS in a rank). Each test mounts a real small tmpfs (root only)."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from conftest import run_fastlaunch
from fastlaunch import checkpoint, heartbeat

PAGE = 4096


@pytest.fixture
def small_disk(tmp_path):
    """mount(size) -> a fresh tmpfs of that many bytes under tmp_path; unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mounted: list[Path] = []

    def mount(size: int) -> Path:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"this machine does not let root mount a tmpfs: {done.stderr.strip()}")
        mounted.append(point)
        return point

    try:
        yield mount
    finally:
        for point in reversed(mounted):
            subprocess.run(["umount", str(point)], check=False)


def fill(disk: Path, leave: int = 0) -> None:
    """Leave exactly `leave` bytes (whole pages) free on the tmpfs."""
    (disk / "filler").write_bytes(bytes(shutil.disk_usage(disk).free - leave))
    assert shutil.disk_usage(disk).free == leave


def pages(n_bytes: int) -> int:
    return -(-n_bytes // PAGE) * PAGE


def _state(epoch: int, size: int = 10) -> dict:
    return {"fit_index": 0, "epoch": epoch, "iter": 0, "n_epoch": 5, "time": time.time(),
            "model": {"w": torch.full((size,), float(epoch))}}


def _no_temporaries(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("fails_at", ["model file", "manifest"])
def test_a_full_disk_at_a_checkpoint_write_is_one_line_and_the_previous_checkpoint_stays(small_disk, capsys,
                                                                                          fails_at):
    disk = small_disk(1 << 20)
    run_dir = disk / "20260101-000000-train"
    good = checkpoint.save(_state(1), run_dir, "epoch0-0")
    manifest_before = good.with_suffix(".json").read_bytes()
    newer = _state(2, size=20_000)
    room = 0
    if fails_at == "manifest":  # room for the model file, not for its manifest
        probe = disk / "probe.pt"
        torch.save(newer, probe)
        room = pages(probe.stat().st_size)
        probe.unlink()
    fill(disk, leave=room)
    capsys.readouterr()
    assert checkpoint.save(newer, run_dir, "epoch0-1") is None  # no exception: the fit goes on
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"fastlaunch: could not write checkpoint {run_dir}/checkpoints/epoch0-1.pt: "
                             f"No space left on device ({room} bytes free on tmpfs at {disk}, ") \
        and err[0].endswith("the previous checkpoint is kept"), err
    folder = checkpoint.checkpoint_dir(run_dir)
    assert _no_temporaries(folder) and sorted(p.name for p in folder.iterdir()) == ["epoch0-0.json", "epoch0-0.pt"]
    assert good.with_suffix(".json").read_bytes() == manifest_before
    assert checkpoint.latest(run_dir) == good and checkpoint.load(good)["epoch"] == 1


def test_the_heartbeat_file_is_allocated_at_creation_so_a_full_disk_is_an_error_there(small_disk):
    disk = small_disk(64 * 1024)
    fill(disk)
    with pytest.raises(OSError) as caught:  # not a sparse file that a rank's first beat would SIGBUS on
        heartbeat.create(heartbeat.progress_file(disk / "run"), 2)
    assert caught.value.errno == 28


def test_a_run_directory_too_full_for_the_heartbeat_file_is_a_hint_error_before_any_rank_starts(small_disk, tmp_path):
    disk = small_disk(PAGE)  # room for launch.yaml alone
    script = tmp_path / "train.py"
    script.write_text("print('hello from the script')\n")
    done = run_fastlaunch(["--cpu", "1", "--run-dir", disk / "run", script], cwd=tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])  # before: a rank died by SIGBUS (135)
    assert done.returncode != 128 + signal.SIGBUS and "SIGBUS" not in done.stderr + done.stdout
    err = done.stderr.strip().splitlines()
    assert err == [f"fastlaunch: error: no space left on tmpfs at {disk} for the run directory "
                   f"(got {disk / 'run'}: 0 bytes free). HINT: free some space there, or pass --run-dir pointing "
                   "elsewhere"], err
    assert "hello from the script" not in done.stdout and not (disk / "run" / "logs" / ".progress").exists()


def _metrics_records(n: int) -> list[dict]:
    return [{"rank": r, "node": 0, "attempt": 0, "fit": 0, "epoch": e, "time": 100.0 + e, "device": "cpu",
             "steps": 4, "step_time": 0.01, "work_time": 0.008, "data_wait_frac": 0.1, "syncs_per_step": 1.0,
             "rss_mb": 300.0} for e in range(n) for r in range(2)]


@pytest.mark.parametrize("fails_at", ["report.json", "report.png"])
def test_a_full_disk_at_the_report_is_one_line_and_the_report_is_still_built(small_disk, capsys, fails_at):
    from fastlaunch.launcher.report import assemble_report, build_report

    run_dir = small_disk(1 << 20) / "run"
    (run_dir / "metrics").mkdir(parents=True)
    (run_dir / "logs").mkdir()
    for r in range(2):
        (run_dir / "metrics" / f"rank{r}.jsonl").write_text(
            "".join(json.dumps(x) + "\n" for x in _metrics_records(3) if x["rank"] == r))
    room = 0
    if fails_at == "report.png":  # room for report.json, not for the picture
        room = pages(len(json.dumps(assemble_report(run_dir, 2), indent=1)))
    fill(run_dir.parent, leave=room)
    capsys.readouterr()
    report = build_report(run_dir, 2)  # no exception: the job's own outcome is still said
    assert report["ranks"] == [0, 1] and len(report["epochs"]) == 6
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastlaunch: could not write {run_dir / fails_at}: No space left on device (0 bytes free "
                   f"on tmpfs at {run_dir.parent}); the report is on the console only"], err
    assert _no_temporaries(run_dir) and not (run_dir / "report.png").exists()
    if fails_at == "report.png":
        assert json.loads((run_dir / "report.json").read_text())["ranks"] == [0, 1]  # whole
    else:
        assert not (run_dir / "report.json").exists()


# -- a rank's writes during a fit, in this process (one rank, fastlaunch installed into fastai) ----------------

@pytest.fixture
def rank_on(tmp_path):
    """install(run_dir, **settings) -> the rank context of a one-rank run writing into run_dir."""
    import fastai.callback.all  # noqa: F401  (every module a patch changes, loaded: every patch applies at install)

    from fastlaunch.env import DistEnv
    from fastlaunch.rank import integrate
    from fastlaunch.rank.context import RankContext

    installed = []

    def install(run_dir: Path, **settings) -> RankContext:
        ctx = RankContext(dataclasses.replace(DistEnv(), run_dir=run_dir, **settings))
        installed.append(integrate.install(ctx))
        return ctx

    yield install
    for installation in installed:
        installation.uninstall()


def _learner(*cbs):
    from fastai.basics import Datasets, Learner
    from torch import nn

    dsets = Datasets(range(64), tfms=[[lambda i: torch.tensor([float(i % 3), float(i % 5)])], [lambda i: i % 2]],
                     splits=[list(range(48)), list(range(48, 64))])
    return Learner(dsets.dataloaders(bs=16), nn.Linear(2, 2), loss_func=nn.CrossEntropyLoss(), cbs=list(cbs))


HELD = '{"epoch": -1, "pad": "' + "x" * (PAGE - 25) + '"}\n'


def _run_dir_on_full_disk(small_disk) -> Path:
    run_dir = small_disk(256 * 1024) / "20260101-000000-train"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "metrics").mkdir()
    (run_dir / "metrics" / "rank0.jsonl").write_text(HELD)  # a whole page: an appended byte needs another
    fill(run_dir.parent)
    return run_dir


def test_a_full_disk_at_the_metrics_is_said_once_and_training_goes_on(small_disk, rank_on, capsys):
    run_dir = _run_dir_on_full_disk(small_disk)
    rank_on(run_dir, instrument=True)
    learn = _learner()
    learn.fit(3, 1e-2)
    assert len(learn.recorder.values) == 3  # every epoch trained
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastlaunch")]
    path = run_dir / "metrics" / "rank0.jsonl"
    assert err == [f"fastlaunch: could not write metrics to {path}: No space left on device (0 bytes free on tmpfs "
                   f"at {run_dir.parent}); training goes on, the report will lack these epochs"], err
    assert path.read_text() == HELD  # what it held, no torn line


def test_a_full_disk_at_a_stop_is_one_line_per_file_and_the_fit_goes_on(small_disk, rank_on, capsys):
    from fastai.basics import Callback

    from fastlaunch.config import stop_marker
    from fastlaunch.rank.callbacks.checkpointing import preempt_writer

    run_dir = _run_dir_on_full_disk(small_disk)
    ctx = rank_on(run_dir, instrument=False)

    class StopHere(Callback):
        def after_epoch(self):
            if self.epoch == 0:
                preempt_writer(ctx, self.learn, "epoch")

    learn = _learner(StopHere())
    learn.fit(2, 1e-2)
    assert len(learn.recorder.values) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastlaunch")]
    marker = stop_marker(run_dir / "logs", 0)
    assert len(err) == 2, err
    assert err[0].startswith(f"fastlaunch: could not write checkpoint {run_dir}/checkpoints/preempt.pt: No space "
                             f"left on device (0 bytes free on tmpfs at {run_dir.parent}, "), err
    assert err[1] == (f"fastlaunch: could not write the stop marker {marker}: No space left on device (0 bytes free "
                      f"on tmpfs at {run_dir.parent}); the launcher will not count this stop as checkpointed"), err
    assert not marker.exists() and _no_temporaries(run_dir / "checkpoints")



LOUD = '''\
import os, sys, time
from pathlib import Path
for i in range(400):  # about 1 MB of output per rank: more than the disk holds
    print(f"step {i} " + "x" * 2500, flush=(i % 50 == 0))
sys.stderr.write("and some on stderr\\n")
Path(os.environ["FL_OUT"], f"done{os.environ['RANK']}").write_text("trained on")
'''


def test_a_full_disk_under_the_logs_loses_output_not_the_run(small_disk, tmp_path):
    """The ranks print more than the run directory's disk holds: each print would raise ENOSPC in the script;
    the output is dropped instead, the launcher says so once per rank, and the script runs to its end."""
    disk = small_disk(512 * 1024)
    (tmp_path / "loud.py").write_text(LOUD)
    out = tmp_path / "out"
    out.mkdir()
    proc = run_fastlaunch(["--cpu", "2", "--run-dir", str(disk / "run"), "loud.py"], cwd=tmp_path,
                          env={"FL_OUT": str(out)}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "done0").exists() and (out / "done1").exists()
    lost = [ln for ln in proc.stderr.splitlines() if "output no longer fits in its log" in ln]
    assert len(lost) == 2 and all("bytes free on" in ln and "training goes on" in ln for ln in lost), proc.stderr
    assert "Errno 28" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "could not write" in proc.stderr and "report.json" in proc.stderr  # the report's own one line
