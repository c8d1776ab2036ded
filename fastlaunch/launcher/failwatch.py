"""The launcher's failure watch: a rank's failure record ends the job at once, not the rank's exit.

A rank that fails writes its error file (worker.py) and then may linger: atexit handlers that wait,
non-daemon threads, a slow teardown. Meanwhile its peers sit in a gradient all-reduce waiting for it.
This thread polls this node's error files; the moment one holds a record of a live rank, every rank of
the node is killed, so the engine sees the job fail and the summary names the recorded rank.
"""
from __future__ import annotations

import json
import os
import signal
import threading

import psutil
from pathlib import Path
from typing import Callable

from ..heartbeat import read_beats
from ..records import CONSEQUENCE_MARKERS, is_consequence_message

__all__ = ["FailureWatch", "read_record", "CONSEQUENCE_MARKERS", "is_consequence_message"]


def read_record(path: Path) -> dict | None:
    """A rank's failure record (the engine's error-file shape: its extraInfo, with the one-line message
    added), or None while it is absent or partial."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    message = data.get("message") if isinstance(data, dict) else None
    if not isinstance(message, dict) or not isinstance(message.get("extraInfo"), dict):
        return None
    return {**message["extraInfo"], "message": " ".join(str(message.get("message", "")).split())}


def _alive(pid: int) -> bool:
    """Running (a zombie, dead but not yet reaped by the engine, is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


class FailureWatch:
    """A thread that stops the node's ranks as soon as one of them records a failure."""

    def __init__(self, error_files: Callable[[], dict[int, Path]], progress: Path, interval: float = 0.1,
                 on_failure: Callable[[int, Path, dict], None] | None = None):
        self._error_files, self._progress, self._interval = error_files, progress, interval
        self._on_failure = on_failure  # told of each rank's own failure (not a consequence) as it is seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastlaunch-failwatch", daemon=True)
        self._acted: set[Path] = set()
        self.stopped: dict[Path, list[int]] = {}  # a failure record -> the global ranks killed because of it

    def __enter__(self) -> "FailureWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def consequences(self) -> set[int]:
        """Ranks of the latest attempt this watch killed because another rank had recorded a failure."""
        current = set(self._error_files().values())
        return {rank for path, killed in self.stopped.items() if path in current for rank in killed}

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            for rank, path in list(self._error_files().items()):
                if path in self._acted:
                    continue
                record = read_record(path)
                if record is None:
                    continue
                self._acted.add(path)
                if is_consequence_message(record.get("py_callstack", "")[-2000:]):
                    continue  # it failed because a peer died: that death is the engine's to see
                if self._on_failure is not None:
                    self._on_failure(rank, path, record)
                pid = int(record.get("fastlaunch_pid", 0))
                if pid and _alive(pid):  # a rank that already exited is the engine's to see
                    self.stopped[path] = self._kill_all(pid)

    def _kill_all(self, failed_pid: int) -> list[int]:
        """SIGKILL every rank of this node (their DataLoader workers follow by parent-death signal)."""
        try:
            beats = read_beats(self._progress)
        except OSError:
            beats = []
        killed = [b.rank for b in beats if b.pid and b.pid != failed_pid and _alive(b.pid) and _kill(b.pid)]
        _kill(failed_pid)
        return killed


def _kill(pid: int) -> bool:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return False
    return True
