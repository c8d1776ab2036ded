"""Recorder sync: learn.recorder is identical on every rank, with no collective per batch.

The smoothed training loss stays local while batches run (fastai would all_gather it every batch).
An exponential moving average of equal-count streams averages exactly, so once per epoch, before
Recorder logs the epoch and before the trackers decide anything, the epoch's smoothed losses are
averaged over ranks in one all_reduce, together with averaging train metrics and the stop flags.
"""
from __future__ import annotations

import torch
from fastai.callback.core import CancelEpochException, CancelFitException
from fastai.learner import Recorder

from .base import LeanCallback

__all__ = ["RecorderSync"]


class RecorderSync(LeanCallback):
    """Averages the recorder's smoothed losses (and summable train metrics) across ranks per epoch."""

    order = Recorder.order - 1  # before Recorder.after_train logs the epoch's train loss

    def before_fit(self):
        self._synced = 0

    def sync(self, channel, with_metrics: bool) -> list[float]:
        """One all_reduce: this epoch's smoothed losses, the running average, metric sums, stop flags."""
        rec = self.learn.recorder
        self._synced = min(self._synced, len(rec.losses))  # a validate() inside the fit restarts the recorder
        tail = rec.losses[self._synced:]
        mets = [m for m in rec._train_mets[1:] if hasattr(m, "total") and hasattr(m, "count")] \
            if with_metrics else []
        on = dict(dtype=torch.float32, device=channel.device)  # the losses stay where they are: one copy
        parts = [torch.stack([torch.as_tensor(v, **on).reshape(()) for v in tail]) if tail else torch.empty(0, **on),
                 torch.as_tensor(rec.smooth_loss.val, **on).reshape(1)]
        parts += [torch.stack([torch.as_tensor(m.total, **on).reshape(()), torch.as_tensor(m.count, **on).reshape(())])
                  for m in mets]
        reduced, flags = channel.unpack(channel.comm.all_reduce(channel.piggyback(torch.cat(parts))))
        packed = reduced.cpu()
        world = channel.comm.world_size
        n = len(tail)
        rec.losses[self._synced:] = list((packed[:n] / world).unbind()) if n else []
        rec.smooth_loss.val = packed[n] / world
        for i, met in enumerate(mets):
            met.total, met.count = packed[n + 1 + 2 * i], packed[n + 2 + 2 * i]
        self._synced = len(rec.losses)
        if n:
            self.learn.smooth_loss = rec.smooth_loss.value
        return flags.tolist()

    def after_train(self):
        channel = self.ctx.stop_of(self.learn)
        if channel is not None:
            flags = self.sync(channel, with_metrics=True)
            channel.agree(flags, allowed=(CancelFitException, CancelEpochException))

    def after_fit(self):
        # Also after a cancel (lr_find ends by cancelling): the losses since the last epoch's sync.
        channel = self.ctx.stop_of(self.learn)
        if channel is not None and hasattr(self.learn, "recorder") and len(self.learn.recorder.losses) > self._synced:
            self.sync(channel, with_metrics=False)
