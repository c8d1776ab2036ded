"""Intervals of a rank's training, timed without waiting for the device.

CPU ranks: the host clock. GPU ranks: CUDA events recorded on the rank's stream (recording never waits)
and read once per epoch, so a step's time is the device's, not how fast the host queued the kernels.
"""
from __future__ import annotations

import time
from typing import Any

__all__ = ["Clock"]


class Clock:
    """Named intervals: begin(key) ... end(key), as many as wanted; totals() reads them all at once."""

    def __init__(self, device_type: str, torch_mod: Any = None):
        self.events = device_type == "cuda"
        if self.events and torch_mod is None:
            import torch as torch_mod
        self._torch = torch_mod
        self.reset()

    def reset(self) -> None:
        self._open: dict[str, Any] = {}
        self._done: dict[str, list] = {}
        self._last = None

    def _now(self) -> Any:
        if not self.events:
            return time.perf_counter()
        event = self._torch.cuda.Event(enable_timing=True)
        event.record()
        self._last = event
        return event

    def begin(self, key: str) -> None:
        self._open[key] = self._now()

    def end(self, key: str) -> None:
        start = self._open.pop(key, None)
        if start is not None:
            self._done.setdefault(key, []).append((start, self._now()))

    def running(self, key: str) -> bool:
        return key in self._open

    def totals(self) -> dict[str, float]:
        """Seconds per key, summed over its intervals (on GPU: one wait, for the last event recorded)."""
        if self.events and self._last is not None:
            self._last.synchronize()  # every earlier event on the stream is then complete too
        out = {}
        for key, spans in self._done.items():
            if self.events:
                out[key] = sum(a.elapsed_time(b) for a, b in spans) / 1000.0  # elapsed_time is in ms
            else:
                out[key] = sum(b - a for a, b in spans)
        self.reset()
        return out
