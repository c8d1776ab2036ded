"""Gradient accumulation with one process's meaning: n_acc counts the samples of every rank, and the
micro-steps that do not update the weights skip DDP's gradient all-reduce."""
from __future__ import annotations

from torch.nn.parallel import DistributedDataParallel

from ..patching import patch

__all__ = ["ACCUMULATE_PATCHES"]


def _world(learn) -> int:
    """Ranks sharing this fit's gradients: 1 outside a distributed fit."""
    model = learn.model
    return model.process_group.size() if isinstance(model, DistributedDataParallel) else 1


@patch("fastai.callback.training.GradientAccumulation.*", module="fastai.callback.training",
       assumes=("fastai.callback.training.GradientAccumulation.before_fit",
                "fastai.callback.training.GradientAccumulation.after_loss",
                "fastai.callback.training.GradientAccumulation.before_step"))
def gradient_accumulation_counts_global_samples(ctx, p) -> None:
    """fastai's GradientAccumulation counts this rank's samples only: under N ranks a step came after
    N x n_acc samples, so the weights drifted from one process with the same global batch; and every
    micro-step paid a full gradient all-reduce. Here each micro-step counts (and scales its loss by)
    the samples of every rank, and a micro-step that will not step runs without DDP's reduction
    (DDP's no_sync): the gradients accumulated on each rank are reduced once, with the step (and in the
    fit's first micro-step, where DDP learns its static graph)."""
    from fastai.callback.training import GradientAccumulation
    from fastai.torch_core import find_bs

    def _global_bs(self) -> int:
        return find_bs(self.learn.yb) * _world(self.learn)

    def before_batch(self):
        model = self.learn.model
        if isinstance(model, DistributedDataParallel) and self.training:
            # DDP's static graph learns the graph in its first backward, which must reduce (sums of
            # reduced and local gradients reduce to the same average)
            first = not getattr(model, "graph_seen", False)
            if first:
                model.graph_seen = True
            model.require_backward_grad_sync = first or self.count + _global_bs(self) >= self.n_acc

    def after_loss(self):
        self.learn.loss_grad /= self.n_acc / _global_bs(self)

    def before_step(self):
        bs = _global_bs(self)
        self.learn.loss_grad *= self.n_acc / bs  # the loss as logged
        self.count += bs
        if self.count < self.n_acc:
            from fastai.callback.core import CancelBatchException
            raise CancelBatchException()  # skip step and zero_grad: the gradients keep accumulating
        self.count = 0

    # DDP's wrapper lives for one fit (callbacks/placement.py): no flag to put back afterwards.
    for name, fn in (("before_batch", before_batch), ("after_loss", after_loss), ("before_step", before_step)):
        p.set(GradientAccumulation, name, fn)


ACCUMULATE_PATCHES = (gradient_accumulation_counts_global_samples,)
