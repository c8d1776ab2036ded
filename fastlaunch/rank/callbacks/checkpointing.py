"""Checkpoints at every epoch's end or on preemption, and resuming a fit mid-epoch from one.

fastai's own fit(start_epoch=) resumes whole epochs only. Here a resumed run skips the fits the script
had finished, starts the interrupted fit at its epoch, skips the batches already done (the agreed
data order of that epoch is replayed), and puts back the schedule position, optimizer, recorder and
random state, so the planned epochs end as planned.
"""
from __future__ import annotations

import json
from functools import partial

import torch

from ... import checkpoint
from ..snapshot import set_rng, snapshot
from ...config import stop_marker
from ...errors import UsageError
from ...heartbeat import space_left
from ...lines import rank_warning
from .base import LeanCallback
from .placement import DistributedFit

__all__ = ["resume_callbacks", "ResumeFit", "EpochCheckpoints", "preempt_writer"]


def _resume_plan(ctx) -> dict | None:
    """The checkpoint to resume from: FASTLAUNCH_RESUME, or the newest one after an automatic restart.
    Read once per process; kept on the context until the fit it resumes takes it."""
    if not ctx.resume_read:
        ctx.resume_read = True
        denv = ctx.env
        path = denv.resume_from
        if path is None and denv.restart_count > 0 and denv.run_dir is not None:
            path = checkpoint.latest(denv.run_dir, say=ctx.say)
        if path is not None:
            try:
                ctx.resume_plan = checkpoint.load(path)  # its hash checked again, on the bytes loaded
            except checkpoint.BadCheckpoint as why:
                raise UsageError("the checkpoint to resume from is refused where it is loaded", f"{path}: {why}",
                                 "it changed after it was chosen: start again to resume from the newest good "
                                 "checkpoint, and keep other writers out of the run directory") from None
            plan = ctx.resume_plan
            ctx.say(f"fastlaunch: resuming from {path} (fit {plan['fit_index']}, epoch {plan['epoch']}, "
                    f"{plan['iter']} batches done)")
    return ctx.resume_plan


def resume_callbacks(ctx, run) -> list | None:
    """The callbacks this fit needs to resume, or None when it had ended before the checkpoint."""
    plan = _resume_plan(ctx)
    if plan is None or run.index > plan["fit_index"]:
        return []
    if run.index < plan["fit_index"]:
        return None  # this fit had ended before the checkpoint: its result is in the checkpoint's weights
    ctx.resume_plan = None  # consumed
    run.start_epoch = plan["epoch"]
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
        set_rng(plan["rng"])

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
        if not self._epoch_restored:  # stopped in its last epoch's validation: no epoch is left to run
            self._restore_recorder()


def preempt_writer(ctx, learn, position: str) -> None:
    """Every rank averages the epoch's smoothed losses so far (as the epoch's end would: the running
    average is linear, so ranks resuming from the average end the epoch with the uninterrupted figures);
    rank 0 writes checkpoints/preempt.pt where every rank agreed to stop; every rank learns whether it was
    written and leaves a stop marker in its node's logs (the launcher exits 75 only when it was)."""
    sync, channel, run = getattr(learn, "recorder_sync", None), ctx.stop_of(learn), ctx.fit_of(learn)
    if position == "batch" and sync is not None and channel is not None:
        sync.sync(channel, with_metrics=False)
    denv = ctx.env
    path = None
    if ctx.is_rank_zero:
        epoch, done = (learn.epoch, learn.iter) if position == "batch" else (learn.epoch + 1, 0)
        path = checkpoint.save(snapshot(learn, run.index, epoch, done, denv.seed), denv.run_dir, "preempt")
        if path is not None:  # else save said why
            ctx.say(f"fastlaunch: stopped by a signal; checkpoint {path}")
    written = ctx.comm.broadcast_object(None if path is None else str(path))
    if denv.run_dir is not None:
        marker = stop_marker(denv.run_dir / "logs", denv.rank)
        try:
            marker.write_text(json.dumps({"checkpoint": written, "position": position}))
        except OSError as err:  # a full disk: the stop goes on, without the marker the launcher reads
            marker.unlink(missing_ok=True)
            rank_warning(f"fastlaunch: could not write the stop marker {marker}: {err.strerror or err} "
                         f"({space_left(marker.parent)}); the launcher will not count this stop as checkpointed")


class EpochCheckpoints(LeanCallback):
    """With --checkpoint-every epoch, rank 0 writes checkpoints/epoch<E>.pt after each epoch (last k kept)."""

    order = 210  # after every tracker and after the agreed stop

    def before_fit(self):
        channel = self.ctx.stop_of(self.learn)
        if channel is not None:
            channel.on_preempt = partial(preempt_writer, self.ctx, self.learn)

    def after_epoch(self):
        ctx, run = self.ctx, self.ctx.fit_of(self.learn)
        denv = ctx.env
        if denv.checkpoint_every != "epoch" or not ctx.is_rank_zero or denv.run_dir is None or run is None:
            return
        state = snapshot(self.learn, run.index, self.epoch + 1, 0, denv.seed)
        checkpoint.save(state, denv.run_dir, f"epoch{run.index}-{self.epoch}")
        checkpoint.keep_last(denv.run_dir, denv.keep_checkpoints)
