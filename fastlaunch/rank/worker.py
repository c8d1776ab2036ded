"""Per-rank bootstrap: `python -m fastlaunch.rank.worker SCRIPT ARGS...`, started by the engine on every rank."""
from __future__ import annotations

import os
import sys

if os.environ.get("FASTLAUNCH_RUN_DIR"):
    # The engine opened stdout and stderr on the same log file: share one offset so neither overwrites.
    os.dup2(1, 2)

import faulthandler  # noqa: E402

faulthandler.enable()  # a crash in native code (SIGSEGV, SIGABRT) still leaves its Python stack in the log

import atexit  # noqa: E402
import ctypes  # noqa: E402
import importlib.util  # noqa: E402
import runpy  # noqa: E402
import signal  # noqa: E402
import traceback  # noqa: E402

from ..config import STOPPED_BY_SIGNAL  # noqa: E402
from .failure import record_failure  # noqa: E402
from .output_guard import guard_output  # noqa: E402

__all__ = ["main", "arm_parent_death"]

_PR_SET_PDEATHSIG = 1
_KERNEL_FILE = os.path.join(os.path.dirname(__file__), "kernel.py")


def arm_parent_death(expected_parent: int | None) -> None:
    """Die with the launcher, even on SIGKILL; re-armed in forked children (DataLoader workers)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)

    def _arm():
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)

    _arm()
    os.register_at_fork(after_in_child=_arm)  # a fork clears the parent-death signal
    if expected_parent and os.getppid() != expected_parent:  # the launcher died before we armed
        os._exit(1)


def stop_signal_handler(ctx):
    """SIGTERM/SIGUSR1: inside a distributed fit, ask every rank to stop at one batch and checkpoint;
    elsewhere, leave now with the 'stopped by a signal' status."""
    def on_stop_signal(signum, frame) -> None:
        channel = ctx.active_stop()
        if channel is None:
            raise SystemExit(STOPPED_BY_SIGNAL)
        from .stopchannel import Preempted  # loaded already: a channel exists

        channel.request(Preempted)

    return on_stop_signal


def _exit_code(code: object) -> int:
    """SystemExit's code as an exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def _run_script(script: str, args: list[str], ctx) -> int:
    """Run the user's script as __main__ with its own argv; return its exit status."""
    from ..errors import UsageError

    sys.argv = [script, *args]
    try:
        if os.path.abspath(script) == os.path.abspath(_KERNEL_FILE):  # a notebook session's rank (kernel.py)
            from .kernel import serve

            os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # the kernel's debugger: no notes in logs
            serve(ctx, args[0])
            return 0
        sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
        if script.endswith(".ipynb"):  # a notebook as a job: its cells in order (notebook.py)
            from .notebook import run_notebook

            run_notebook(script, args, ctx.env.run_dir, ctx.is_rank_zero)
        else:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return _exit_code(exc.code)
    except UsageError as exc:  # a mistake the user made (e.g. an unshardable DataLoader): one line
        record_failure(exc, exc.exit_code)
        print(exc, file=sys.stderr)
        return exc.exit_code
    except BaseException as exc:
        # the record first: the engine's SIGTERM to the peers of a failed rank may reach this one while it
        # prints, and from then on it is a failure, not a rank stopped by a signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        record_failure(exc, 1)
        traceback.print_exc()
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    """Bootstrap this rank, run the script, tear down; return the script's status."""
    argv = sys.argv[1:] if argv is None else argv
    from .context import RankContext
    from ..device import rank_device
    from ..env import DistEnv
    from ..heartbeat import open_slot
    from .seeding import seed_everything

    denv = DistEnv.from_environ()
    launcher_pid = os.environ.get("FASTLAUNCH_LAUNCHER_PID")
    arm_parent_death(int(launcher_pid) if launcher_pid else None)
    faulthandler.register(signal.SIGUSR2, all_threads=True)  # the launcher asks a hung rank for its stack
    ctx = RankContext(denv, open_slot(denv.run_dir, denv.local_rank, denv.rank))
    ctx.beats.follow(ctx.site)  # the callback running now, published twice a second for the hang watch
    guard_output(ctx.beats)  # a full disk drops the log's output, not the training
    for sig in (signal.SIGTERM, signal.SIGUSR1):  # the engine forwards these: stop at an agreed batch
        signal.signal(sig, stop_signal_handler(ctx))
    from .patching import Installation
    from .torch_patches import TORCH_PATCHES

    Installation(TORCH_PATCHES, ctx)  # for the life of the rank: a script's init joins fastlaunch's group
    rank_device(denv.device_type, denv.local_rank)  # fastai's default_device() is now this rank's GPU
    if denv.seed is not None:
        seed_everything(denv.seed)
    if denv.rank != 0:
        os.environ["WANDB_MODE"] = "disabled"  # wandb.init() in a script would open one run per rank
    from ..quiet import quiet_dependency_warnings

    quiet_dependency_warnings()  # fastai's import and DataFrame tensors: noise the user cannot act on
    if importlib.util.find_spec("fastai") is not None:
        from .integrate import install

        # Nothing of fastai is imported here: each patch applies when the script imports its module (an
        # unsupported fastai is refused at that import, one line with a HINT); a plain PyTorch script
        # never loads fastai.
        install(ctx)
    status = 1
    try:
        status = _run_script(argv[0], argv[1:], ctx)
    finally:
        try:
            ctx.comm.shutdown()  # without this a gloo rank can exit by SIGABRT after an uncaught exception
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
    return status


def _exit(status: int) -> None:
    """Run the script's atexit handlers, flush, and leave without native static destructors: a gloo
    thread left joinable at interpreter teardown aborts the process (SIGABRT) after a clean run."""
    try:
        atexit._run_exitfuncs()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


if __name__ == "__main__":
    _exit(main())
