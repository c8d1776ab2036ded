"""Host-device syncs, counted where they are made.

Always-on counters wrap the Python entry points that wait for the device (Tensor.item, .cpu(), .tolist(),
.numpy(), bool/float/int of a tensor, torch.cuda.synchronize) and count the calls made on tensors of the
rank's compute device while a training step runs, so CPU ranks count the calls that would sync on a GPU.
Each call is attributed to the fastai callback running (or to fastai's own step when none is). The two
.item() per step that fp16's GradScaler makes by design (the inf check and the scale read) are labelled
as such, so that only avoidable syncs are reported as a problem.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from collections import Counter
from typing import Any

import torch

from ...records import BY_DESIGN, by_design

__all__ = ["SyncCounter", "BY_DESIGN", "by_design"]

_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__")


def _from_grad_scaler(frame) -> bool:
    """Whether the caller is torch's GradScaler (its code or a generator expression in it)."""
    return frame is not None and frame.f_code.co_filename.endswith("grad_scaler.py")


class SyncCounter:
    """Counts (source, method) of sync calls while `counting` is on."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.counts: Counter = Counter()
        self.site: Any = None  # a CallSite (heartbeat.py): a sync is the running callback's, else fastai's
        self.override: str | None = None  # a source that wins over the call site (the DataLoader's next)
        self.counting = False
        self._originals: list[tuple[object, str, object]] = []

    def install(self) -> None:
        """Wrap torch's sync entry points (once); uninstall() puts torch's own back."""
        if self._originals:
            return
        for name in _METHODS:
            self._originals.append((torch.Tensor, name, vars(torch.Tensor).get(name)))  # None: inherited
            setattr(torch.Tensor, name, self._wrap(getattr(torch.Tensor, name), name))
        if hasattr(torch, "cuda"):
            original = torch.cuda.synchronize
            self._originals.append((torch.cuda, "synchronize", original))

            @functools.wraps(original)
            def synchronize(*args, **kwargs):
                if self.counting:
                    self.counts[(self.source, "cuda.synchronize")] += 1
                return original(*args, **kwargs)

            torch.cuda.synchronize = synchronize

    @property
    def source(self) -> str:
        if self.override is not None:
            return self.override
        return "fastai" if self.site is None else self.site.label()

    def uninstall(self) -> None:
        while self._originals:
            owner, name, original = self._originals.pop()
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

    def _wrap(self, original, name: str):
        @functools.wraps(original)
        def wrapper(tensor, *args, **kwargs):
            if self.counting and tensor.device.type == self.device_type:
                how = name + BY_DESIGN if _from_grad_scaler(sys._getframe(1)) else name
                self.counts[(self.source, how)] += 1
            return original(tensor, *args, **kwargs)
        return wrapper

    @contextlib.contextmanager
    def paused(self):
        """Reads of host copies that never wait for the device (not syncs)."""
        was, self.counting = self.counting, False
        try:
            yield
        finally:
            self.counting = was

    def take(self) -> Counter:
        counts, self.counts = self.counts, Counter()
        return counts
