"""A rank of an interactive notebook session: an IPython kernel (ipykernel) that runs the notebook's cells.

The notebook's `%fastlaunch` starts the launcher with this file as its script; the worker sees it and calls
`serve` after the usual bootstrap (process group, patches, device, seed), so every cell runs with what a
script gets. Each rank's kernel listens on ipc sockets in the private folder the session made (mkdtemp:
this user's alone) and writes its connection file and a ready record (pid, file) there; the notebook's
kernel (fastlaunch/session/) connects to every rank with jupyter_client, removes the connection files (the
keys stay in memory only), sends each cell to all, and shows rank 0's messages. Every rank echoes its
output into its own log as well.

SIGINT (the notebook's interrupt button, sent to every rank) inside a distributed fit asks the stop channel
for an agreed interrupt (stopchannel.Interrupted); anywhere else it raises KeyboardInterrupt at once.
"""
from __future__ import annotations

import json
import os
import signal
import stat
import sys
from pathlib import Path
from typing import Any

from ..errors import UsageError
from ..notebooks import RANK_HELPERS, ready_path

__all__ = ["serve", "facts", "free", "private_folder", "fresh_connection_file"]


def _interrupt_handler(ctx):
    def on_interrupt(signum, frame) -> None:
        channel = ctx.active_stop()
        if channel is None:
            raise KeyboardInterrupt
        from .stopchannel import Interrupted

        channel.request(Interrupted)

    return on_interrupt


def _notebook_progress_bars() -> None:
    """Where fastai was imported before the kernel existed, fastprogress chose console bars: switch to the HTML
    bars a notebook shows (rank 0's are relayed live)."""
    try:
        import fastprogress.fastprogress as fp
    except ImportError:
        return
    fp.master_bar, fp.progress_bar = fp.NBMasterBar, fp.NBProgressBar
    progress = sys.modules.get("fastai.callback.progress")
    if progress is not None:
        progress.master_bar, progress.progress_bar = fp.NBMasterBar, fp.NBProgressBar  # type: ignore[attr-defined]


def facts(ctx) -> dict:
    """This rank's figures after a cell: fits so far, device, memory (CUDA allocated/reserved, else RSS)."""
    from .instrument.memory import sample

    out: dict[str, Any] = {"rank": ctx.env.rank, "pid": os.getpid(), "device": str(ctx.env.device_type),
                           "fits": ctx.fits_opened}
    mem = sample(ctx.env.device_type, ctx.env.local_rank)
    out["allocated_mb"] = round(mem.get("cuda_allocated_mb", mem.get("rss_mb", 0.0)), 1)
    out["reserved_mb"] = round(mem.get("cuda_reserved_mb", mem.get("rss_mb", 0.0)), 1)
    out["memory"] = "CUDA" if "cuda_reserved_mb" in mem else "RSS"
    return out


def free(ctx) -> dict:
    """`%fastlaunch free` on this rank: collect garbage, return cached CUDA blocks; the figures after."""
    import gc

    gc.collect()
    if ctx.env.device_type == "cuda":
        import torch

        torch.cuda.empty_cache()
    return facts(ctx)


def private_folder(folder: Path) -> Path:
    """The session's kernel folder, checked: a directory (not a link), this user's, closed to everyone else
    (the session makes it with mkdtemp); anything else is refused, never used."""
    try:
        info = os.lstat(folder)
    except OSError as err:
        raise UsageError("the session's kernel folder is missing", f"{folder}: {err.strerror}",
                         "start the session with `%fastlaunch`, which makes the folder") from None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise UsageError("the session's kernel folder is not a private directory of this user",
                         f"{folder} (owner uid {info.st_uid}, mode {stat.filemode(info.st_mode)})",
                         "start the session with `%fastlaunch`, which makes a fresh private folder")
    return folder


def fresh_connection_file(where: Path, rank: int) -> Path:
    """Where this rank's kernel writes its connection file: nothing may be there yet, since ipykernel adopts a
    file it finds (and the key in it)."""
    connection = where / f"rank{rank}.kernel.json"
    if os.path.lexists(connection):
        raise UsageError("the session's kernel folder already holds a connection file", str(connection),
                         "start the session again (`%fastlaunch restart`): each session makes a fresh folder")
    return connection


def serve(ctx, folder: str) -> None:
    """Run this rank's kernel until the session shuts it down."""
    from ipykernel.ipkernel import IPythonKernel
    from ipykernel.kernelapp import IPKernelApp

    on_interrupt = _interrupt_handler(ctx)
    ctx.comm.ensure_group()  # torch.distributed answers in the first cell, as under a script's fit

    class RankKernel(IPythonKernel):
        def pre_handler_hook(self):  # ipykernel makes SIGINT raise at once; a fit must stop at an agreed batch
            self.saved_sigint_handler = signal.signal(signal.SIGINT, on_interrupt)

    where = private_folder(Path(folder))
    connection = fresh_connection_file(where, ctx.env.rank)
    # ipc transport: each channel is a socket file in the private folder, which no other local user can
    # open (TCP on 127.0.0.1 would let any of them subscribe to every cell's output). quiet=False: every
    # rank's output is echoed into its log; parent_handle: no console banner.
    app = IPKernelApp.instance(kernel_class=RankKernel, connection_file=str(connection), transport="ipc",
                               ip=str(where / f"rank{ctx.env.rank}"), parent_handle=1, quiet=False,
                               capture_fd_output=False, log_level="ERROR")
    app.initialize([])
    shell: Any = app.shell
    shell.user_ns["__name__"] = "__main__"
    helpers = {RANK_HELPERS: {"facts": lambda: facts(ctx), "free": lambda: free(ctx)}}
    shell.user_ns.update(helpers)
    shell.user_ns_hidden.update(helpers)
    sys.path.insert(0, os.getcwd())  # the notebook's folder: its own modules import as they would there
    _notebook_progress_bars()
    try:
        shell.enable_matplotlib("inline")
    except Exception:  # no matplotlib: nothing to draw
        pass
    # The launcher stops a session's ranks with SIGTERM (another rank died, the session ends): a kernel would
    # catch the SystemExit a job's handler raises and live on, so die of the signal (the launcher then counts
    # this rank as stopped, not as the cause).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ready = ready_path(where, ctx.env.rank)
    tmp = ready.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "connection_file": str(connection)}))
    os.replace(tmp, ready)
    app.start()
