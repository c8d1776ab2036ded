"""Slurm: detection from environment dicts, node lists, addresses, job scripts, and real jobs."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types

import pytest

from conftest import REPO, SCRIPTS
from fastlaunch.launcher.cli import main
from fastlaunch.tools.cluster.slurm import (SbatchSpec, job_port, node_addr, parse_nodelist, render_sbatch,
                                      rendezvous_endpoint)
from fastlaunch.device import GpuProbe
from fastlaunch.env import SlurmFacts
from fastlaunch.errors import UsageError
from fastlaunch.launcher.options import DEFAULTS
from fastlaunch.launcher.resolve import build_config

GOLDEN = REPO / "tests" / "golden" / "slurm_2nodes_8gpus.sbatch"
STEP = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_NODEID": "1", "SLURM_JOB_NODELIST": "gpu[01-02]",
        "SLURM_NTASKS": "2", "SLURM_STEP_ID": "0", "SLURM_GPUS_ON_NODE": "4", "SLURM_PROCID": "1"}


@pytest.mark.parametrize("nodelist, hosts", [
    ("gpu[01-04,07]", ["gpu01", "gpu02", "gpu03", "gpu04", "gpu07"]),
    ("n[1-2]", ["n1", "n2"]),
    ("a1,b[8-10],c", ["a1", "b8", "b9", "b10", "c"]),
    ("rack[1-2]-node[01-02]", ["rack1-node01", "rack1-node02", "rack2-node01", "rack2-node02"]),
    ("single", ["single"]),
])
def test_parse_nodelist(nodelist, hosts):
    assert parse_nodelist(nodelist) == hosts


def _runner(stdout, returncode=0):
    calls = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        return types.SimpleNamespace(stdout=stdout, returncode=returncode)
    return run, calls


def test_node_address_from_scontrol():
    run, calls = _runner("NodeName=gpu01 Arch=x86_64 CoresPerSocket=2\n   NodeAddr=10.1.2.3 NodeHostName=gpu01\n")
    assert node_addr("gpu01", run) == "10.1.2.3"
    assert calls == [["scontrol", "show", "node", "gpu01"]]


def test_endpoint_uses_first_node_and_job_port_with_fallbacks():
    facts = SlurmFacts.from_environ(STEP)
    run, calls = _runner("NodeAddr=10.9.9.9")
    assert rendezvous_endpoint(facts, run) == f"10.9.9.9:{job_port(4242)}"
    assert calls[0][-1] == "gpu01"
    failing, _ = _runner("", returncode=1)
    with_launch_ip = SlurmFacts.from_environ({**STEP, "SLURM_LAUNCH_NODE_IPADDR": "10.0.0.7"})
    assert rendezvous_endpoint(with_launch_ip, failing) == f"10.0.0.7:{job_port(4242)}"
    assert job_port(4242) == job_port(4242) and 1024 < job_port(99_999_999) < 65536


def test_slurm_facts():
    facts = SlurmFacts.from_environ(STEP)
    assert (facts.job_id, facts.nnodes, facts.node_id, facts.ntasks, facts.in_step, facts.gpus_on_node) == \
        (4242, 2, 1, 2, True, 4)
    assert SlurmFacts.from_environ({}) is None
    assert not SlurmFacts.from_environ({"SLURM_JOB_ID": "1"}).in_step  # the batch script is not a task


def _config(tmp_path, environ, **opts):
    script = tmp_path / "train.py"
    script.write_text("")
    given = set(opts)
    return build_config({**DEFAULTS, **opts}, given, str(script), [], probe=lambda: GpuProbe(4), cores=8,
                        environ=environ, resolve_endpoint=lambda facts: "10.9.9.9:24242")


def test_slurm_task_fills_in_nodes_and_rendezvous(tmp_path):
    cfg = _config(tmp_path, STEP, gpus=4)
    assert (cfg.min_nodes, cfg.max_nodes, cfg.node_rank) == (2, 2, 1)
    assert (cfg.rdzv_endpoint, cfg.rdzv_id) == ("10.9.9.9:24242", "slurm-4242")
    assert cfg.seed == _config(tmp_path, {**STEP, "SLURM_NODEID": "0"}, gpus=4).seed  # every node alike


def test_slurm_mistakes_are_hint_errors(tmp_path):
    with pytest.raises(UsageError, match="more GPUs than Slurm allocated.*SLURM_GPUS_ON_NODE=4.*HINT"):
        _config(tmp_path, STEP, gpus=8)
    with pytest.raises(UsageError, match="batch script of a multi-node allocation.*HINT: start it with srun"):
        _config(tmp_path, {k: v for k, v in STEP.items() if k != "SLURM_STEP_ID"}, gpus=4)
    with pytest.raises(UsageError, match="one Slurm task per node.*SLURM_NTASKS=16"):
        _config(tmp_path, {**STEP, "SLURM_NTASKS": "16"}, gpus=4)


def test_one_node_allocation_runs_as_one_node(tmp_path):
    cfg = _config(tmp_path, {**STEP, "SLURM_NNODES": "1", "SLURM_NTASKS": "1", "SLURM_NODEID": "0"}, gpus=4)
    assert not cfg.multi_node and cfg.rdzv_endpoint is None


def test_rendered_job_matches_golden_and_is_valid_bash(tmp_path):
    spec = SbatchSpec(nodes=2, ranks_per_node=8, use_gpus=True, time="2:00:00", script="train.py",
                      script_args=("--epochs", "5", "a b"), python="/opt/venv/bin/python",
                      workdir="/home/me/project", job_name="train", partition="gpu", cpus_per_rank=6, grace=120,
                      launcher_flags=("--precision", "bf16"))
    text = render_sbatch(spec)
    assert text == GOLDEN.read_text()
    job = tmp_path / "job.sbatch"
    job.write_text(text)
    assert subprocess.run(["bash", "-n", str(job)]).returncode == 0
    for needed in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                   '--cpus-per-task="$SLURM_CPUS_PER_TASK"', "#SBATCH --signal=USR1@120",
                   'scontrol requeue "$SLURM_JOB_ID"', "--gpus 8 --precision bf16 --run-dir \"runs/slurm-${SLURM_JOB_ID}\" --auto-resume train.py --epochs 5 'a b'"):
        assert needed in text


def test_slurm_command_prints_the_script_and_refuses_bad_input(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fastlaunch.tools.cluster.slurm_command.probe_partition", lambda partition: None)  # GPU nodes
    (tmp_path / "train.py").write_text("")
    assert main(["slurm", "--nodes", "2", "--gpus", "8", "--time", "2:00:00", "train.py", "--lr", "1e-3"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("#!/usr/bin/env bash") and "train.py --lr 1e-3" in out
    for argv, what in ([["--nodes", "2", "--gpus", "8", "--time", "soon", "train.py"], "--time is not a Slurm time"],
                       [["--nodes", "2", "--time", "1:00:00", "train.py"], "ranks per node not given"],
                       [["--nodes", "0", "--cpu", "1", "--time", "5", "train.py"], "--nodes must be at least 1"],
                       [["--gpus", "1", "--time", "5", "missing.py"], "script not found"]):
        assert main(["slurm", *argv]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and what in err[0] and "HINT:" in err[0]


def _job_field(job_id: str, field: str) -> str:
    shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, timeout=30).stdout
    return next((part.split("=", 1)[1] for part in shown.split() if part.startswith(f"{field}=")), "")


@pytest.mark.parametrize("nodes, ranks", [(1, "2"), (2, "1")])
def test_a_job_stopped_by_usr1_requeues_itself_and_resumes_to_the_uninterrupted_weights(
        tmp_path, slurm_cluster, uninterrupted, nodes, ranks):
    """USR1 mid-epoch (as before a time limit): every node stops with a checkpoint, the job requeues itself,
    the requeued start finds the checkpoint in runs/slurm-<id>/ and resumes mid-epoch, and the job ends with the
    weights of a run never stopped. On two nodes rank 0 also lingers after its script on the first start (a
    teardown that ignores SIGTERM), so node 1's launcher exits 75 first and srun ends the step, killing node 0's
    launcher after KillWait: srun's status is not 75, and the marker the launchers leave still requeues the job."""
    out = tmp_path / "out"
    out.mkdir()
    job = subprocess.run([sys.executable, "-m", "fastlaunch", "slurm", "--nodes", str(nodes), "--cpu", ranks,
                          "--seed", "11", "--time", "10:00", "--cpus-per-rank", "1", str(SCRIPTS / "resume_probe.py")],
                         capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert job.returncode == 0, job.stderr
    (tmp_path / "job.sbatch").write_text(job.stdout)
    env = {**os.environ, "FL_PROBE_OUT": str(out), "FL_MODE": "slow", "FL_HOLD_FOR_SIGNAL": "1",
           **({"FL_SLOW_EXIT_RANK0": "1"} if nodes == 2 else {})}
    sub = subprocess.run(["sbatch", "--parsable", "--export=ALL", "job.sbatch"], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env=env)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    logs = lambda: "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))  # noqa: E731
    try:
        deadline = time.monotonic() + 240
        while not all((out / f"ready-rank{r}").exists() for r in range(2)):  # both ranks mid-epoch
            assert time.monotonic() < deadline, _job_field(job_id, "JobState")
            time.sleep(0.2)
        subprocess.run(["scancel", "--signal=USR1", job_id], check=True, timeout=30)
        deadline = time.monotonic() + 400
        hurried = False
        while _job_field(job_id, "JobState") != "COMPLETED":
            state = _job_field(job_id, "JobState")
            assert state not in ("FAILED", "CANCELLED", "TIMEOUT"), state + logs()
            assert time.monotonic() < deadline, "the job never completed: " + state + logs()
            if state == "PENDING" and _job_field(job_id, "Restarts") not in ("", "0") and not hurried:
                # Slurm holds a requeued job back for 2 minutes (its begin time); an admin may let it start
                # sooner, though not at once (the nodes are still cleaning up the first start)
                hurried = subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now+8"],
                                         timeout=30).returncode == 0
            time.sleep(0.5)
        assert _job_field(job_id, "Restarts") == "1"
        assert not list(tmp_path.glob(".fastlaunch-stopped-*"))  # the job script removed its marker
    finally:
        subprocess.run(["scancel", job_id], timeout=30)
    run_dir = tmp_path / "runs" / f"slurm-{job_id}" / ("node0" if nodes == 2 else "")
    assert (run_dir / "checkpoints" / "preempt.pt").exists() and (run_dir / "logs" / "start0").is_dir()
    assert "--auto-resume: resuming the job from" in logs()
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["seen"][0][0] == 1 and r0["weights"] == r1["weights"]  # resumed in epoch 1, where it stopped
    assert r0["weights"] == pytest.approx(uninterrupted["weights"], rel=1e-5)
    if nodes == 2:  # rank 0's node reports the whole world; node 1 its own rank
        assert "this is node 0" in logs() and "this is node 1" in logs()
        reports = {tuple(json.loads((d / "report.json").read_text())["ranks"]): (d / "logs" / "rank0.log").exists()
                   for d in (tmp_path / "runs" / f"slurm-{job_id}").glob("node*")}
        assert reports == {(0, 1): True, (1,): False}, reports


def _fake_sinfo(stdout: str, returncode: int = 0):
    def run(cmd, **kwargs):
        assert cmd[0] == "sinfo"
        return subprocess.CompletedProcess(cmd, returncode, stdout, "")
    return run


def test_the_partition_is_read_from_sinfo_smallest_node_first():
    from fastlaunch.tools.cluster.partition import NodeShape, probe_partition

    run = _fake_sinfo("64 gpu:a100:8 512000\n32 gpu:4(S:0-1) 256000+\n")
    assert probe_partition("gpu", run) == NodeShape(cores=32, gpus=4, memory_mb=256000)
    assert probe_partition(None, _fake_sinfo("", 1)) is None  # Slurm not reachable: nothing checked


@pytest.mark.parametrize("flags, ok, said", [
    (["--cpu", "1"], True, "--cpus-per-task=2"),  # default: the node's 2 cores for its one rank
    (["--cpu", "2"], True, "--cpus-per-task=2"),
    (["--cpu", "2", "--cpus-per-rank", "4"], False, "HINT: use --cpus-per-rank 1"),
    (["--cpu", "3"], False, "HINT: use at most 2 ranks per node"),
    (["--gpus", "1"], False, "nodes have fewer GPUs than the job asks"),
])
def test_an_ask_the_partition_can_never_meet_is_refused_before_submission(tmp_path, slurm_cluster, flags, ok, said):
    proc = subprocess.run([sys.executable, "-m", "fastlaunch", "slurm", "--nodes", "2", "--time", "10:00", *flags,
                           str(SCRIPTS / "fastai_probe.py")], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    if ok:
        assert proc.returncode == 0 and said in proc.stdout, proc.stderr
    else:
        assert proc.returncode == 2 and said in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
