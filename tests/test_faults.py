"""Faults: a rank that crashes, signals to the launcher, ports, and what listens. Asserts pids and codes."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest

from conftest import SCRIPTS, only_run_dir, run_fastlaunch

FAULT = SCRIPTS / "fault_probe.py"


def _env(out, fault):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC", "FASTLAUNCH_"))}
    return {**env, "FL_PROBE_OUT": str(out), "FL_FAULT": fault}


def _start(tmp_path, fault, *flags):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    return subprocess.Popen([sys.executable, "-m", "fastlaunch", "--cpu", "2", *flags, str(FAULT)], cwd=tmp_path,
                            env=_env(out, fault), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True), out


def _wait_ready(proc, out, ranks=2, limit=90.0):
    """Wait until every rank trains with its DataLoader worker up; return every process of the job seen.
    A job that already ended (a fast crash on a loaded machine) returns what was seen until then."""
    deadline = time.monotonic() + limit
    seen: dict[int, psutil.Process] = {}
    while time.monotonic() < deadline:
        try:
            for child in psutil.Process(proc.pid).children(recursive=True):
                seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass
        if proc.poll() is not None:
            assert seen, proc.communicate()
            return list(seen.values())
        if all((out / f"ready-rank{r}").exists() for r in range(ranks)) and len(seen) >= 2:
            return list(seen.values())
        time.sleep(0.05)
    raise AssertionError("the ranks never became ready")


def _survivors(procs, limit=5.0):
    """Processes of the job still alive after `limit` seconds (zombies count as gone)."""
    deadline = time.monotonic() + limit
    while True:
        alive = []
        for p in procs:
            try:
                if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


@pytest.mark.parametrize("fault, said", [("raise", "rank 1 gives up"),
                                         ("kill", "Signal 9 (SIGKILL)"),
                                         ("segv", "Signal 11 (SIGSEGV)")])
def test_a_rank_that_dies_stops_the_job_and_is_named(tmp_path, fault, said):
    proc, out = _start(tmp_path, fault)
    procs = _wait_ready(proc, out)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode != 0
    first = [line for line in stderr.splitlines() if " failed (exit code" in line]
    assert first and first[0].startswith("fastlaunch: rank 1 failed") and said in first[0], stderr
    assert not _survivors(procs)
    if fault == "segv":  # the Python stack of the crash is in rank 1's log
        log = (only_run_dir(tmp_path) / "logs" / "rank1.log").read_text()
        assert "Fatal Python error: Segmentation fault" in log and "fault_probe.py" in log


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, 130), (signal.SIGHUP, 129), (signal.SIGTERM, 75),
                                         (signal.SIGKILL, -9)])
def test_signals_to_the_launcher_leave_no_process_behind(tmp_path, sig, status):
    proc, out = _start(tmp_path, "slow", "--grace", "5")
    procs = _wait_ready(proc, out)
    assert len(procs) >= 4  # two ranks and their DataLoader workers
    os.kill(proc.pid, sig)
    proc.communicate(timeout=30)
    assert proc.returncode == status
    assert not _survivors(procs), [p.cmdline()[-3:] for p in _survivors(procs, 0)]


def test_single_node_job_listens_on_loopback_only(tmp_path):
    proc, out = _start(tmp_path, "slow")
    procs = _wait_ready(proc, out)
    listening = []
    for p in [psutil.Process(proc.pid), *procs]:
        try:
            listening += [c.laddr for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
        except psutil.NoSuchProcess:
            pass
    env1 = psutil.Process(procs[0].pid).environ()
    os.killpg(proc.pid, signal.SIGINT)
    proc.communicate(timeout=30)
    assert listening, "the rendezvous store should be listening"
    assert all(addr.ip in ("127.0.0.1", "::1") for addr in listening), listening
    assert env1.get("GLOO_SOCKET_IFNAME") == "lo" and env1.get("NCCL_SOCKET_IFNAME") == "lo"


def test_busy_port_is_a_hint_error_at_once(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_fastlaunch(["--cpu", "2", "--port", port, FAULT], tmp_path, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"fastlaunch: error: --port is already in use on 127.0.0.1 (got {port}). "
                                   "HINT: leave --port out (a free port is taken), or pick another")
    assert not (tmp_path / "runs").exists()


def test_two_jobs_at_once_both_succeed_apart(tmp_path, scripts):
    jobs = []
    for name in ("a", "b"):
        cwd = tmp_path / name
        (cwd / "out").mkdir(parents=True)
        jobs.append((cwd, subprocess.Popen([sys.executable, "-m", "fastlaunch", "--cpu", "2",
                                            str(scripts / "plain_ddp.py")], cwd=cwd, env=_env(cwd / "out", "-"),
                                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    ports = set()
    for cwd, job in jobs:
        _, stderr = job.communicate(timeout=120)
        assert job.returncode == 0, stderr
        import json
        ranks = [json.loads((cwd / "out" / f"rank{r}.json").read_text()) for r in range(2)]
        assert [r["total"] for r in ranks] == [3.0, 3.0]  # each job reduced over its own two ranks only
        ports.add(ranks[0]["MASTER_PORT"])
    assert len(ports) == 2


@pytest.mark.parametrize("fault, said", [
    ("sleep", "rank 1 hung: no progress for"),
    ("spin", "rank 1 hung: no progress for"),
    ("late", "rank 1 hung: never reached the process group"),
])
def test_a_hung_rank_is_named_with_its_stack_and_the_job_stopped(tmp_path, fault, said):
    proc, out = _start(tmp_path, fault, "--hang-timeout", "4")
    procs = _wait_ready(proc, out, ranks=0 if fault == "late" else 1)
    _, stderr = proc.communicate(timeout=4 + 30)  # the hang timeout, plus the watch and the teardown
    assert proc.returncode == 1
    assert said in stderr, stderr
    if fault != "late":
        assert "last event: Fault.after_batch (epoch 0, batch 2)" in stderr
        assert "most recent call first" in stderr and "fault_probe.py" in stderr
    assert not _survivors(procs)


def test_rank_zero_extracting_longer_than_the_hang_timeout_is_not_a_hang(tmp_path):
    import tarfile

    src = tmp_path / "src" / "data"
    src.mkdir(parents=True)
    (src / "x.txt").write_text("x")
    archive = tmp_path / "data.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="data")
    out = tmp_path / "out"
    out.mkdir()
    env = {**_env(out, "extract"), "FL_ARCHIVE": str(archive)}
    proc = subprocess.run([sys.executable, "-m", "fastlaunch", "--cpu", "2", "--hang-timeout", "3", str(FAULT)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "hung" not in proc.stderr


def _run_lingering(tmp_path, fault, linger):
    """The fault probe on 2 ranks with rank 1 lingering after its failure; (the launcher, every process of the
    job seen, the launcher's stderr). The communicate timeout is a hang guard only."""
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "fastlaunch", "--cpu", "2", str(FAULT)], cwd=tmp_path,
                            env={**_env(out, fault), "FL_LINGER": linger}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    procs = _wait_ready(proc, out, ranks=0)
    try:
        _, stderr = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return proc, procs, stderr


@pytest.mark.parametrize("fault, linger, said", [
    ("raise", "atexit", "rank 1 gives up"),
    ("loss", "atexit", "rank 1's loss function fails"),
    ("worker", "atexit", "rank 1's DataLoader worker fails"),
    ("transform", "atexit", "rank 1's batch transform fails"),
    ("before_fit", "atexit", "rank 1 fails in before_fit"),
    ("validation", "atexit", "rank 1 fails during validation"),
    ("after_fit", "thread", "rank 1 fails in after_fit"),
    ("stop", "atexit", "rank 1 fails on the agreed stop"),
])
def test_a_failure_that_lingers_still_ends_the_job_at_once(tmp_path, fault, linger, said):
    """The failing rank would live for an hour (an atexit handler, a non-daemon thread) while rank 0 waits
    for it in a collective: the failure record alone ends the job. The communicate timeout is a hang
    guard only; without the failure watch the job ends after the hour."""
    proc, procs, stderr = _run_lingering(tmp_path, fault, linger)
    first = [line for line in stderr.splitlines() if " failed (exit code" in line]
    assert first and first[0].startswith("fastlaunch: rank 1 failed (exit code 1)") and said in first[0], stderr
    assert "fastlaunch: rank 1's traceback:" in stderr and "fault_probe.py" in stderr
    assert "rank 0 stopped as a consequence" in stderr or "rank 0 failed" not in stderr
    assert "rank 0 is missing from the report" not in stderr  # the culprit is named, not every rank
    assert proc.returncode == 1
    assert not _survivors(procs, limit=10)


def test_sigterm_with_a_stuck_rank_writes_no_checkpoint_and_does_not_claim_75(tmp_path):
    """Rank 1 sleeps inside a callback: the ranks never reach the agreed stop, no checkpoint is written,
    and the launcher says so instead of asking for a requeue (75)."""
    proc, out = _start(tmp_path, "sleep", "--grace", "5", "--hang-timeout", "0")
    procs = _wait_ready(proc, out, ranks=2)
    deadline = time.monotonic() + 90
    while not (out / "sleeping-rank1").exists():  # rank 1 is in its long sleep, rank 0 waits for it
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert ("fastlaunch: no checkpoint was written before the ranks stopped (outside a fit, or a rank did not "
            "reach the agreed stop within --grace): exit status 143, not 75") in stderr
    assert not _survivors(procs)


def test_a_stopped_rank_is_named_and_the_report_says_why_it_has_no_stack(tmp_path):
    proc, out = _start(tmp_path, "sigstop", "--hang-timeout", "4")
    procs = _wait_ready(proc, out, ranks=1)
    _, stderr = proc.communicate(timeout=4 + 30)
    assert proc.returncode == 1
    assert "fastlaunch: rank 1 hung: no progress for" in stderr
    assert "its process is stopped (SIGSTOP, or a debugger holds it), so no stack could be taken" in stderr
    assert "its stack (from" not in stderr
    assert not _survivors(procs)


@pytest.mark.parametrize("fault, status, said", [("exit", 3, "SystemExit: 3"), ("caught", 1, "rank 1 gives up")])
def test_a_rank_that_leaves_the_fit_alone_is_named_and_the_job_ends(tmp_path, fault, status, said):
    """sys.exit(3) inside a fit while an atexit handler lingers, or an exception the script catches and
    carries on past: the peer waits in the all-reduce; the rank that left is named (never the waiting one),
    with its own status, within the hang guard (no hang timeout: --hang-timeout stays 600 s)."""
    proc, procs, stderr = _run_lingering(tmp_path, fault, "atexit")
    first = [line for line in stderr.splitlines() if " failed (exit code" in line]
    assert first and first[0].startswith(f"fastlaunch: rank 1 failed (exit code {status})") and said in first[0], stderr
    assert "hung" not in stderr and "rank 0 failed" not in stderr and "To enable traceback" not in stderr
    assert proc.returncode == status
    assert not _survivors(procs, limit=10)


def test_the_same_error_on_every_rank_caught_by_the_script_goes_on_as_in_one_process(tmp_path):
    """Every rank raises the same error in the fit and the script catches it: training goes on as in one
    process and the job succeeds (uncaught, the blame is test_logs_engine's: never a stopped rank, never 75)."""
    proc, out = _start(tmp_path, "everywhere_caught")
    stdout, stderr = proc.communicate(timeout=150)
    assert proc.returncode == 0, stderr
    assert "rank 0 caught:" in stdout and "rank 0 gives up like every rank" in stdout, stdout
