"""The rank's changes to torch, applied by the worker before the script runs (with or without fastai)."""
from __future__ import annotations

import signal

from .patching import patch

__all__ = ["TORCH_PATCHES"]


@patch("torch.distributed.init_process_group")
def init_joins_fastlaunch_group(ctx, p) -> None:
    """A script's own init_process_group reuses the group fastlaunch already started (never init twice)
    and otherwise joins this restart attempt's store (never an old attempt's addresses)."""
    import torch.distributed as dist

    p.set(dist, "init_process_group", ctx.comm.guarded_init())


@patch("torch.utils.data._utils.signal_handling._set_worker_signal_handlers")
def dataloader_workers_ignore_stop_signals(ctx, p) -> None:
    """The engine signals each rank's whole process group: DataLoader workers would die of the SIGTERM
    meant for the rank, and the rank would fail with "DataLoader worker is killed". They ignore it and
    go with their rank (parent-death signal) or at the DataLoader's own shutdown."""
    from torch.utils.data._utils import signal_handling

    original = signal_handling._set_worker_signal_handlers

    def _set_worker_signal_handlers(*args):
        original(*args)
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, signal.SIG_IGN)

    p.set(signal_handling, "_set_worker_signal_handlers", _set_worker_signal_handlers)


TORCH_PATCHES = (init_joins_fastlaunch_group, dataloader_workers_ignore_stop_signals)
