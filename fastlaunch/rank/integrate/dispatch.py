"""fastai's event dispatch (Learner._call_one), observed at the cost of one attribute store per call.

fastai calls every callback, in order, at each event; this does the same, and
  - keeps the callback running now in the rank's CallSite (heartbeat.py): the heartbeat's publisher names a
    rank stuck in a callback with it, and the sync counter gives a sync to the callback that made it;
  - beats the heartbeat once per batch (at its start) and at every event between batches;
  - routes the cancels a callback raises during a distributed fit to the stop channel instead of unwinding
    this rank alone.
A callback whose call can only do nothing (fastai's Callback at an event its class does not define, a
LeanCallback at an event it ignores) is not called at all. Nothing else runs per callback call: on a 1 ms
step this loop is the hot path.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["observed_call_one", "IN_BATCH"]

# Events after which no agreed stop can be acted on: cancels raised there unwind as fastai's own do.
_PASSTHROUGH = frozenset({"after_fit", "after_cancel_fit", "after_cancel_epoch", "after_cancel_train", "after_create"})
# Events inside a batch: the batch's start has beaten already.
IN_BATCH = frozenset({"after_pred", "after_loss", "before_backward", "after_backward", "before_step", "after_step",
                      "after_cancel_batch", "after_batch"})


_NEVER, _PLAIN, _LEAN = object(), object(), object()


def _idle_kind(cls: type, event_name: str, plain_call: Any, lean_call: Any) -> object:
    """Whether a call of this callback class at this event is known to do nothing, so the dispatch skips it.

    fastai's Callback.__call__ at an event the class does not define looks the name up through the Learner
    and the model (two levels of attribute delegation, an AttributeError at the end) and then calls a
    no-op: about 5 us, several times per event. _PLAIN: fastai's own __call__ and no such method on the
    class (an instance attribute of that name still runs); _LEAN: a LeanCallback, idle while the event is
    not among its handled ones; _NEVER: always called (a class with its own __call__). At after_fit an
    idle call only sets `run` back to True, and the dispatch does just that."""
    call = getattr(cls, "__call__", None)
    if call is plain_call and getattr(cls, event_name, None) is None:
        return _PLAIN
    if call is lean_call:
        return _LEAN
    return _NEVER


def observed_call_one(ctx: Any) -> Callable[[Any, str], None]:
    """Learner._call_one for this rank context: every callback in order, its call site kept, cancels
    routed to the stop channel."""
    from fastai.callback.core import Callback, event

    from ..callbacks.base import LeanCallback
    from ..stopchannel import ROUTED

    site, beat = ctx.site, ctx.beats.beat
    idle: dict[tuple[type, str], object] = {}  # (class, event) -> _NEVER, _PLAIN or _LEAN, decided once

    def _call_one(learn, event_name: str) -> None:
        if not hasattr(event, event_name):
            raise Exception(f"missing {event_name}")
        if event_name not in IN_BATCH:
            beat(event_name, getattr(learn, "epoch", 0), getattr(learn, "iter", 0))
            if event_name == "before_fit":
                idle.clear()  # decided anew each fit: a class given an event method since is called again
        site.event = event_name
        try:
            for cb in learn.cbs.sorted("order"):
                key = (cb.__class__, event_name)
                kind = idle.get(key)
                if kind is None:
                    kind = idle[key] = _idle_kind(key[0], event_name, Callback.__call__, LeanCallback.__call__)
                if kind is _PLAIN and event_name not in cb.__dict__ or kind is _LEAN and event_name not in cb._handles:
                    continue  # a call that can only do nothing
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
