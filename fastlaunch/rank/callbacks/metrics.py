"""Whole-set validation: loss and every metric equal what one process computes on the same weights.

Each rank keeps its validation predictions, targets and losses batch by batch (padding left out); they
are gathered once per epoch, put back into one process's batches and order (the ranks evaluate one
process's own batches, or for a language model their streams of them), and replayed through the
metrics on every rank: the loss as fastai's AvgLoss averages `learn.loss`, AvgMetric, AccumMetric and
custom Metric subclasses alike.
"""
from __future__ import annotations

import torch
from fastai.learner import Recorder
from fastai.torch_core import find_bs, to_cpu, to_detach, to_device
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
    """Gathers the epoch's validation outputs once and recomputes loss and metrics over the whole set.

    Each batch keeps `learn.pred`, `learn.yb` and `learn.loss` as the callbacks left them at after_batch
    (a loss changed in after_loss included; outputs of any structure: tuples, dicts, scalars). Evaluation
    deals out one process's whole batches, so the replay gives each metric the very batch, prediction and
    loss one process's Recorder sees, in one process's order."""

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
        learn = self.learn
        keep = min(find_bs(learn.yb), self._limit - self._kept)  # a padding batch adds nothing
        self._kept += max(keep, 0)
        if keep <= 0:
            return
        loss = to_detach(learn.loss, cpu=False, gather=False)
        if self._batch_sharded:  # one process's whole batch: kept as it is, whatever its structure
            self._chunks.append((to_detach(learn.pred, cpu=False, gather=False),
                                 to_detach(learn.yb, cpu=False, gather=False), loss))
            return
        flat = _flat(learn.pred, learn.yb)  # a language model's streams: columns put back together later
        if flat is None:  # outputs the replay cannot interleave: keep fastai's per-rank numbers
            self._chunks = None
            return
        self._n_pred = len(flat) - len(learn.yb)
        self._chunks.append(([t.detach()[:keep] for t in flat], loss.mean()))

    def after_validate(self):
        self.listen("after_batch", on=False)
        if not getattr(self, "_on", False):
            return
        channel = self.ctx.stop_of(self.learn)
        local = to_cpu(self._chunks) if self._chunks else None  # once per epoch
        gathered = channel.comm.all_gather_object((local, channel.outgoing_list()))
        flags = channel.combine([f for _, f in gathered])
        parts = [g for g, _ in gathered]
        if all(p is not None for p in parts):
            self._replay(parts)
        self._chunks = None
        channel.agree(flags, allowed=(CancelFitException, CancelEpochException))

    def _batches(self, parts: list[list]):
        """One process's validation batches (pred, yb, loss), in its order, from every rank's batches."""
        if self._batch_sharded:  # rank r's k-th batch was one process's batch k * world + r
            for k in range(max(len(p) for p in parts)):
                yield from (p[k] for p in parts if k < len(p))
            return
        for batches in zip(*parts):  # a language model's streams: the ranks' k-th batches make one batch
            columns = [interleave(list(column), sum(len(t) for t in column)) for column in zip(*(b[0] for b in batches))]
            sizes = [len(b[0][-1]) for b in batches]  # each rank's share of the batch, by its targets
            loss = sum(b[1] * n for b, n in zip(batches, sizes)) / sum(sizes)  # the mean over the whole batch
            preds = columns[: self._n_pred]
            yield (preds[0] if self._n_pred == 1 else tuple(preds)), tuple(columns[self._n_pred:]), loss

    def _replay(self, parts: list[list]) -> None:
        """Run the validation metrics over the whole set in one-process batch order."""
        learn, mets = self.learn, self.learn.recorder._valid_mets
        for met in mets:
            met.reset()
        saved = learn.pred, learn.yb, learn.loss
        device = self.dls.device
        with torch.no_grad():
            for pred, yb, loss in self._batches(parts):
                learn.pred, learn.yb, learn.loss = to_device(pred, device), tuple(to_device(yb, device)), \
                    to_device(loss, device)
                for met in mets:
                    met.accumulate(learn)
        learn.pred, learn.yb, learn.loss = saved
