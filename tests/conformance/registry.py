"""The registry of conformance cases and what they share."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from fastai.vision.all import Callback

@dataclass
class Case:
    """One script shape. `run` trains and returns the Learner whose weights are checked; `final` builds
    that Learner untrained (the one-process check loads the weights into it); `covers` names the fastai
    callbacks, APIs and applications it exercises; `note` is said in the README's table."""

    name: str
    run: Callable
    final: Callable | None
    covers: tuple[str, ...]
    note: str = ""
    probes: Callable | None = None  # learn -> dict: the same on every rank and in one process
    upstream: str = ""  # the error fastai itself raises in one process: the 2-rank run must fail alike, at once
    extra: dict = field(default_factory=dict)


CASES: dict[str, Case] = {}


def case(name, covers, final=None, note="", probes=None, upstream=""):
    def register(fn):
        CASES[name] = Case(name, fn, final, tuple(covers), note, probes, upstream=upstream)
        return fn
    return register


def digest(t) -> str:
    """A short digest of a tensor (or tuple of them), rounded so one process's float order does not matter."""
    if isinstance(t, (tuple, list)):
        return "|".join(digest(x) for x in t)
    if not isinstance(t, torch.Tensor):
        return str(t)
    return hashlib.sha256(torch.round(t.detach().float().cpu() * 1e3).numpy().tobytes()).hexdigest()[:16]


def once(name: str, what: str) -> None:
    """A line every rank prints: under fastlaunch it must reach the console once (rank 0)."""
    print(f"CONFORMANCE {name}: {what}", flush=True)


class ReadsLearner(Callback):
    """A Timer-style user callback reading self.learn.* and printing at the end of the fit."""

    def before_fit(self): self.seen = 0
    def after_batch(self):
        if self.training:
            self.seen += len(self.learn.xb[0])
    def after_fit(self):
        once("reads_learner", f"{self.learn.n_epoch} epoch(s), {len(self.learn.dls.train)} batches per epoch")
