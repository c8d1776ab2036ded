"""Patches to fastai's fit and distributed path: real fits opened and closed on the rank context, export,
distrib_ctx, DistributedDL, maybe_gather, distrib_barrier."""
from __future__ import annotations

import contextlib
import copy
import functools
import time

from ..patching import patch
from .dispatch import observed_call_one

__all__ = ["fastlaunch_callbacks", "CORE_PATCHES"]


def fastlaunch_callbacks(learn) -> list:
    """Callbacks of fastlaunch's own classes on a Learner."""
    return [cb for cb in learn.cbs if type(cb).__module__.startswith("fastlaunch.")]


def _ensure_callbacks(learn, classes) -> None:
    """Learners that skipped __init__ (load_learner) get fastlaunch's callbacks before their first fit."""
    for cls in classes:
        if not any(isinstance(cb, cls.__mro__[1]) for cb in learn.cbs):
            cb = cls()
            learn.add_cb(cb)
            cb("after_create")


@patch("fastai.learner.Learner.fit", module="fastai.learner", assumes=("fastai.learner.Learner.fit",))
def fit_opens_a_fit_run(ctx, p) -> None:
    """validate/get_preds/predict also fire before_fit: Learner.fit opens a FitRun on the rank context
    (numbered, the same on every rank), so callbacks tell real fits apart; a resumed run skips the fits
    that had ended before its checkpoint and resumes the interrupted one."""
    from fastai.learner import Learner

    from ..callbacks.checkpointing import resume_callbacks
    from ..callbacks.placement import DistributedFit
    from ..escape import grace_for, settle

    original = Learner.fit

    @functools.wraps(original)
    def fit(self, *args, **kwargs):
        run = ctx.fit_of(self)
        if run is not None:  # a fit inside a fit: part of the outer one
            run.depth += 1
            try:
                return original(self, *args, **kwargs)
            finally:
                run.depth -= 1
        _ensure_callbacks(self, ctx.callback_classes)
        run = ctx.open_fit(self)
        started = time.monotonic()
        self.train_iter = 0  # as fastai's before_fit sets it: a fit that fails before counts no earlier fit's steps
        try:
            extra = resume_callbacks(ctx, run)
            if extra is None:  # finished before the checkpoint this run resumes from
                return None
            with self.added_cbs(extra):
                result = original(self, *args, **kwargs)
        except BaseException as exc:
            grace = grace_for(time.monotonic() - started, getattr(self, "train_iter", 0))
            settle(ctx, run.index, exc, grace)  # on this rank alone: the job ends here, naming it (escape.py)
            for cb in self.cbs:  # fastai skips after_fit when a fit fails: the model and loaders come back
                if isinstance(cb, DistributedFit):  # as one process has them
                    cb.after_fit()
            raise
        finally:
            ctx.close_fit(self)
        if run.stop is not None and run.stop.interrupted:  # cancelled at one agreed batch, after_fit done
            raise KeyboardInterrupt
        return result

    p.set(Learner, "fit", fit)


@patch("fastai.learner.Learner._do_fit", module="fastai.learner", assumes=("fastai.learner.Learner._do_fit",))
def fit_can_start_mid_run(ctx, p) -> None:
    """fastai's fit loop always starts at epoch 0; a resumed fit starts at the checkpoint's epoch
    (its FitRun's start_epoch); every other fit runs fastai's own loop."""
    from fastai.learner import Learner

    original = Learner._do_fit

    @functools.wraps(original)
    def _do_fit(self):
        run = ctx.fit_of(self)
        if run is None or run.start_epoch == 0:
            return original(self)
        from fastai.callback.core import CancelEpochException

        for epoch in range(run.start_epoch, self.n_epoch):
            self.epoch = epoch
            self._with_events(self._do_epoch, "epoch", CancelEpochException)

    p.set(Learner, "_do_fit", _do_fit)


def _as_fastai_class(cb):
    """A copy of cb as the fastai class it extends, or None when it extends none worth keeping."""
    import sys

    precision = sys.modules.get("fastlaunch.rank.callbacks.precision")  # not loaded: no DevicePrecision exists
    if precision is None or not isinstance(cb, precision.DevicePrecision):
        return None
    from fastai.callback.fp16 import AMPMode

    DevicePrecision = precision.DevicePrecision
    stand_in = copy.copy(cb)
    stand_in.__class__ = DevicePrecision.__mro__[1]  # fastai's MixedPrecision
    stand_in.amp_mode = AMPMode(cb.amp_mode)
    return stand_in


@patch("fastai.learner.Learner.export", module="fastai.learner", assumes=("fastai.learner.Learner.export",))
def export_without_fastlaunch(ctx, p) -> None:
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

    p.set(Learner, "export", export)


@patch("fastai.learner.Learner.to_distributed", "fastai.learner.Learner.detach_distributed",
       "fastai.learner.Learner.distrib_ctx", module="fastai.distributed")
def distributed_ctx_noop(ctx, p) -> None:
    """to_distributed/distrib_ctx in a script would wrap a second time (and DistributedTrainer reads
    model.device, breaking on CPU): fastlaunch already owns the job, so they do nothing."""
    from fastai.learner import Learner

    def to_distributed(self, *args, **kwargs): return self
    def detach_distributed(self): return self

    @contextlib.contextmanager
    def distrib_ctx(self, *args, **kwargs):
        yield self

    p.set(Learner, "to_distributed", to_distributed)
    p.set(Learner, "detach_distributed", detach_distributed)
    p.set(Learner, "distrib_ctx", distrib_ctx)


@patch("fastai.*.DistributedDL", module="fastai.distributed")
def distributed_dl_is_sharded(ctx, p) -> None:
    """fastai's DistributedDL calls .cuda() and miscounts len(): a script naming it gets ShardedDL."""
    import fastai.distributed as fd

    from ..context import bind
    from ..sharding import ShardedDL

    p.replace_everywhere("DistributedDL", fd.DistributedDL, bind(ShardedDL, ctx))


@patch("fastai.*.maybe_gather", module="fastai.learner", assumes=("fastai.torch_core.maybe_gather",))
def maybe_gather_local(ctx, p) -> None:
    """maybe_gather all_gathers on every to_detach when WORLD_SIZE > 1 (a per-batch collective, and a
    deadlock when one rank alone calls get_preds): tensors stay local; fastlaunch gathers at its own points."""
    import fastai.torch_core as tc

    def maybe_gather(x, axis=0): return x

    p.replace_everywhere("maybe_gather", tc.maybe_gather, maybe_gather)


@patch("fastai.*.distrib_barrier", module="fastai.learner", assumes=("fastai.torch_core.distrib_barrier",))
def barrier_starts_group(ctx, p) -> None:
    """distrib_barrier is skipped while no process group exists; fastlaunch starts one lazily, so
    rank0_first, load and load_learner would race: the barrier starts the group when needed."""
    import fastai.torch_core as tc

    def distrib_barrier(): ctx.comm.barrier()

    p.replace_everywhere("distrib_barrier", tc.distrib_barrier, distrib_barrier)


@patch("fastai.learner.Learner._call_one", module="fastai.learner",
       assumes=("fastai.learner.Learner._call_one", "fastai.callback.core.Callback.__call__",
                "fastai.learner.Learner._with_events", "fastai.learner.Learner._do_one_batch",
                "fastai.learner.Learner._do_grad_opt"))
def callback_calls_observed(ctx, p) -> None:
    """fastai's event dispatch, each callback call observed (dispatch.py): the heartbeat (a hung rank is
    named with the callback it is stuck in), sync attribution (a sync is the running callback's), and
    cancel routing (a CancelFit/Epoch/TrainException raised on one rank would unwind that rank alone and
    leave the others in the next all-reduce forever: during a distributed fit it becomes a stop request
    that every rank acts on at the same batch, see stopchannel.py)."""
    from fastai.learner import Learner

    p.set(Learner, "_call_one", observed_call_one(ctx))


CORE_PATCHES = (fit_opens_a_fit_run, fit_can_start_mid_run, export_without_fastlaunch, distributed_ctx_noop,
                distributed_dl_is_sharded, maybe_gather_local, barrier_starts_group, callback_calls_observed)
