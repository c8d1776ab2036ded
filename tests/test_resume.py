"""Preemption and resume: SIGTERM mid-epoch checkpoints at an agreed batch; --resume finishes the plan;
automatic restarts resume from the last epoch checkpoint; checkpoints are never half-written."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml

from conftest import SCRIPTS
from fastlaunch import checkpoint
SCRIPT = SCRIPTS / "resume_probe.py"


def _env(out, mode):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC", "FASTLAUNCH_"))}
    return {**env, "FL_PROBE_OUT": str(out), "FL_MODE": mode}


def _ranks(out):
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def _run(args, cwd, out, mode, timeout=180):
    return subprocess.run([sys.executable, "-m", "fastlaunch", *map(str, args)], cwd=cwd, env=_env(out, mode),
                          capture_output=True, text=True, timeout=timeout)


def test_sigterm_mid_epoch_checkpoints_and_resume_finishes_the_plan(tmp_path):
    import psutil

    out = tmp_path / "out"
    out.mkdir()
    # A generous grace: on a loaded machine rank 0's atomic write (with fsync) can take seconds.
    proc = subprocess.Popen([sys.executable, "-m", "fastlaunch", "--cpu", "2", "--grace", "20", str(SCRIPT)],
                            cwd=tmp_path, env={**_env(out, "slow"), "FL_HOLD_FOR_SIGNAL": "1"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.monotonic() + 90
    while not all((out / f"ready-rank{r}").exists() for r in range(2)):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    procs = psutil.Process(proc.pid).children(recursive=True)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 75, stderr
    assert "stopped by a signal; checkpoint" in stdout, stdout[-2000:] + stderr[-2000:]
    assert "death signal" not in stderr  # the engine's own log lines stay off the console without --verbose
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    run_dir = next((tmp_path / "runs").iterdir())
    saved = checkpoint.load(run_dir / "checkpoints" / "preempt.pt")
    assert saved["epoch"] in (1, 2) and 0 < saved["iter"] < 8  # mid-epoch, at a batch every rank agreed on
    assert not (out / "rank0.json").exists()

    resumed = _run(["--resume", run_dir], tmp_path, out, "plain")
    assert resumed.returncode == 0, resumed.stderr
    r0, r1 = _ranks(out)
    assert len(r0["values"]) == 4 and r0["n_losses"] == len(r0["lrs"]) == 4 * 8  # the planned epochs, all there
    assert r0["seen"][0] == [saved["epoch"], saved["epoch"] * 8 + saved["iter"] + 1]  # from the next batch
    assert r0["weights"] == r1["weights"] and r0["values"] == r1["values"]

    # The same seed without the interruption ends with the same weights: nothing was lost or done twice.
    seed = yaml.safe_load((run_dir / "launch.yaml").read_text())["seed"]
    whole = tmp_path / "whole"
    (whole / "out").mkdir(parents=True)
    plain = _run(["--cpu", "2", "--seed", seed, SCRIPT], whole, whole / "out", "plain")
    assert plain.returncode == 0, plain.stderr
    uninterrupted = _ranks(whole / "out")[0]
    assert uninterrupted["weights"] == pytest.approx(r0["weights"], rel=1e-5)
    # the whole recorder too: earlier epochs' rows, the smoothed train loss of the interrupted epoch
    for got, want in zip(r0["values"], uninterrupted["values"]):
        assert got == pytest.approx(want, abs=1e-5)
    assert r0["losses"] == pytest.approx(uninterrupted["losses"], abs=1e-5)
    assert r0["lrs"] == pytest.approx(uninterrupted["lrs"], abs=1e-9)


def _as_notebook(folder):
    """The probe as a notebook (the session lines, then the script in one cell)."""
    cells = ["%load_ext fastlaunch\n%fastlaunch --cpu 2", SCRIPT.read_text()]
    notebook = folder / "probe.ipynb"
    notebook.write_text(json.dumps({"cells": [{"cell_type": "code", "metadata": {}, "source": c, "outputs": [],
                                               "execution_count": None} for c in cells],
                                    "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    return notebook


@pytest.mark.parametrize("where, how", [("0:batch1", "auto"), ("1:batch5", "notebook"), ("1:valid", "resume"),
                                        ("3:valid", "resume")])
def test_a_stop_anywhere_resumes_to_the_uninterrupted_recorder_and_weights(tmp_path, uninterrupted, where, how):
    """Stopped early, mid-epoch, during validation, or in the last epoch's validation (no epoch left to
    run): the resumed script observes the whole recorder and weights of the run that was never stopped.
    Resumed by `--resume RUN_DIR`; mid-epoch, the script runs as a notebook job (its cells run again and the fit
    resumes); early, the same command starts again with --auto-resume, as a requeued job or a `while` loop."""
    out = tmp_path / "out"
    out.mkdir()
    target = _as_notebook(tmp_path) if how == "notebook" else SCRIPT
    job = tmp_path / "runs" / "job"
    command = ["--cpu", "2", "--seed", "11", *(["--run-dir", job, "--auto-resume"] if how == "auto" else []), target]
    stopped = _run(command, tmp_path, out, f"signal:{where}")
    assert stopped.returncode == 75, stopped.stdout[-2000:] + stopped.stderr[-2000:]
    assert "stopped by a signal; checkpoint" in stopped.stdout
    run_dir = next((tmp_path / "runs").iterdir())
    resumed = _run(command if how == "auto" else ["--resume", run_dir], tmp_path, out, "plain")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    r0, r1 = _ranks(out)
    assert r0["values"] == r1["values"] and len(r0["values"]) == 4
    for got, want in zip(r0["values"], uninterrupted["values"]):
        assert got == pytest.approx(want, abs=1e-5)
    assert r0["losses"] == pytest.approx(uninterrupted["losses"], abs=1e-5)
    assert r0["lrs"] == pytest.approx(uninterrupted["lrs"], abs=1e-9)
    assert r0["weights"] == pytest.approx(uninterrupted["weights"], rel=1e-5)
    assert (run_dir / "probe.executed.ipynb").exists() == (how == "notebook")
    if how == "auto":  # one directory for every start: numbered, the first start's logs kept
        assert "--auto-resume: resuming the job from" in resumed.stderr + resumed.stdout
        assert yaml.safe_load((job / "launch.yaml").read_text())["start"] == 1
        assert (job / "logs" / "start0" / "rank0.log").exists() and (job / "logs" / "rank0.log").exists()
        again = _run(command, tmp_path, out, "plain")  # finished: never resumed again
        assert again.returncode == 2 and "this job has finished already" in again.stderr, again.stderr


def test_a_failure_restarts_and_resumes_from_the_last_epoch(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = _run(["--cpu", "2", "--max-restarts", "1", "--checkpoint-every", "epoch", SCRIPT], tmp_path, out,
                "fail_once")
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = _ranks(out)
    assert r0["attempt"] == 1 and len(r0["values"]) == 4 and r0["n_losses"] == 32
    assert r0["seen"][0] == [2, 17]  # attempt 1 began after epoch 1's checkpoint
    logs = next((tmp_path / "runs").iterdir()) / "logs"
    assert (logs / "rank1.log").is_file() and (logs / "rank1.attempt1.log").is_file()  # attempts kept apart
    assert "rank 1 fails once" in (logs / "rank1.log").read_text()
    kept = sorted(p.name for p in (logs.parent / "checkpoints").glob("epoch*.pt"))
    assert kept == ["epoch0-2.pt", "epoch0-3.pt"]  # the last two
    # the restart is accounted for on the console as it happens, and in the report
    said = [line for line in proc.stderr.splitlines() if line.startswith("fastlaunch: rank 1 failed in attempt 0: ")]
    assert len(said) == 1 and "rank 1 fails once" in said[0], proc.stderr[-3000:]
    assert said[0].endswith("; restarting the ranks (restart 1 of at most 1)")
    assert "fastlaunch: rank 1's traceback:" in proc.stderr and "resume_probe.py" in proc.stderr
    assert "fastlaunch: resuming from " in proc.stdout
    assert json.loads((logs.parent / "report.json").read_text())["restarts"] == 1
    assert "fastlaunch: 1 automatic restart(s) after failures" in proc.stderr


def test_resume_without_checkpoint_is_a_hint_error(tmp_path, capsys):
    from fastlaunch.launcher.cli import main

    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "launch.yaml").write_text(yaml.safe_dump({"script": str(SCRIPT), "script_args": [], "device": "cpu",
                                                     "nproc_per_node": 2}))
    assert main(["--resume", str(run)]) == 2
    err = capsys.readouterr().err
    assert "the run to resume has no checkpoint" in err and "HINT" in err
    assert main(["--resume", str(tmp_path / "nothing")]) == 2
    assert "--resume needs a run directory" in capsys.readouterr().err


def test_a_write_cut_short_leaves_no_checkpoint(tmp_path):
    class Exploding:
        def __reduce__(self):
            raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        checkpoint.write_atomic({"model": torch.zeros(10), "boom": Exploding()}, tmp_path / "checkpoints" / "a.pt")
    assert list((tmp_path / "checkpoints").iterdir()) == []
    checkpoint.save({"fit_index": 0, "epoch": 1, "iter": 0, "n_epoch": 2, "time": 1.0}, tmp_path, "b")
    (tmp_path / "checkpoints" / ".c.pt.123.tmp").write_bytes(b"half")
    assert checkpoint.latest(tmp_path) == tmp_path / "checkpoints" / "b.pt"


def test_sigkill_during_a_large_write_never_leaves_a_partial_file(tmp_path):
    code = (f"import torch; from fastlaunch.checkpoint import write_atomic; from pathlib import Path\n"
            f"write_atomic({{'w': torch.randn(60_000_000)}}, Path({str(tmp_path)!r}) / 'checkpoints' / 'big.pt')\n")
    writer = subprocess.Popen([sys.executable, "-c", code])
    folder = tmp_path / "checkpoints"
    deadline = time.monotonic() + 60
    while not (folder.is_dir() and any(p.name.endswith(".tmp") for p in folder.iterdir())):
        assert time.monotonic() < deadline and writer.poll() is None
        time.sleep(0.01)
    writer.kill()
    writer.wait()
    final = folder / "big.pt"
    assert not final.exists() or torch.load(final)["w"].numel() == 60_000_000
    assert checkpoint.latest(tmp_path) in (None, final)

