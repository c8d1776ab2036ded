"""fastlaunch's own lines, through `logging`: the launcher's on its stderr (logger `fastlaunch.launcher`), a
rank's on its stdout (logger `fastlaunch.rank`: the rank's log, rank 0's followed onto the console).

Each line is the message alone, exactly as it reads on the console; the streams are looked up when a line
is written, so a redirected stdout/stderr receives it. A user quiets or routes them with the usual
logging configuration (e.g. `logging.getLogger("fastlaunch.rank").setLevel(logging.WARNING)`).
"""
from __future__ import annotations

import logging
import sys

__all__ = ["launcher_line", "rank_line", "rank_warning", "LAUNCHER", "RANK"]

LAUNCHER, RANK = "fastlaunch.launcher", "fastlaunch.rank"


class _StdStream(logging.Handler):
    """Writes to sys.stdout or sys.stderr as they are at the time of the line, and flushes; warnings go to
    stderr whatever the logger's stream."""

    def __init__(self, stream: str):
        super().__init__()
        self.stream = stream

    def emit(self, record: logging.LogRecord) -> None:
        try:
            out = getattr(sys, "stderr" if record.levelno >= logging.WARNING else self.stream)
            out.write(self.format(record) + "\n")
            out.flush()
        except Exception:
            self.handleError(record)


def _logger(name: str, stream: str) -> logging.Logger:
    log = logging.getLogger(name)
    if not any(isinstance(h, _StdStream) for h in log.handlers):
        handler = _StdStream(stream)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.propagate = False  # a script's root configuration does not reformat or duplicate them
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
    return log


def launcher_line(message: str) -> None:
    """A line of the launcher's (stderr)."""
    _logger(LAUNCHER, "stderr").info(message)


def rank_line(message: str) -> None:
    """A line of a rank's own (stdout: its log; rank 0's reaches the console)."""
    _logger(RANK, "stdout").info(message)


def rank_warning(message: str) -> None:
    """A rank's line about a problem it survives (stderr; in the rank's log like every line of it)."""
    _logger(RANK, "stdout").warning(message)
