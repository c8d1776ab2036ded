"""Checkpoints at every epoch's end or on preemption, and resuming a fit mid-epoch from one.

fastai's own fit(start_epoch=) resumes whole epochs only. Here a resumed run skips the fits the script
had finished, starts the interrupted fit at its epoch, skips the batches already done (the agreed
data order of that epoch is replayed), and puts back the schedule position, optimizer, recorder and
random state, so the planned epochs end as planned.
"""
from __future__ import annotations

import itertools
import json
from functools import partial

import torch

from .. import checkpoint
from ..comm import broadcast_object, current_env, is_rank_zero
from ..config import stop_marker
from .agreement import stop_state
from .base import LeanCallback
from .placement import DistributedFit

__all__ = ["begin_fit", "ResumeFit", "EpochCheckpoints", "preempt_writer"]

_fits = itertools.count()
_plan: dict | None = None
_plan_loaded = False


def _resume_plan() -> dict | None:
    """The checkpoint to resume from: FASTLAUNCH_RESUME, or the newest one after an automatic restart."""
    global _plan, _plan_loaded
    if not _plan_loaded:
        _plan_loaded = True
        denv = current_env()
        path = denv.resume_from
        if path is None and denv.restart_count > 0 and denv.run_dir is not None:
            path = checkpoint.latest(denv.run_dir, say=print if is_rank_zero() else None)
        if path is not None:
            _plan = checkpoint.load(path)
            if is_rank_zero():
                print(f"fastlaunch: resuming from {path} (fit {_plan['fit_index']}, epoch {_plan['epoch']}, "
                      f"{_plan['iter']} batches done)", flush=True)
    return _plan


def begin_fit(learn) -> list:
    """Number this fit; return the callbacks it needs to resume, or None when it was finished before."""
    global _plan
    index = next(_fits)
    learn._fastlaunch_fit_index = index
    plan = _resume_plan()
    if plan is None or index > plan["fit_index"]:
        return []
    if index < plan["fit_index"]:
        return None  # this fit had ended before the checkpoint: its result is in the checkpoint's weights
    _plan = None  # consumed
    return [ResumeFit(plan)]


class ResumeFit(LeanCallback):
    """Loads a checkpoint into this fit and fast-forwards it to the batch where it stopped."""

    order = DistributedFit.order - 1  # load the weights before the model is wrapped

    def __init__(self, plan: dict):
        self.plan, self._epoch_restored, self._batch_restored = plan, False, False

    def before_fit(self):
        plan, model = self.plan, getattr(self.learn.model, "module", self.learn.model)
        model.load_state_dict(plan["model"])
        self.learn.opt.load_state_dict(plan["opt"])
        checkpoint.set_rng(plan["rng"])
        self.learn._fastlaunch_start_epoch = plan["epoch"]

    def before_epoch(self):
        if self._epoch_restored:
            return
        self._restore_recorder()
        train = self.learn.dls.train
        if hasattr(train, "skip_batches"):  # a ShardedDL: replay this epoch's agreed order, minus what is done
            train.epoch, train.skip_batches = self.plan["epoch"], self.plan["iter"]

    def _restore_recorder(self):
        self._epoch_restored = True
        rec, saved = self.learn.recorder, self.plan["recorder"]
        rec.values = [list(row) for row in saved["values"]]
        rec.losses = [torch.tensor(v) for v in saved["losses"]]
        rec.lrs, rec.iters = list(saved["lrs"]), list(saved["iters"])
        rec.smooth_loss.count, rec.smooth_loss.val = saved["smooth_count"], torch.tensor(saved["smooth_val"])
        sync = getattr(self.learn, "recorder_sync", None)
        if sync is not None:
            sync._synced = len(rec.losses)
        progress = getattr(getattr(self.learn, "progress", None), "mbar", None)
        if progress is not None:
            progress.update(0)  # the epoch bar starts its clock at epoch 0, which a resumed fit skips

    def before_batch(self):
        if self._batch_restored or not self.training:
            return
        self._batch_restored = True
        n_iter, done = len(self.learn.dl), self.plan["iter"]
        self.learn.pct_train = (self.epoch + done / n_iter) / self.n_epoch
        self.learn.train_iter = self.epoch * n_iter + done

    def after_fit(self):
        self.learn._fastlaunch_start_epoch = 0
        if not self._epoch_restored:  # stopped in its last epoch's validation: no epoch is left to run
            self._restore_recorder()


def preempt_writer(learn, position: str) -> None:
    """Every rank averages the epoch's smoothed losses so far (as the epoch's end would: the running
    average is linear, so ranks resuming from the average end the epoch with the uninterrupted figures);
    rank 0 writes checkpoints/preempt.pt where every rank agreed to stop; every rank learns whether it was
    written and leaves a stop marker in its node's logs (the launcher exits 75 only when it was)."""
    sync, state = getattr(learn, "recorder_sync", None), stop_state(learn)
    if position == "batch" and sync is not None and state is not None:
        sync.sync(state, with_metrics=False)
    denv = current_env()
    path = None
    if is_rank_zero():
        epoch, done = (learn.epoch, learn.iter) if position == "batch" else (learn.epoch + 1, 0)
        path = checkpoint.save(checkpoint.snapshot(learn, learn._fastlaunch_fit_index, epoch, done, denv.seed),
                               denv.run_dir, "preempt")
        if path is not None:  # else save said why
            print(f"fastlaunch: stopped by a signal; checkpoint {path}", flush=True)
    written = broadcast_object(None if path is None else str(path))
    if denv.run_dir is not None:
        marker = stop_marker(denv.run_dir / "logs", denv.rank)
        marker.write_text(json.dumps({"checkpoint": written, "position": position}))


class EpochCheckpoints(LeanCallback):
    """With --checkpoint-every epoch, rank 0 writes checkpoints/epoch<E>.pt after each epoch (last k kept)."""

    order = 210  # after every tracker and after the agreed stop

    def before_fit(self):
        state = getattr(self.learn, "_fastlaunch_stop", None)
        if state is not None:
            state.on_preempt = partial(preempt_writer, self.learn)

    def after_epoch(self):
        denv = current_env()
        if denv.checkpoint_every != "epoch" or not is_rank_zero() or denv.run_dir is None:
            return
        if not hasattr(self.learn, "_fastlaunch_fit_index"):
            return
        state = checkpoint.snapshot(self.learn, self.learn._fastlaunch_fit_index, self.epoch + 1, 0, denv.seed)
        checkpoint.save(state, denv.run_dir, f"epoch{self.learn._fastlaunch_fit_index}-{self.epoch}")
        checkpoint.keep_last(denv.run_dir, denv.keep_checkpoints)
