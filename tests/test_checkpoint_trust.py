"""Checkpoints that can be trusted: nothing in one runs code, a damaged one is skipped for the newest good
one, a write that fails keeps the previous one, and nothing is created world-writable."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time

import pytest
import torch
import yaml

from fastlaunch import checkpoint
from fastlaunch.rank.snapshot import rng_states, set_rng
from conftest import SCRIPTS, Payload


def _state(epoch: int, size: int = 10) -> dict:
    return {"fit_index": 0, "epoch": epoch, "iter": 0, "n_epoch": 5, "time": time.time(),
            "model": {"w": torch.full((size,), float(epoch))}}


@pytest.fixture
def run_dir(tmp_path):
    run = tmp_path / "runs" / "20260101-000000-train"
    run.mkdir(parents=True)
    return run


def test_a_checkpoint_is_plain_data_read_back_without_unpickling_code(run_dir):
    path = checkpoint.save({**_state(1), "rng": rng_states()}, run_dir, "epoch0-0")
    assert checkpoint.latest(run_dir) == path
    loaded = checkpoint.load(path)  # weights_only=True
    assert torch.equal(loaded["model"]["w"], torch.full((10,), 1.0))
    set_rng(loaded["rng"])


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
    assert len(err) == 1 and err[0].startswith(f"fastlaunch: could not write checkpoint {good}: {words} (") \
        and " bytes free on " in err[0] and err[0].endswith("about 0 MB needed); the previous checkpoint is kept"), err
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


def test_a_checkpoint_swapped_after_the_launcher_verified_it_is_refused_where_it_is_loaded(run_dir, tmp_path):
    good = checkpoint.save(_state(1), run_dir, "epoch0-0")
    assert checkpoint.latest(run_dir) == good  # what the launcher checked
    other = tmp_path / "other.pt"
    torch.save({**_state(7), "model": {"w": torch.full((10,), 7.0)}}, other)  # a valid torch file, plain data
    os.replace(other, good)
    with pytest.raises(checkpoint.BadCheckpoint, match="its hash differs from its manifest"):
        checkpoint.load(good)


def test_a_checkpoint_is_read_once_and_the_bytes_hashed_are_the_bytes_loaded(run_dir, monkeypatch):
    good = checkpoint.save(_state(1), run_dir, "epoch0-0")
    opened = []
    real_open = os.open

    def counting(path, *args, **kwargs):
        opened.append(os.fspath(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", counting)
    assert checkpoint.load(good)["epoch"] == 1
    assert opened.count(str(good)) == 1


def _manifest_text(good, value) -> str:
    manifest = json.loads(good.with_suffix(".json").read_text())
    if isinstance(value, dict):
        return json.dumps({**manifest, **value})
    return value


@pytest.mark.parametrize("bad, why", [
    ({"epoch": "3"}, "its manifest is malformed (epoch is '3')"),
    ({"sha256": 5}, "its manifest is malformed (sha256 is 5)"),
    ({"size": "x"}, "its manifest is malformed (size is 'x')"),
    ({"fit_index": True}, "its manifest is malformed (fit_index is True)"),
    ({"iter": -1}, "its manifest is malformed (iter is -1)"),
    ({"time": None}, "its manifest is malformed (time is None)"),
    ({"run": ["x"]}, "its manifest is malformed (run is ['x'])"),
    ({"sha256": "not a hash"}, "its manifest is malformed (sha256: not a SHA-256 in hex)"),
    ("[1, 2, 3]", "its manifest is malformed (a list, not an object)"),
    ('"a string"', "its manifest is malformed (a str, not an object)"),
    ("[" * 100_000 + "]" * 100_000, "its manifest is missing or unreadable"),
    ('{"a": ' * 50_000 + "1" + "}" * 50_000, "its manifest is missing or unreadable"),
])
def test_a_manifest_of_the_wrong_shape_is_one_line_and_skipped_never_a_traceback(run_dir, bad, why):
    good = checkpoint.save(_state(1), run_dir, "epoch0-0")
    newest = checkpoint.save(_state(2), run_dir, "epoch0-1")
    newest.with_suffix(".json").write_text(_manifest_text(good, bad))
    said = []
    assert checkpoint.latest(run_dir, say=said.append) == good
    assert said == [f"fastlaunch: skipping checkpoint {newest}: {why}"], said
    for read in (checkpoint.manifest_of, checkpoint.load, lambda p: checkpoint.verify(p, run_dir)):
        with pytest.raises(checkpoint.BadCheckpoint, match="its manifest is"):
            read(newest)


def test_auto_resume_skips_a_malformed_manifest_in_one_line(run_dir):
    from fastlaunch.launcher.autoresume import newest_checkpoint

    good = checkpoint.save(_state(1), run_dir, "epoch0-0")
    newest = checkpoint.save(_state(2), run_dir, "epoch0-1")
    newest.with_suffix(".json").write_text(_manifest_text(good, {"epoch": "3"}))
    said = []
    assert newest_checkpoint(run_dir, say=said.append) == good
    assert len(said) == 1 and "its manifest is malformed" in said[0]


@pytest.mark.parametrize("planted", ["model file", "manifest"])
def test_a_symbolic_link_planted_as_a_checkpoint_file_is_refused_in_one_line(run_dir, tmp_path, planted):
    good = checkpoint.save(_state(1), run_dir, "epoch0-0")
    newest = checkpoint.save(_state(2), run_dir, "epoch0-1")  # a good pair, moved away and linked back
    target = newest if planted == "model file" else newest.with_suffix(".json")
    elsewhere = tmp_path / target.name
    os.replace(target, elsewhere)
    target.symlink_to(elsewhere)
    said = []
    assert checkpoint.latest(run_dir, say=said.append) == good
    what = "it" if planted == "model file" else "its manifest"
    assert said == [f"fastlaunch: skipping checkpoint {newest}: {what} is a symbolic link"], said
    with pytest.raises(checkpoint.BadCheckpoint, match="is a symbolic link"):
        checkpoint.load(newest)


def test_a_checkpoints_folder_that_is_a_symbolic_link_is_refused_in_one_line(run_dir, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere"
    good = checkpoint.save(_state(1), elsewhere, "epoch0-0")  # a good checkpoint of another folder's name
    manifest = json.loads(good.with_suffix(".json").read_text())
    good.with_suffix(".json").write_text(json.dumps({**manifest, "run": run_dir.name}))  # naming this run
    folder = checkpoint.checkpoint_dir(run_dir)
    folder.symlink_to(good.parent)
    said = []
    assert checkpoint.latest(run_dir, say=said.append) is None
    assert said == [f"fastlaunch: skipping the checkpoints in {folder}: it is a symbolic link"], said
    with pytest.raises(checkpoint.BadCheckpoint, match="is a symbolic link"):
        checkpoint.load(folder / "epoch0-0.pt")
    capsys.readouterr()
    assert checkpoint.save(_state(2), run_dir, "epoch0-1") is None  # nothing written through the link
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"fastlaunch: could not write checkpoint {folder}/epoch0-1.pt: {folder} is a symbolic link; "
                   "the previous checkpoint is kept"], err
    assert sorted(p.name for p in good.parent.iterdir()) == ["epoch0-0.json", "epoch0-0.pt"]


def test_a_rank_told_to_resume_from_a_checkpoint_swapped_since_refuses_it_in_one_line(run_dir, tmp_path):
    import dataclasses

    from fastlaunch.env import DistEnv
    from fastlaunch.errors import UsageError
    from fastlaunch.rank.callbacks.checkpointing import resume_callbacks
    from fastlaunch.rank.context import RankContext

    good = checkpoint.save(_state(1), run_dir, "epoch0-0")
    torch.save(_state(5), tmp_path / "other.pt")
    os.replace(tmp_path / "other.pt", good)
    ctx = RankContext(dataclasses.replace(DistEnv(), resume_from=good))
    with pytest.raises(UsageError) as caught:
        resume_callbacks(ctx, run=None)
    line = str(caught.value)
    assert "\n" not in line and line.startswith("fastlaunch: error: the checkpoint to resume from is refused where "
                                                f"it is loaded (got {good}: it is truncated or corrupted")
