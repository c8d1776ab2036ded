"""fastai's event dispatch (Learner._call_one), observed at the cost of one attribute store per call.

fastai calls every callback, in order, at each event; this does the same, and
  - keeps the callback running now in the rank's CallSite (heartbeat.py): the heartbeat's publisher names a
    rank stuck in a callback with it, and the sync counter gives a sync to the callback that made it;
  - beats the heartbeat once per batch (at its start) and at every event between batches;
  - routes the cancels a callback raises during a distributed fit to the stop channel instead of unwinding
    this rank alone.
A callback whose call can only do nothing (fastai's Callback at an event neither its class, its instance
nor the Learner it delegates to defines; a LeanCallback at an event it ignores) is not called; at
`after_fit` it still gets what fastai's `Callback.__call__` does there for every callback: `run` set back
to True (a callback that switched itself off during lr_find runs again in the next fit). Every other rule of
fastai's dispatch (`run`, `run_train`, `run_valid`, the exception rewrite, the cancels) is fastai's own
`Callback.__call__`, which runs every call that is made. tests/test_dispatch.py runs fastai's dispatch and
this one side by side over every callback class fastai ships.

Fit and epoch events fired inside a real fit (`validate()` from a callback enters the Learner again:
before_fit, before_epoch, after_epoch, after_fit) reach fastai's callbacks as in one process, but not
fastlaunch's own, whose fit-level state (the DDP wrap, the sharded loaders, checkpoints) belongs to the
outer fit. Nothing else runs per callback call: on a 1 ms step this loop is the hot path.
"""
from __future__ import annotations

from typing import Any, Callable

__all__ = ["observed_call_one", "IN_BATCH"]

# Events after which no agreed stop can be acted on: cancels raised there unwind as fastai's own do.
_PASSTHROUGH = frozenset({"after_fit", "after_cancel_fit", "after_cancel_epoch", "after_cancel_train", "after_create"})
# Events inside a batch: the batch's start has beaten already.
IN_BATCH = frozenset({"after_pred", "after_loss", "before_backward", "after_backward", "before_step", "after_step",
                      "after_cancel_batch", "after_batch"})


# Events that begin or end a fit or an epoch: inside a real fit they are nested (validate() from a callback).
FIT_LEVEL = frozenset({"before_fit", "before_epoch", "after_epoch", "after_fit"})
# Cancels of one batch, and the events before the step's gradient all-reduce where one rank's cancel can
# still be agreed with the others (the flag rides with this step's gradients).
BEFORE_REDUCE = frozenset({"before_batch", "after_pred", "after_loss", "before_backward"})

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


def delegated_events(learn: Any) -> frozenset:
    """Event names the Learner (or its model) answers: fastai's Callback looks a missing event method up
    there (GetAttr) and calls what it finds, so no callback is skipped at those events."""
    from ..callbacks.base import EVENTS

    found = set()
    for name in EVENTS:
        try:
            getattr(learn, name)
        except AttributeError:
            continue
        found.add(name)
    return frozenset(found)


def observed_call_one(ctx: Any) -> Callable[[Any, str], None]:
    """Learner._call_one for this rank context: every callback in order, its call site kept, cancels
    routed to the stop channel."""
    import weakref

    from fastai.callback.core import Callback, event

    from ..callbacks.base import LeanCallback
    from ..stopchannel import BATCH_CANCELS, ROUTED, SkipBatch

    site, beat = ctx.site, ctx.beats.beat
    idle: dict[tuple[type, str], object] = {}  # (class, event) -> _NEVER, _PLAIN or _LEAN, decided once
    last: list = [lambda: None, frozenset()]  # (weak reference to the Learner dispatched last, its answers)

    def _call_one(learn, event_name: str) -> None:
        if not hasattr(event, event_name):
            raise Exception(f"missing {event_name}")
        nested = False
        if event_name not in IN_BATCH:
            beat(event_name, getattr(learn, "epoch", 0), getattr(learn, "iter", 0))
            if event_name == "before_fit":
                idle.clear()  # decided anew each fit: a class given an event method since is called again
            if event_name in FIT_LEVEL:
                run = ctx.fit_of(learn)
                if run is not None:
                    run.open_events += event_name == "before_fit"
                    nested = run.open_events > 1
                    run.open_events -= event_name == "after_fit"
        if last[0]() is not learn or event_name == "before_fit":  # asked again for another Learner, each fit
            last[:] = [weakref.ref(learn), delegated_events(learn)]
        delegated = last[1]
        site.event = event_name
        try:
            for cb in learn.cbs.sorted("order"):
                key = (cb.__class__, event_name)
                kind = idle.get(key)
                if kind is None:
                    kind = idle[key] = _idle_kind(key[0], event_name, Callback.__call__, LeanCallback.__call__)
                if (kind is _PLAIN and event_name not in cb.__dict__ and event_name not in delegated
                        or kind is _LEAN and (event_name not in cb._handles or nested)):
                    if event_name == "after_fit":
                        cb.run = True  # what fastai's Callback.__call__ does at every after_fit, called or not
                    continue  # a call that can only do nothing
                site.cb = cb
                try:
                    cb(event_name)
                except ROUTED as exc:
                    channel = None if event_name in _PASSTHROUGH else ctx.stop_of(learn)
                    if channel is None or getattr(exc, "agreed", False):
                        raise
                    channel.request(type(exc))  # the other callbacks of this event still run, as on every rank
                except BATCH_CANCELS as exc:
                    channel = None if getattr(exc, "agreed", False) or not learn.training else ctx.stop_of(learn)
                    if channel is None:
                        raise
                    if event_name in BEFORE_REDUCE:  # every rank skips this step: agreed after its all-reduce
                        channel.request(SkipBatch)
                        continue
                    channel.skipped_alone(cb, event_name, exc)  # this rank alone skips: checked at the next step
                    raise
        finally:
            site.cb = None

    return _call_one
