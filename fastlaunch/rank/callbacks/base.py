"""The base of fastlaunch's callbacks: fastai's Callback, dispatched without cost for events it ignores.

fastai calls every callback at every event, and a callback looks an event it does not handle up through
its Learner before falling back to a no-op: about 4 us a call here. fastlaunch adds eight callbacks to
every Learner, each handling a few of the eight events of a training step, so that lookup alone would
cost a quarter of a millisecond per step. Each class knows the events it handles; the rest return at once.
"""
from __future__ import annotations

from typing import Any

from fastai.callback.core import Callback, event

__all__ = ["LeanCallback"]

EVENTS = tuple(name for name in vars(event) if not name.startswith("_"))  # fastai's event names


class LeanCallback(Callback):
    """A fastai Callback whose events it does not define cost one set lookup. `ctx` is the rank context
    (context.py), set on the class fastai instantiates by context.bind at install."""

    _handles: frozenset = frozenset()
    quiet: frozenset = frozenset()  # events the class handles only while it listens (listen())
    ctx: Any = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls._handles = frozenset(e for e in EVENTS if callable(getattr(cls, e, None))) - cls.quiet

    def listen(self, *events: str, on: bool = True) -> None:
        """Handle these events from now on (on=False: ignore them again), on this callback alone: a
        per-batch event costs nothing in the fits and phases where the callback has nothing to do."""
        self._handles = (self._handles | set(events)) if on else (self._handles - set(events))

    def __call__(self, event_name):
        if event_name in self._handles:
            return super().__call__(event_name)
        if event_name == "after_fit":
            self.run = True  # what fastai's dispatch does at every fit's end
        return None
