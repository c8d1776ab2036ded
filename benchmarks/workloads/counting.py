"""Exact counts per steady-state training step: Python-level collectives and host-device sync calls."""
import torch
import torch.distributed as dist
from fastai.basics import Callback

from fastlaunch.rank.instrument.syncs import SyncCounter

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_object", "gather_object", "broadcast",
                "broadcast_object_list", "barrier", "reduce")


class _StepEnd(Callback):
    order = 10_000  # after every other after_batch callback (the recorder's accumulate included)

    def __init__(self, counts): self.counts = counts
    def after_batch(self): self.counts.end_step()


class Counts(Callback):
    """Counts what happens inside training steps (before_batch to the last after_batch), the first
    WARMUP steps left out."""

    order = -1000

    def __init__(self, learn):
        self.collectives, self.steps, self.active = 0, 0, False
        self.syncs = SyncCounter("cuda" if torch.cuda.is_available() else "cpu")
        self.syncs.install()
        ctx = next((cb.ctx for cb in learn.cbs if type(cb).__module__.startswith("fastlaunch.")), None)
        if ctx is not None and ctx.syncs is None:  # under fastlaunch: its attribution and exclusions apply
            ctx.syncs = self.syncs
        for name in _COLLECTIVES:
            original = getattr(dist, name)

            def counted(*args, _original=original, **kwargs):
                if self.active:
                    self.collectives += 1
                return _original(*args, **kwargs)

            setattr(dist, name, counted)
        learn.add_cbs([self, _StepEnd(self)])

    def before_batch(self):
        self.active = self.training and self.iter >= 3
        self.syncs.counting = self.active

    def end_step(self):
        self.steps += self.active
        self.syncs.counting = False
        self.active = False

    def per_step(self) -> dict:
        steps = max(self.steps, 1)
        by_kind: dict = {}
        for (source, how), n in self.syncs.counts.items():
            by_kind[f"{source} ({how})"] = n / steps
        return {"collectives_per_step": self.collectives / steps,
                "syncs_per_step": sum(self.syncs.counts.values()) / steps, "syncs": by_kind}
