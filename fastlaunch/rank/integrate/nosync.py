"""Patches that take fastai's per-step host-device syncs out of the training step.

Stock fastai waits for the GPU three times per step by default: AvgSmoothLoss moves the loss to the CPU
(to_detach) every batch, ProgressCallback reads it with .item() for the bar's comment every batch, and
the DataLoader copies each batch to the GPU with a blocking copy from pageable memory. fastlaunch pins
the loaders' batches on GPU ranks (callbacks/placement.py) and copies them with non_blocking=True.
"""
from __future__ import annotations

import functools

import torch

from ..patching import patch

__all__ = ["NOSYNC_PATCHES", "nonblocking_to_device"]


@patch("fastai.learner.AvgSmoothLoss.accumulate", module="fastai.learner",
       assumes=("fastai.learner.AvgSmoothLoss.accumulate",))
def smooth_loss_stays_on_device(ctx, p) -> None:
    """AvgSmoothLoss keeps its running average on the loss's device; it is read once per epoch."""
    from fastai.learner import AvgSmoothLoss

    def accumulate(self, learn):
        self.count += 1
        loss = learn.loss.mean().detach()
        self.val = torch.lerp(loss, torch.as_tensor(self.val, device=loss.device, dtype=loss.dtype), self.beta)

    p.set(AvgSmoothLoss, "accumulate", accumulate)


@patch("fastai.callback.progress.ProgressCallback.after_batch", module="fastai.callback.progress",
       assumes=("fastai.callback.progress.ProgressCallback.after_batch",))
def progress_comment_without_sync(ctx, p) -> None:
    """The progress bar shows the smoothed loss copied to the host without blocking, one step late."""
    from fastai.callback.progress import ProgressCallback

    original = ProgressCallback.after_batch

    @functools.wraps(original)
    def after_batch(self):
        self.pbar.update(self.iter + 1)
        if not hasattr(self, "smooth_loss"):
            return
        shown = getattr(self, "_shown", None)
        if shown is not None and (shown[1] is None or shown[1].query()):
            with ctx.not_counted():  # a host copy already made: reading it waits for nothing
                self.pbar.comment = f"{float(shown[0]):.4f}"
        loss = torch.as_tensor(self.smooth_loss).detach()
        if loss.is_cuda:
            event = torch.cuda.Event()
            host = loss.to("cpu", non_blocking=True)
            event.record()
            self._shown = (host, event)
        else:
            self._shown = (loss.clone(), None)

    p.set(ProgressCallback, "after_batch", after_batch)


def _is_cuda(device) -> bool:
    try:
        return device is not None and torch.device(device).type == "cuda"
    except (RuntimeError, TypeError):
        return False


def nonblocking_to_device(original):
    """fastai's to_device with non_blocking copies to a GPU: from pinned memory they never wait."""

    @functools.wraps(original)
    def to_device(b, device=None, non_blocking=False):
        return original(b, device, non_blocking=non_blocking or _is_cuda(device))

    return to_device


@patch("fastai.data.load.to_device", module="fastai.learner")
def batch_copies_without_sync(ctx, p) -> None:
    """The DataLoader's copy of each batch to the GPU does not wait for the GPU."""
    import fastai.data.load as load

    p.set(load, "to_device", nonblocking_to_device(load.to_device))


NOSYNC_PATCHES = (smooth_loss_stays_on_device, progress_comment_without_sync, batch_copies_without_sync)
