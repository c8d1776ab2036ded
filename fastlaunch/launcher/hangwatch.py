"""The launcher's hang watch: names the rank that stopped making progress, dumps its stack, stops the job.

A rank counts as hung when, inside a fit and outside a known wait (rank 0 downloading, the others
waiting for it), it has published nothing for --hang-timeout seconds; the ranks waiting for it stall
too, inside a collective, so the one outside collectives with the oldest progress is named. A rank that never reaches the
process group while a peer has, for --hang-timeout seconds, is named as well.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

from ..heartbeat import IN_COLLECTIVE, IN_FIT, JOINING_GROUP, OUTPUT_LOST, REACHED_GROUP, WAITING, Beat, read_beats, space_left
from ..lines import launcher_line

__all__ = ["HangWatch", "find_hung"]


def find_hung(beats: list[Beat], now: float, timeout: float, group_seen_at: float | None) -> tuple[Beat, str] | None:
    """The hung rank and why, or None. Pure: tests give it beats and a clock."""
    active = [b for b in beats if b.started and b.flags & IN_FIT and not b.flags & (WAITING | JOINING_GROUP)]
    stale = [b for b in active if now - b.time > timeout]
    if stale:
        # Ranks blocked in a collective wait for the others; the hung one is among those that are not.
        free = [b for b in active if not b.flags & IN_COLLECTIVE]
        culprit = min(free or active, key=lambda b: b.time)
        return culprit, f"no progress for {now - culprit.time:.0f} s; last event: {culprit.where()}"
    if group_seen_at is not None and now - group_seen_at > timeout:
        missing = [b for b in beats if not b.flags & (REACHED_GROUP | JOINING_GROUP | WAITING)]
        if missing:
            culprit = min(missing, key=lambda b: b.time if b.started else 0.0)
            return culprit, (f"never reached the process group ({now - group_seen_at:.0f} s after its peers); "
                             f"last event: {culprit.where()}")
    return None


class HangWatch:
    """A thread reading the progress file once a second; on a hang, records a verdict and stops the ranks."""

    def __init__(self, path: Path, timeout: float, interval: float = 1.0):
        self._path, self._timeout, self._interval = path, timeout, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastlaunch-hangwatch", daemon=True)
        self._group_seen_at: float | None = None
        self.verdict: tuple[Beat, str] | None = None  # (the hung rank's last beat, what happened)
        self.stack_taken = False  # whether the hung rank could dump its stack into its log
        self._lost: set[int] = set()  # ranks whose lost output was said

    def __enter__(self) -> "HangWatch":
        self._thread.start()  # also with --hang-timeout 0: it tells of output a full disk loses
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        try:  # output lost after the last look
            self._tell_lost_output(read_beats(self._path))
        except OSError:
            pass

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                beats = read_beats(self._path)
            except OSError:
                continue
            self._tell_lost_output(beats)
            if self._timeout <= 0:
                continue
            now = time.time()
            if self._group_seen_at is None and any(b.flags & (REACHED_GROUP | JOINING_GROUP) for b in beats):
                self._group_seen_at = now
            found = find_hung(beats, now, self._timeout, self._group_seen_at)
            if found:
                self._stop_job(found, beats)
                return

    def _tell_lost_output(self, beats: list[Beat]) -> None:
        """Once per rank: its output no longer fits in its log (the rank goes on: rank/output_guard.py)."""
        for beat in beats:
            if beat.flags & OUTPUT_LOST and beat.rank not in self._lost:
                self._lost.add(beat.rank)
                launcher_line(f"fastlaunch: {beat.who}'s output no longer fits in its log under {self._path.parent}: "
                              f"no space left ({space_left(self._path.parent)}); training goes on, its output is lost "
                              "until space is freed")

    def _stop_job(self, found: tuple[Beat, str], beats: list[Beat]) -> None:
        culprit, why = found
        if culprit.pid and _stopped(culprit.pid):
            why += "; its process is stopped (SIGSTOP, or a debugger holds it), so no stack could be taken"
        elif culprit.pid:
            _signal(culprit.pid, signal.SIGUSR2)  # faulthandler writes every thread's stack to its log
            self.stack_taken = True
            time.sleep(1.0)
        self.verdict = (culprit, why)
        for beat in beats:  # the engine sees the ranks die and tears the job down
            if beat.pid:
                _signal(beat.pid, signal.SIGKILL)


def _stopped(pid: int) -> bool:
    """True when the process is stopped (state T): it cannot run a signal handler until continued."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
