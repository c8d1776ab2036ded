"""Checkpoints that can be trusted: nothing in one runs code, a damaged one is skipped for the newest good
one, a write that fails keeps the previous one, and nothing is created world-writable."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fastlaunch import checkpoint
from conftest import SCRIPTS


def _state(epoch: int, size: int = 10) -> dict:
    return {"fit_index": 0, "epoch": epoch, "iter": 0, "n_epoch": 5, "time": time.time(),
            "model": {"w": torch.full((size,), float(epoch))}}


class Payload:
    """What an attacker pickles: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "20260101-000000-train"
    run.mkdir(parents=True)
    return run


def test_a_checkpoint_is_plain_data_read_back_without_unpickling_code(run_dir):
    path = checkpoint.save({**_state(1), "rng": checkpoint._rng()}, run_dir, "epoch0-0")
    assert checkpoint.latest(run_dir) == path
    loaded = checkpoint.load(path)  # weights_only=True
    assert torch.equal(loaded["model"]["w"], torch.full((10,), 1.0))
    checkpoint.set_rng(loaded["rng"])


def test_a_crafted_checkpoint_is_refused_and_its_payload_never_runs(run_dir, tmp_path):
    good = checkpoint.save(_state(1), run_dir, "epoch0-0")
    marker = tmp_path / "pwned"
    evil = checkpoint.save({**_state(2), "evil": Payload(marker)}, run_dir, "preempt")  # its manifest is right
    said = []
    assert checkpoint.latest(run_dir, say=said.append) == good
    assert said == [f"fastlaunch: skipping checkpoint {evil}: it holds more than tensors and plain data "
                    "(UnpicklingError)"]
    with pytest.raises(Exception):
        checkpoint.load(evil)
    assert not marker.exists()


@pytest.mark.parametrize("damage, why", [
    ("truncate", "it is truncated or corrupted"),
    ("flip", "it is truncated or corrupted"),
    ("no_manifest", "its manifest is missing or unreadable"),
    ("other_run", "its manifest names another run (20250101-000000-other)"),
])
def test_a_damaged_newest_checkpoint_is_said_and_the_previous_good_one_used(run_dir, damage, why):
    good = checkpoint.save(_state(1), run_dir, "epoch0-0")
    newest = checkpoint.save(_state(2, size=10_000), run_dir, "epoch0-1")
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        newest.write_bytes(data[:5000] + bytes([data[5000] ^ 0xFF]) + data[5001:])
    elif damage == "no_manifest":
        newest.with_suffix(".json").unlink()
    else:
        manifest = newest.with_suffix(".json")
        manifest.write_text(manifest.read_text().replace(run_dir.name, "20250101-000000-other"))
    said = []
    assert checkpoint.latest(run_dir, say=said.append) == good
    assert len(said) == 1 and said[0].startswith(f"fastlaunch: skipping checkpoint {newest}: {why}"), said


def test_a_writer_killed_mid_write_leaves_the_previous_checkpoint_good(run_dir):
    good = checkpoint.save(_state(1), run_dir, "epoch0-0")
    code = ("import time, torch; from pathlib import Path; from fastlaunch import checkpoint\n"
            f"checkpoint.save({{'fit_index': 0, 'epoch': 2, 'iter': 0, 'n_epoch': 5, 'time': time.time(), "
            f"'model': {{'w': torch.randn(60_000_000)}}}}, Path({str(run_dir)!r}), 'epoch0-1')\n")
    writer = subprocess.Popen([sys.executable, "-c", code])
    folder = checkpoint.checkpoint_dir(run_dir)
    deadline = time.monotonic() + 120
    while not any(p.name.endswith(".tmp") for p in folder.iterdir()):
        assert time.monotonic() < deadline and writer.poll() is None, "the writer never started writing"
        time.sleep(0.01)
    writer.kill()
    writer.wait()
    found = checkpoint.latest(run_dir)
    assert found == good  # the half-written one never has a manifest: it is not a candidate


@pytest.mark.parametrize("code, words", [(errno.ENOSPC, "No space left on device"),
                                         (errno.EROFS, "Read-only file system")])
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_keeps_the_previous(run_dir, monkeypatch, capsys,
                                                                                code, words):
    good = checkpoint.save(_state(1), run_dir, "preempt")
    real_save = torch.save

    def failing(obj, fh, *args, **kwargs):
        real_save(obj, fh, *args, **kwargs)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(torch, "save", failing)
    assert checkpoint.save(_state(2), run_dir, "preempt") is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastlaunch: could not write checkpoint {good}: {words} (about 0 MB needed); "
                   "the previous checkpoint is kept"]
    monkeypatch.undo()
    assert checkpoint.latest(run_dir) == good and checkpoint.load(good)["epoch"] == 1


def test_checkpoints_and_run_directories_are_not_world_writable(tmp_path, monkeypatch):
    from fastlaunch.config import LaunchConfig
    from fastlaunch.launcher.rundir import prepare_run_dir

    old = os.umask(0o022)
    try:
        config = prepare_run_dir(LaunchConfig(script=SCRIPTS / "plain_ddp.py", script_args=(), nproc_per_node=2,
                                              device="cpu", run_dir=None, seed=1), root=tmp_path / "runs")
        path = checkpoint.save(_state(1), config.run_dir, "epoch0-0")
    finally:
        os.umask(old)
    for made in (config.run_dir, config.run_dir / "logs", path.parent, path, path.with_suffix(".json"),
                 config.run_dir / "launch.yaml"):
        assert not made.stat().st_mode & 0o002, made


def test_resume_from_a_run_whose_only_checkpoint_is_crafted_is_a_hint_error(run_dir, tmp_path, capsys, monkeypatch):
    from fastlaunch.launcher.cli import main

    (run_dir / "launch.yaml").write_text(yaml.safe_dump({"script": str(SCRIPTS / "plain_ddp.py"), "script_args": [],
                                                         "device": "cpu", "nproc_per_node": 2}))
    marker = tmp_path / "pwned"
    evil = checkpoint.save({**_state(2), "evil": Payload(marker)}, run_dir, "preempt")
    monkeypatch.chdir(tmp_path)
    assert main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"fastlaunch: skipping checkpoint {evil}: it holds more than tensors and plain data (UnpicklingError)"
    assert err[1].startswith("fastlaunch: error: the run to resume has no good checkpoint") and "HINT" in err[1]
    assert len(err) == 2 and not marker.exists()
    assert not (tmp_path / "runs").exists() or [p.name for p in (tmp_path / "runs").iterdir()] == [run_dir.name]


def test_stale_temporaries_of_a_killed_writer_are_removed_at_the_next_write_and_resume(run_dir):
    folder = checkpoint.checkpoint_dir(run_dir)
    folder.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = folder / f".epoch0-1.pt.{int(dead.stdout)}.tmp"
    stale.write_bytes(b"half a checkpoint")
    checkpoint.save(_state(1), run_dir, "epoch0-0")
    assert not stale.exists()
    stale.write_bytes(b"half a checkpoint")
    assert checkpoint.latest(run_dir) == folder / "epoch0-0.pt"
    assert not stale.exists()


@pytest.mark.parametrize("text", ["device: cpu\nnproc_per_node: 2\n", "[unclosed", "just a string"])
def test_a_broken_launch_yaml_under_resume_is_a_hint_error(run_dir, tmp_path, capsys, monkeypatch, text):
    from fastlaunch.launcher.cli import main

    (run_dir / "launch.yaml").write_text(text)
    monkeypatch.chdir(tmp_path)
    assert main(["--resume", str(run_dir)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastlaunch: error: the run's launch.yaml is broken (got ") \
        and "HINT: " in err[0], err
