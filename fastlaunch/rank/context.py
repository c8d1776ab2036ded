"""The rank context: what a rank knows and keeps, built once by the worker and passed explicitly.

RankContext holds the frozen environment facts (a DistEnv), the rank's collectives (Comm, which owns the
process group and the store client), its heartbeat slot, its sync counter once instrumentation starts,
and the per-process sequences that must advance identically on every rank (the numbers of fits and of
sharded loaders: every rank makes the same calls in the same order, so every rank draws the same
numbers). `reset()` forgets all of it but the facts (tests, and a session whose ranks run on after a
failed cell).

FitRun is one real fit (Learner.fit and what calls it: fit_one_cycle, fine_tune, lr_find): opened when the
outermost Learner.fit starts and closed when it returns, however it ends. Callbacks find it with
`ctx.fit_of(learn)`; validate, get_preds and predict outside a fit find none. Nothing is written onto the
Learner.
"""
from __future__ import annotations

import contextlib
import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Callable

from .comm import Comm
from ..env import DistEnv
from ..heartbeat import IN_FIT, CallSite, NoHeartbeat
from ..lines import rank_line

__all__ = ["RankContext", "FitRun", "bind"]


@dataclass
class FitRun:
    """One real fit of one Learner."""

    index: int  # the fit's number in this process: the same on every rank, and again when a run resumes
    depth: int = 1  # Learner.fit called inside a fit (a callback that fits) shares the outer run
    open_events: int = 0  # before_fit events not yet closed by after_fit: above 1, a validate() inside the fit
    start_epoch: int = 0  # a resumed fit starts here
    stop: Any = None  # the StopChannel of a distributed fit, once the model is wrapped


class RankContext:
    """This rank's facts and the state it keeps across fits."""

    def __init__(self, env: DistEnv, beats: Any = None, say: Callable[[str], None] | None = None):
        self.env = env
        self.beats = beats if beats is not None else NoHeartbeat()
        self.comm = Comm(env, self.beats)
        self.site = CallSite()  # the callback running now (the dispatch sets it; heartbeat and syncs read it)
        self._say = say or rank_line
        self._syncs: Any = None
        self.callback_classes: tuple[type, ...] = ()  # fastlaunch's callbacks bound to this context, once installed
        self.reset()

    def reset(self) -> None:
        """Forget every fit, sequence and resume plan of this process."""
        self.fit_numbers = itertools.count()
        self.fits_opened = 0  # real fits started in this process (a notebook session reports it per cell)
        self.loader_numbers = itertools.count()
        self.said: set[str] = set()
        self.resume_plan: dict | None = None  # the checkpoint a resumed run continues from, until consumed
        self.resume_read = False
        self._fits: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def syncs(self) -> Any:
        """The SyncCounter, made when a fit is first measured; it gives each sync to this rank's call site."""
        return self._syncs

    @syncs.setter
    def syncs(self, counter: Any) -> None:
        if counter is not None:
            counter.site = self.site
        self._syncs = counter

    @property
    def is_rank_zero(self) -> bool:
        return self.env.rank == 0

    def say(self, line: str, once: bool = False) -> None:
        """A line on rank 0's console (once per process with once=True)."""
        if not self.is_rank_zero or (once and line in self.said):
            return
        if once:
            self.said.add(line)
        self._say(line)

    def not_counted(self) -> contextlib.AbstractContextManager:
        """For reads of host copies fastlaunch made itself (they wait for nothing): syncs not counted."""
        return self.syncs.paused() if self.syncs is not None else contextlib.nullcontext()

    # -- fits -------------------------------------------------------------------------------------------------
    def fit_of(self, learn) -> FitRun | None:
        """The real fit this Learner is in, or None."""
        return self._fits.get(learn)

    def open_fit(self, learn) -> FitRun:
        run = FitRun(index=next(self.fit_numbers))
        self.fits_opened += 1
        self._fits[learn] = run
        self.beats.set_flag(IN_FIT)
        return run

    def close_fit(self, learn) -> None:
        run = self._fits.pop(learn, None)
        if run is not None and run.stop is not None:
            run.stop.active = False
        self.beats.set_flag(IN_FIT, bool(self._fits))

    def stop_of(self, learn) -> Any:
        """The active stop channel of this Learner's distributed fit, else None."""
        run = self._fits.get(learn)
        stop = run.stop if run is not None else None
        return stop if stop is not None and stop.active else None

    def active_stop(self) -> Any:
        """The stop channel of a distributed fit running now (for the signal handler), else None."""
        for run in list(self._fits.values()):
            if run.stop is not None and run.stop.active:
                return run.stop
        return None


def bind(cls: type, ctx: RankContext, name: str | None = None) -> type:
    """cls with `ctx` as a class attribute: what fastai instantiates without arguments (default callbacks,
    a script's DistributedDL) still gets the rank context. Same name, module and behaviour as cls."""
    return type(name or cls.__name__, (cls,), {"ctx": ctx, "__module__": cls.__module__,
                                                "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
