"""The sync audit: for a few steady steps, CUDA itself reports every host-device sync.

torch.cuda.set_sync_debug_mode('warn') makes CUDA warn at each synchronizing operation, C++ ones
included (nonzero, masked indexing, a copy from pageable memory), which the Python-level counters of
syncs.py cannot see. It costs more than the counters, so it runs only inside a short window, and each
warning is attributed to the callback (or the DataLoader) running when it fired.
"""
from __future__ import annotations

import warnings
from collections import Counter
from typing import Any, Callable

__all__ = ["SyncAudit", "SYNC_WARNING"]

SYNC_WARNING = "called a synchronizing CUDA operation"  # what CUDA's sync debug mode warns


class SyncAudit:
    """Counts CUDA's own sync warnings for `steps` steady steps of a rank's first epoch (GPU ranks only)."""

    def __init__(self, device_type: str, steps: int = 3, torch_mod: Any = None,
                 source: Callable[[], str] = lambda: "fastai"):
        self.enabled = device_type == "cuda"
        if self.enabled and torch_mod is None:
            import torch as torch_mod
        self._torch, self.steps, self._source = torch_mod, steps, source  # source: what runs now
        self.counts: Counter = Counter()
        self.seen_steps = 0
        self._ctx: warnings.catch_warnings | None = None

    @property
    def active(self) -> bool:
        return self._ctx is not None

    def start(self) -> bool:
        if not self.enabled or self.active:
            return False
        self.counts, self.seen_steps = Counter(), 0
        self._ctx = warnings.catch_warnings()  # filters and showwarning come back as they were at stop()
        self._ctx.__enter__()
        warnings.filterwarnings("always", message=f".*{SYNC_WARNING}")  # every one, not once per line
        passing_on = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if SYNC_WARNING in str(message):
                self.counts[self._source()] += 1
            else:
                passing_on(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        self._torch.cuda.set_sync_debug_mode("warn")
        return True

    def step_done(self) -> bool:
        """One more audited step; True once the window is full (then call stop)."""
        if self.active:
            self.seen_steps += 1
        return self.active and self.seen_steps >= self.steps

    def stop(self) -> dict:
        """Ends the window; the audit's figures for the epoch record (empty when none ran)."""
        if self._ctx is None:
            return {}
        self._torch.cuda.set_sync_debug_mode("default")
        self._ctx.__exit__(None, None, None)
        self._ctx = None
        steps = max(self.seen_steps, 1)
        return {"audit_steps": self.seen_steps, "audit_syncs_per_step": sum(self.counts.values()) / steps,
                "audit_sources": {src: n / steps for src, n in self.counts.most_common(5)}}
