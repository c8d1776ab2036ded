"""fastai's event dispatch (Learner._call_one) with observers around each callback call.

fastai calls every callback, in order, at each event; this does the same and lets observers see which
callback runs (the heartbeat, the sync counter's attribution) and routes the cancels a callback raises
during a distributed fit to the stop channel instead of unwinding this rank alone. The label of each
(callback class, event) is built once, not at every call.
"""
from __future__ import annotations

from typing import Any, Protocol

__all__ = ["EventDispatch", "Observer", "HeartbeatObserver", "SyncAttribution"]

# Events after which no agreed stop can be acted on: cancels raised there unwind as fastai's own do.
_PASSTHROUGH = frozenset({"after_fit", "after_cancel_fit", "after_cancel_epoch", "after_cancel_train", "after_create"})


class Observer(Protocol):
    def enter(self, where: str, epoch: int, iteration: int) -> None: ...
    def leave(self) -> None: ...


class HeartbeatObserver:
    """Publishes the callback running and where in the fit: a hung rank is named with it."""

    def __init__(self, beats: Any):
        self.beat = beats.beat

    def enter(self, where: str, epoch: int, iteration: int) -> None:
        self.beat(where, epoch, iteration)

    def leave(self) -> None:
        pass


class SyncAttribution:
    """A host-device sync counted while a callback runs is that callback's; between callbacks, fastai's."""

    def __init__(self, ctx: Any):
        self.ctx = ctx

    def enter(self, where: str, epoch: int, iteration: int) -> None:
        if self.ctx.syncs is not None:
            self.ctx.syncs.source = where

    def leave(self) -> None:
        if self.ctx.syncs is not None:
            self.ctx.syncs.source = "fastai"


class EventDispatch:
    """Learner._call_one: every callback in order, observed, with cancels routed to the stop channel."""

    def __init__(self, ctx: Any, observers: list[Observer] | None = None):
        from fastai.callback.core import event

        from ..stopchannel import ROUTED

        self.ctx, self._event, self._routed = ctx, event, ROUTED
        self.observers: list[Observer] = observers if observers is not None else \
            [HeartbeatObserver(ctx.beats), SyncAttribution(ctx)]
        self._labels: dict[tuple[type, str], str] = {}

    def _label(self, cb, event_name: str) -> str:
        key = (type(cb), event_name)
        label = self._labels.get(key)
        if label is None:
            label = self._labels[key] = f"{type(cb).__name__}.{event_name}"
        return label

    def call_one(self, learn, event_name: str) -> None:
        if not hasattr(self._event, event_name):
            raise Exception(f"missing {event_name}")
        channel = None if event_name in _PASSTHROUGH else self.ctx.stop_of(learn)
        epoch, iteration = getattr(learn, "epoch", 0), getattr(learn, "iter", 0)
        observers = self.observers
        for cb in learn.cbs.sorted("order"):
            where = self._label(cb, event_name)
            for observer in observers:
                observer.enter(where, epoch, iteration)
            try:
                cb(event_name)
            except self._routed as exc:
                if channel is None or getattr(exc, "agreed", False):
                    raise
                channel.request(type(exc))  # the other callbacks of this event still run, as on every rank
            finally:
                for observer in observers:
                    observer.leave()
