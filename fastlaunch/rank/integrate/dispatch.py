"""fastai's event dispatch (Learner._call_one), observed at the cost of one attribute store per call.

fastai calls every callback, in order, at each event; this does the same, and
  - keeps the callback running now in the rank's CallSite (heartbeat.py): the heartbeat's publisher names a
    rank stuck in a callback with it, and the sync counter gives a sync to the callback that made it;
  - beats the heartbeat once per batch (at its start) and at every event between batches;
  - routes the cancels a callback raises during a distributed fit to the stop channel instead of unwinding
    this rank alone.
Nothing else runs per callback call: on a 1 ms step this loop is the hot path.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["observed_call_one", "IN_BATCH"]

# Events after which no agreed stop can be acted on: cancels raised there unwind as fastai's own do.
_PASSTHROUGH = frozenset({"after_fit", "after_cancel_fit", "after_cancel_epoch", "after_cancel_train", "after_create"})
# Events inside a batch: the batch's start has beaten already.
IN_BATCH = frozenset({"after_pred", "after_loss", "before_backward", "after_backward", "before_step", "after_step",
                      "after_cancel_batch", "after_batch"})


def observed_call_one(ctx: Any) -> Callable[[Any, str], None]:
    """Learner._call_one for this rank context: every callback in order, its call site kept, cancels
    routed to the stop channel."""
    from fastai.callback.core import event

    from ..stopchannel import ROUTED

    site, beat = ctx.site, ctx.beats.beat

    def _call_one(learn, event_name: str) -> None:
        if not hasattr(event, event_name):
            raise Exception(f"missing {event_name}")
        if event_name not in IN_BATCH:
            beat(event_name, getattr(learn, "epoch", 0), getattr(learn, "iter", 0))
        site.event = event_name
        try:
            for cb in learn.cbs.sorted("order"):
                site.cb = cb
                try:
                    cb(event_name)
                except ROUTED as exc:
                    channel = None if event_name in _PASSTHROUGH else ctx.stop_of(learn)
                    if channel is None or getattr(exc, "agreed", False):
                        raise
                    channel.request(type(exc))  # the other callbacks of this event still run, as on every rank
        finally:
            site.cb = None

    return _call_one
