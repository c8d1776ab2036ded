"""Patches to fastai's fit and distributed path: marking real fits, export, distrib_ctx, DistributedDL,
maybe_gather, distrib_barrier, and routing cancels through the agreed stop."""
from __future__ import annotations

import contextlib
import copy
import functools
import sys
from typing import Any

from .. import heartbeat
from ..instrument import syncs
from ..comm import barrier

__all__ = ["replace_everywhere", "fastlaunch_callbacks", "CORE_PATCHES"]


def replace_everywhere(name: str, original: Any, replacement: Any) -> None:
    """Rebind a function in every loaded fastai module that star-imported it."""
    for mod_name, module in list(sys.modules.items()):
        if mod_name.split(".")[0] == "fastai" and getattr(module, name, None) is original:
            setattr(module, name, replacement)


def fastlaunch_callbacks(learn) -> list:
    """Callbacks of fastlaunch's own classes on a Learner."""
    return [cb for cb in learn.cbs if type(cb).__module__.startswith("fastlaunch.")]


def _ensure_callbacks(learn) -> None:
    """Learners that skipped __init__ (load_learner) get fastlaunch's callbacks before their first fit."""
    from ..callbacks import CALLBACKS

    for cls in CALLBACKS:
        if not any(isinstance(cb, cls) for cb in learn.cbs):
            cb = cls()
            learn.add_cb(cb)
            cb("after_create")


def patch_fit_marks_real_fits() -> None:
    """validate/get_preds/predict also fire before_fit: mark Learner.fit so callbacks tell them apart."""
    from fastai.learner import Learner

    original = Learner.fit

    @functools.wraps(original)
    def fit(self, *args, **kwargs):
        from ..callbacks.checkpointing import begin_fit

        _ensure_callbacks(self)
        depth = getattr(self, "_fastlaunch_fit_depth", 0)
        extra = begin_fit(self) if depth == 0 else []
        if extra is None:  # finished before the checkpoint this run resumes from
            return None
        self._fastlaunch_fit_depth = depth + 1
        heartbeat.set_flag(heartbeat.IN_FIT)
        try:
            with self.added_cbs(extra):
                return original(self, *args, **kwargs)
        finally:
            self._fastlaunch_fit_depth -= 1
            heartbeat.set_flag(heartbeat.IN_FIT, self._fastlaunch_fit_depth > 0)

    Learner.fit = fit


def _as_fastai_class(cb):
    """A copy of cb as the fastai class it extends, or None when it extends none worth keeping."""
    from fastai.callback.fp16 import AMPMode
    from ..callbacks.precision import DevicePrecision

    if not isinstance(cb, DevicePrecision):
        return None
    stand_in = copy.copy(cb)
    stand_in.__class__ = DevicePrecision.__mro__[1]  # fastai's MixedPrecision
    stand_in.amp_mode = AMPMode(cb.amp_mode)
    return stand_in


def patch_fit_can_start_mid_run() -> None:
    """fastai's fit loop always starts at epoch 0; a resumed fit starts at the checkpoint's epoch."""
    from fastai.callback.core import CancelEpochException
    from fastai.learner import Learner

    def _do_fit(self):
        for epoch in range(getattr(self, "_fastlaunch_start_epoch", 0), self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, "epoch", CancelEpochException)

    Learner._do_fit = _do_fit


def patch_export_without_fastlaunch() -> None:
    """learn.export would pickle fastlaunch's callbacks: an exported model must load without fastlaunch."""
    from fastai.learner import Learner

    original = Learner.export

    @functools.wraps(original)
    def export(self, *args, **kwargs):
        ours = fastlaunch_callbacks(self)
        # A device-aware MixedPrecision is exported as fastai's own, so the file loads without fastlaunch.
        stand_ins = [_as_fastai_class(cb) for cb in ours if _as_fastai_class(cb) is not None]
        self.remove_cbs(ours)
        self.add_cbs(stand_ins)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.remove_cbs(stand_ins)
            self.add_cbs(ours)

    Learner.export = export


def patch_distributed_ctx_noop() -> None:
    """to_distributed/distrib_ctx in a script would wrap a second time (and DistributedTrainer reads
    model.device, breaking on CPU): fastlaunch already owns the job, so they do nothing."""
    from fastai.learner import Learner

    def to_distributed(self, *args, **kwargs): return self
    def detach_distributed(self): return self

    @contextlib.contextmanager
    def distrib_ctx(self, *args, **kwargs):
        yield self

    Learner.to_distributed, Learner.detach_distributed, Learner.distrib_ctx = \
        to_distributed, detach_distributed, distrib_ctx


def patch_distributed_dl() -> None:
    """fastai's DistributedDL calls .cuda() and miscounts len(): a script naming it gets ShardedDL."""
    import fastai.distributed as fd

    from ..sharding import ShardedDL

    replace_everywhere("DistributedDL", fd.DistributedDL, ShardedDL)


def patch_maybe_gather_local() -> None:
    """maybe_gather all_gathers on every to_detach when WORLD_SIZE > 1 (a per-batch collective, and a
    deadlock when one rank alone calls get_preds): tensors stay local; fastlaunch gathers at its own points."""
    import fastai.torch_core as tc

    def maybe_gather(x, axis=0): return x

    replace_everywhere("maybe_gather", tc.maybe_gather, maybe_gather)


def patch_barrier_starts_group() -> None:
    """distrib_barrier is skipped while no process group exists; fastlaunch starts one lazily, so
    rank0_first, load and load_learner would race: the barrier starts the group when needed."""
    import fastai.torch_core as tc

    def distrib_barrier(): barrier()

    replace_everywhere("distrib_barrier", tc.distrib_barrier, distrib_barrier)


def patch_cancels_are_agreed() -> None:
    """A CancelFit/Epoch/TrainException raised on one rank would unwind that rank alone and leave the
    others in the next all-reduce forever: during a distributed fit it becomes a stop request that
    every rank acts on at the same batch (see callbacks/agreement.py). Each callback call also
    publishes the rank's progress, so a hung rank is named with the callback it is stuck in."""
    from fastai.callback.core import event
    from fastai.learner import Learner

    from ..callbacks.agreement import ROUTED, stop_state

    passthrough = {"after_fit", "after_cancel_fit", "after_cancel_epoch", "after_cancel_train", "after_create"}

    def _call_one(self, event_name):
        if not hasattr(event, event_name):
            raise Exception(f"missing {event_name}")
        state = None if event_name in passthrough else stop_state(self)
        epoch, iteration = getattr(self, "epoch", 0), getattr(self, "iter", 0)
        counter = syncs.counter
        for cb in self.cbs.sorted("order"):
            where = f"{type(cb).__name__}.{event_name}"
            heartbeat.beat(where, epoch, iteration)  # names a stuck callback
            if counter is not None:
                counter.source = where  # a sync made now is this callback's
            try:
                cb(event_name)
            except ROUTED as exc:
                if state is None or getattr(exc, "agreed", False):
                    raise
                state.request(type(exc))  # the other callbacks of this event still run, as on every rank
            finally:
                if counter is not None:
                    counter.source = "fastai"

    Learner._call_one = _call_one


CORE_PATCHES = (patch_fit_marks_real_fits, patch_fit_can_start_mid_run, patch_export_without_fastlaunch, patch_distributed_ctx_noop,
                patch_distributed_dl, patch_maybe_gather_local, patch_barrier_starts_group,
                patch_cancels_are_agreed)
