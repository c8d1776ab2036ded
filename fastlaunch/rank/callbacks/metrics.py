"""Whole-set validation: loss and every metric equal what one process computes on the same weights.

Each rank keeps its validation predictions and targets batch by batch (padding trimmed); they are
gathered once per epoch, put back into one process's batches and order (the ranks evaluate one
process's own batches, or for a language model their streams of them), and replayed through the
metrics on every rank: AvgMetric, AccumMetric and custom Metric subclasses alike.
"""
from __future__ import annotations

import torch
from fastai.learner import Recorder
from fastai.torch_core import find_bs, to_device
from fastai.callback.core import CancelEpochException, CancelFitException

from ..sharding import ShardedDL
from .base import LeanCallback

__all__ = ["WholeSetMetrics", "interleave"]


def interleave(parts: list[torch.Tensor], n: int) -> torch.Tensor:
    """Undo the interleaved sharding: rank r's p-th item was item p * world + r."""
    world = len(parts)
    out = parts[0].new_empty((n, *parts[0].shape[1:]))
    for rank, part in enumerate(parts):
        out[rank::world][: len(part)] = part
    return out


def _flat(pred, yb) -> list[torch.Tensor] | None:
    """pred and yb as one flat list of tensors, or None when something is not a tensor."""
    items = list(pred) if isinstance(pred, (tuple, list)) else [pred]
    items += list(yb)
    return items if all(isinstance(t, torch.Tensor) and t.ndim > 0 for t in items) else None


class WholeSetMetrics(LeanCallback):
    """Gathers the epoch's validation outputs once and recomputes loss and metrics over the whole set."""

    order = Recorder.order - 1  # before Recorder reads the metrics in after_validate

    quiet = frozenset({"after_batch"})  # listened to during a distributed fit's validation only

    def before_validate(self):
        dl = self.learn.dl
        self._on = self.ctx.stop_of(self.learn) is not None and isinstance(dl, ShardedDL)
        self.listen("after_batch", on=self._on)
        if self._on:
            self._chunks, self._kept, self._limit, self._n_pred = [], 0, dl.real_count(), 1
            self._batch_sharded = dl.batch_sharded

    def after_batch(self):
        if self.training or not getattr(self, "_on", False) or self._chunks is None:
            return
        keep = min(find_bs(self.learn.yb), self._limit - self._kept)  # the last batch may end in padding
        flat = _flat(self.learn.pred, self.learn.yb)
        if flat is None:  # outputs the replay cannot handle: keep fastai's per-rank numbers
            self._chunks = None
            return
        self._n_pred = len(flat) - len(self.learn.yb)
        if keep > 0:  # a padding batch adds nothing
            self._chunks.append([t.detach()[:keep] for t in flat])
        self._kept += keep

    def after_validate(self):
        self.listen("after_batch", on=False)
        if not getattr(self, "_on", False):
            return
        channel = self.ctx.stop_of(self.learn)
        local = [[t.cpu() for t in batch] for batch in self._chunks] if self._chunks else None  # once per epoch
        gathered = channel.comm.all_gather_object((local, channel.outgoing_list()))
        flags = channel.combine([f for _, f in gathered])
        parts = [g for g, _ in gathered]
        if all(p is not None for p in parts):
            self._replay(parts)
        self._chunks = None
        channel.agree(flags, allowed=(CancelFitException, CancelEpochException))

    def _batches(self, parts: list[list[list[torch.Tensor]]]):
        """One process's validation batches, in its order, from every rank's batches (lists of columns)."""
        if self._batch_sharded:  # rank r's k-th batch was one process's batch k * world + r
            for k in range(max(len(p) for p in parts)):
                yield from (p[k] for p in parts if k < len(p))
        else:  # a language model's streams: the ranks' k-th batches make one process's k-th batch
            for batches in zip(*parts):
                yield [interleave(list(column), sum(len(t) for t in column)) for column in zip(*batches)]

    def _replay(self, parts: list[list[list[torch.Tensor]]]) -> None:
        """Run the validation metrics over the whole set in one-process batch order."""
        learn, mets = self.learn, self.learn.recorder._valid_mets
        for met in mets:
            met.reset()
        saved = learn.pred, learn.yb, learn.loss
        with torch.no_grad():
            for batch in self._batches(parts):
                batch = [to_device(c, self.dls.device) for c in batch]
                preds, yb = batch[: self._n_pred], tuple(batch[self._n_pred:])
                learn.pred = preds[0] if self._n_pred == 1 else tuple(preds)
                learn.yb = yb
                learn.loss = learn.loss_func(learn.pred, *yb)
                for met in mets:
                    met.accumulate(learn)
        learn.pred, learn.yb, learn.loss = saved
