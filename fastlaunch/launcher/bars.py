"""Progress bars as their final states: what a log file or a pipe should hold of fastai's live bars.

A console progress bar redraws one line with carriage returns; in a file that becomes long runs of `\\r`
fragments. `BarCollapser` keeps, for each line, only what the last redraw showed (a bar that cleared itself
keeps its last drawn state), and `tidy_log` rewrites a finished rank log that way. The launcher's console keeps
the live bar when it is a terminal.
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["BarCollapser", "final_state", "tidy_log"]

_BLANK = " \t\u2588"  # fastprogress clears a bar with spaces and marks a new one with a lone block


def final_state(line: bytes) -> bytes:
    """The text a terminal would show last for one line written with carriage returns."""
    segments = line.split(b"\r")
    shown = [s for s in segments if s.decode(errors="replace").strip(_BLANK)]
    return shown[-1].rstrip() if shown else b""


class BarCollapser:
    """Streaming: feed bytes as they come, get complete lines in their final state."""

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, data: bytes) -> bytes:
        self._pending += data
        *complete, self._pending = self._pending.split(b"\n")
        out = []
        for line in complete:
            if b"\r" in line or (line.strip() and not line.decode(errors="replace").strip(_BLANK)):
                line = final_state(line)
                if not line:  # a bar that only cleared itself, or fastprogress's lone block
                    continue
            out.append(line + b"\n")
        return b"".join(out)

    def flush(self) -> bytes:
        """What is left of an unfinished line, in its final state."""
        rest, self._pending = self._pending, b""
        state = final_state(rest)
        return state + b"\n" if state.strip() else b""


def tidy_log(path: Path) -> None:
    """Rewrite a finished log with every progress bar in its final state (nothing else changes)."""
    try:
        data = path.read_bytes()
    except OSError:
        return
    if b"\r" not in data:
        return
    collapser = BarCollapser()
    tidy = collapser.feed(data) + collapser.flush()
    tmp = path.with_name(path.name + ".tidy")
    tmp.write_bytes(tidy)
    tmp.replace(path)
