"""Whole-set validation: loss and every metric equal what one process computes on the same weights.

Each rank keeps its validation predictions and targets (padding rows trimmed), they are gathered
once per epoch, put back in the dataset's order, cut into the loader's batches, and replayed through
the metrics on every rank: AvgMetric, AccumMetric and custom Metric subclasses alike.
"""
from __future__ import annotations

import torch
from fastai.learner import Recorder
from fastai.torch_core import find_bs, to_device
from fastai.callback.core import CancelEpochException, CancelFitException

from ..comm import all_gather_object
from ..sharding import ShardedDL
from .agreement import KINDS, stop_state
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

    def before_validate(self):
        state = stop_state(self.learn)
        dl = self.learn.dl
        self._on = state is not None and isinstance(dl, ShardedDL)
        if self._on:
            self._chunks, self._kept, self._limit, self._bs, self._n_pred = [], 0, dl.real_count(), dl.bs, 1

    def after_batch(self):
        if self.training or not getattr(self, "_on", False) or self._chunks is None:
            return
        keep = min(find_bs(self.learn.yb), self._limit - self._kept)  # the last batch may end in padding
        flat = _flat(self.learn.pred, self.learn.yb)
        if flat is None:  # outputs the replay cannot handle: keep fastai's per-rank numbers
            self._chunks = None
            return
        self._n_pred = len(flat) - len(self.learn.yb)
        self._chunks.append([t.detach()[:keep] for t in flat])
        self._kept += keep

    def after_validate(self):
        if not getattr(self, "_on", False):
            return
        state = stop_state(self.learn)
        local = None if self._chunks is None or not self._chunks else \
            [torch.cat(parts).cpu() for parts in zip(*self._chunks)]
        gathered = all_gather_object((local, state.pending))
        flags = [sum(p[i] for _, p in gathered) for i in range(len(KINDS))]
        parts = [g for g, _ in gathered]
        if all(p is not None for p in parts):
            self._replay(parts)
        self._chunks = None
        state.agree(flags, allowed=(CancelFitException, CancelEpochException))

    def _replay(self, parts: list[list[torch.Tensor]]) -> None:
        """Run the validation metrics over the whole set in one-process batch order."""
        n = sum(len(p[0]) for p in parts)
        columns = [to_device(interleave([p[i] for p in parts], n), self.dls.device) for i in range(len(parts[0]))]
        learn, mets = self.learn, self.learn.recorder._valid_mets
        for met in mets:
            met.reset()
        saved = learn.pred, learn.yb, learn.loss
        with torch.no_grad():
            for start in range(0, n, self._bs):
                batch = [c[start:start + self._bs] for c in columns]
                preds, yb = batch[: self._n_pred], tuple(batch[self._n_pred:])
                learn.pred = preds[0] if self._n_pred == 1 else tuple(preds)
                learn.yb = yb
                learn.loss = learn.loss_func(learn.pred, *yb)
                for met in mets:
                    met.accumulate(learn)
        learn.pred, learn.yb, learn.loss = saved
