"""A rank's output on a full disk: lost, said once, and the script goes on.

The engine points a rank's stdout and stderr at its log file. When the filesystem fills up, every `print`
(fastai's progress bars included) would raise `OSError: [Errno 28] No space left on device` in the
script, and a training that could go on would die of its own logging. The rank's streams are wrapped: a
write or flush that fails for want of space is dropped, and the rank raises a flag in its heartbeat slot
(shared memory, allocated when the run started: it needs no space), which the launcher turns into one line
naming the log and the free space. Output comes back by itself once there is room again.
"""
from __future__ import annotations

import errno
import sys
from typing import Any, Callable

__all__ = ["guard_output", "FULL"]

FULL = (errno.ENOSPC, errno.EDQUOT)


class _Guarded:
    """A text stream whose writes and flushes survive a full disk."""

    def __init__(self, stream: Any, on_full: Callable[[], None]):
        self._stream, self._on_full = stream, on_full

    def _guard(self, call: Callable[[], Any], dropped: Any) -> Any:
        try:
            return call()
        except OSError as err:
            if err.errno not in FULL:
                raise
            self._on_full()
            return dropped

    def write(self, text: str) -> int:
        return self._guard(lambda: self._stream.write(text), len(text))

    def flush(self) -> None:
        self._guard(self._stream.flush, None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def guard_output(beats: Any) -> None:
    """Wrap this process's stdout and stderr (once)."""
    from ..heartbeat import OUTPUT_LOST

    def on_full() -> None:
        beats.set_flag(OUTPUT_LOST, beat=False)

    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _Guarded):
            setattr(sys, name, _Guarded(stream, on_full))
