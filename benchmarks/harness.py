"""Runs the peers interleaved (A B A B ...) and measures each run from the files its ranks write."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
WORK = HERE / "workloads"


def peer_commands(ranks: int, device: str) -> dict[str, tuple[list[str], dict]]:
    """name -> (argv, extra env). `device` is "cpu" or "gpu" (ranks are CPU processes or GPUs)."""
    py = sys.executable
    fl = [py, "-m", "fastlaunch", f"--{device}", str(ranks)]
    tr = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    fastai, floor = str(WORK / "fastai_cnn.py"), str(WORK / "ddp_floor.py")
    return {
        "fastlaunch": (fl + [fastai], {}),
        "fastlaunch, no instrumentation": (fl + ["--no-instrument", fastai], {}),
        "torchrun + hand-wrapped fastai": (tr + [fastai], {"BENCH_WRAP": "1"}),
        "torchrun + PyTorch DDP loop (floor)": (tr + [floor], {}),
    }


def tiny_commands(ranks: int, device: str) -> dict[str, tuple[list[str], dict]]:
    """The tiny step's peers (section 7), the same launchers on the 1-layer workloads."""
    py = sys.executable
    fl = [py, "-m", "fastlaunch", f"--{device}", str(ranks)]
    tr = [py, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    tiny, floor = str(WORK / "tiny_step.py"), str(WORK / "ddp_floor.py")
    return {
        "fastlaunch": (fl + [tiny], {}),
        "fastlaunch, no instrumentation": (fl + ["--no-instrument", tiny], {}),
        "torchrun + hand-wrapped fastai": (tr + [tiny], {"BENCH_WRAP": "1"}),
        "torchrun + PyTorch DDP loop": (tr + [floor], {"BENCH_TINY": "1"}),
        "fastlaunch + PyTorch DDP loop": (fl + [floor], {"BENCH_TINY": "1"}),
    }


def _env(out: Path, tag: str, extra: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC", "FASTLAUNCH_"))}
    env.update(OMP_NUM_THREADS="1", BENCH_OUT=str(out), BENCH_TAG=tag, PYTHONHASHSEED="0", **extra)
    return env


def _why(output: str) -> str:
    """The line of a failed run that says why: a rank's own exception, else the launcher's exit code line."""
    lines = [line.strip() for line in output.splitlines() if line.strip().strip("=-")]
    raised = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)
              and "ChildFailedError" not in line]
    codes = [line for line in lines if "exitcode" in line or "exit code" in line]
    return ((raised or codes or lines or ["no output"])[-1])[:300]


def _most(ranks: list[dict], key: str) -> float | None:
    """The slowest rank's figure (None where no rank wrote it)."""
    got = [r[key] for r in ranks if r.get(key) is not None]
    return max(got) if got else None


def run_once(argv: list[str], extra: dict, items: int, timeout: float = 600) -> dict:
    """One launch: launch-to-first-step, samples/s and steps/s (rank 0), CPU per step and peak RSS (the
    highest of the ranks), rank 0's counts, hook costs and profile where it wrote them, exit status."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        start = time.time()
        try:
            proc = subprocess.run(argv, cwd=tmp, env=_env(out, "run", {"BENCH_ITEMS": str(items), **extra}),
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"ok": False, "error": f"did not end within {timeout:.0f} s"}
        ranks = [json.loads(p.read_text()) for p in sorted(out.glob("run-rank*.json"))]
        why = f"exit {proc.returncode}: {_why(proc.stderr + proc.stdout)}"
        # torch's gloo can abort a rank at interpreter teardown ("terminate called without an active exception")
        # after a clean run: with every rank's results written, the figures stand and the abort is reported.
        complete = bool(ranks) and len(ranks) == ranks[0].get("world")
        if proc.returncode != 0 and not (complete and "SIGABRT" in proc.stderr + proc.stdout):
            return {"ok": False, "error": why}
        if not ranks:
            return {"ok": False, "error": f"{why} (no rank wrote its results)"}
        aborted = f"every rank wrote its results, then aborted at exit ({why}); its figures are kept"
        return {"ok": True, "aborted": aborted if proc.returncode else None, "hooks": ranks[0].get("hooks"),
                "first_step": min(r["first_step"] for r in ranks) - start,
                "samples_per_s": ranks[0]["samples_per_s"], "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks),
                "steps_per_s": ranks[0].get("steps_per_s"), "cpu_ms_per_step": _most(ranks, "cpu_ms_per_step"),
                "process_cpu_ms_per_step": _most(ranks, "process_cpu_ms_per_step"), "profile": ranks[0].get("profile"),
                "counts": {k: ranks[0][k] for k in ("collectives_per_step", "syncs_per_step", "syncs", "probe_steps",
                                                    "probe_syncs_per_step", "probe_collectives_per_step",
                                                    "probe_host_reads_per_step", "probe_detail") if k in ranks[0]}}


def fault_to_exit(argv: list[str], extra: dict, items: int) -> dict:
    """Seconds from rank 1's crash to the launcher's exit ("seconds"); a failure where rank 1 never crashed."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        proc = subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=300,
                              env=_env(out, "run", {"BENCH_ITEMS": str(items), "BENCH_CRASH": "1", **extra}))
        end = time.time()
        crash = out / "crash_time"
        if not crash.exists():
            return {"ok": False, "error": f"exit {proc.returncode}, no crash: {_why(proc.stderr + proc.stdout)}"}
        return {"ok": True, "seconds": end - float(crash.read_text())}


def left_after_sigkill(argv: list[str], extra: dict, items: int, wait: float = 5.0) -> dict:
    """Processes of the job still alive `wait` seconds after SIGKILL of the launcher ("left")."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        proc = subprocess.Popen(argv, cwd=tmp, env=_env(out, "run", {"BENCH_ITEMS": str(items * 8), **extra}),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.time() + 120
        while not list(out.glob("started-rank*")):
            if time.time() > deadline or proc.poll() is not None:
                proc.kill()
                return {"ok": False, "error": f"no rank started a step (exit {proc.wait()})"}
            time.sleep(0.05)
        procs = psutil.Process(proc.pid).children(recursive=True)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        time.sleep(wait)
        alive = [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        for p in alive:  # leave the machine clean after counting
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        return {"ok": True, "left": len(alive)}
