"""Placement and data parallelism for every real fit: rank device, DDP wrap, sharded DataLoaders."""
from __future__ import annotations

from fastai.callback.core import Callback, TrainEvalCallback
from torch.nn.parallel import DistributedDataParallel

from ..comm import current_env, ensure_process_group
from ..device import rank_device
from ..sharding import ShardedDL
from .agreement import StopState, flag_bucket_hook

__all__ = ["DistributedFit", "FastlaunchDDP", "in_real_fit"]


class FastlaunchDDP(DistributedDataParallel):
    """DDP that passes attribute access and indexing through to the wrapped module."""

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.module, name)

    def __getitem__(self, idx): return self.module[idx]
    def __len__(self): return len(self.module)

    def reset(self):
        if hasattr(self.module, "reset"):
            self.module.reset()


def in_real_fit(learn) -> bool:
    """True inside Learner.fit (fit, fit_one_cycle, fine_tune, lr_find), False in validate/get_preds/predict."""
    return getattr(learn, "_fastlaunch_fit_depth", 0) > 0


class DistributedFit(Callback):
    """Puts model and data on the rank's device; wraps the model in DDP and shards the data for a fit."""

    order = TrainEvalCallback.order - 1  # before TrainEvalCallback moves the model to dls.device

    def __init__(self):
        self._wrapped = False
        self._old_loaders = None

    def before_fit(self):
        self._wrapped = in_real_fit(self.learn) and not isinstance(self.learn.model, DistributedDataParallel)
        if not self._wrapped:
            return
        denv = current_env()
        device = rank_device(denv.device_type, denv.local_rank)
        self.learn.model.to(device)
        if not denv.is_distributed:
            self.learn.dls.to(device)
            self._wrapped = False
            return
        ensure_process_group(denv)
        self._old_loaders = list(self.learn.dls.loaders)
        self.learn.dls.loaders = [dl if isinstance(dl, ShardedDL) else ShardedDL(dl, device=device)
                                  for dl in self._old_loaders]
        self.learn.dls.to(device)
        # DDP broadcasts rank 0's parameters and buffers at construction: every rank starts identical.
        self.learn.model = FastlaunchDDP(self.learn.model,
                                         device_ids=[denv.local_rank] if denv.device_type == "cuda" else None)
        state = StopState(device)
        self.learn.model.register_comm_hook(state, flag_bucket_hook)  # stop flags ride on the gradients
        state.active = True
        self.learn._fastlaunch_stop = state

    def after_fit(self):
        if not self._wrapped:
            return
        self.learn.model = self.learn.model.module
        self.learn.dls.loaders = self._old_loaders  # the stop state stays until AgreedStop's after_fit
        self._old_loaders, self._wrapped = None, False
