"""Progress of each rank, in shared memory: written by the rank once per batch, read by the launcher.

One fixed-size slot per local rank in a memory-mapped file of the run directory: a beat is a memory
write (no system call), so it costs about a microsecond. The launcher's watch reads the slots once a
second to tell a hung rank from ranks that only wait for it.

A beat marks progress (the time, a counter, epoch and batch) at each batch's start and at the events
between batches. Which callback runs is not beaten at every call: the dispatch keeps it in a CallSite
(one attribute store per call), and a publisher thread copies its name into the slot's event field when
it changes (twice a second), so a rank stuck inside a callback is still named with it. Entering and
leaving a collective writes the flags alone: no beat.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import re
import shutil
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Beat", "CallSite", "Heartbeat", "NoHeartbeat", "read_beats", "progress_file", "create", "open_slot", "SLOT",
           "IN_FIT", "WAITING", "REACHED_GROUP", "JOINING_GROUP", "IN_COLLECTIVE", "OUTPUT_LOST", "filesystem_of", "space_left"]

# time, counter, pid, global rank, epoch, iter, flags (1: in a fit, 2: waiting in a known wait,
# 4: reached the process group, 8: joining it, i.e. waiting for its peers, 16: inside a collective, 32: its
# output no longer fits in its log: the disk is full), event name
_FORMAT = "<dqiiiii40s"
_PACKER = struct.Struct(_FORMAT)
SLOT = _PACKER.size
_FLAGS_AT = struct.calcsize("<dqiiii")  # the flags field's offset in a slot
_EVENT_AT = _FLAGS_AT + 4
_FLAGS = struct.Struct("<i")
IN_FIT, WAITING, REACHED_GROUP, JOINING_GROUP, IN_COLLECTIVE, OUTPUT_LOST = 1, 2, 4, 8, 16, 32


def progress_file(run_dir: Path) -> Path:
    return Path(run_dir) / "logs" / ".progress"


@dataclass(frozen=True)
class Beat:
    """One rank's last published progress."""

    time: float
    counter: int
    pid: int
    rank: int
    epoch: int
    iter: int
    flags: int
    event: str
    slot: int = 0  # the local rank

    @property
    def who(self) -> str:
        """The rank's name: its global rank once it published one, else its local rank."""
        return f"rank {self.rank}" if self.started else f"local rank {self.slot}"

    @property
    def started(self) -> bool:
        return self.counter > 0

    def where(self) -> str:
        """Plain words: the event it was in, and where in the fit."""
        place = f" (epoch {self.epoch}, batch {self.iter})" if self.flags & IN_FIT else ""
        return f"{self.event or 'starting'}{place}"


class CallSite:
    """The callback the dispatch runs now (cb None: fastai's own code), read only when a name is needed."""

    __slots__ = ("cb", "event")

    def __init__(self) -> None:
        self.cb: object = None
        self.event = ""

    def label(self) -> str:
        cb = self.cb
        return "fastai" if cb is None else f"{type(cb).__name__}.{self.event}"


class Heartbeat:
    """A rank's writer for its slot."""

    def __init__(self, path: Path, local_rank: int, rank: int):
        self._offset = local_rank * SLOT
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, 0)
        finally:
            os.close(fd)
        self._counter, self._flags, self._rank = 0, 0, rank
        self._epoch = self._iter = 0
        self._event = b""
        self._names: dict[str, bytes] = {}  # event names as written: encoded once, not at every beat
        self._pid = os.getpid()  # getpid is a system call; a forked child refreshes its copy
        self._collective = _Flagged(self, IN_COLLECTIVE)
        os.register_at_fork(after_in_child=self._refresh_pid)

    def _refresh_pid(self) -> None:
        self._pid = os.getpid()

    def beat(self, event: str | None = None, epoch: int | None = None, iteration: int | None = None) -> None:
        """Record progress now (and optionally where)."""
        if event is not None:
            name = self._names.get(event)
            if name is None:
                name = self._names[event] = event.encode()[:40]
            self._event = name
        if epoch is not None:
            self._epoch = epoch
        if iteration is not None:
            self._iter = iteration
        self._counter += 1
        _PACKER.pack_into(self._map, self._offset, time.time(), self._counter, self._pid, self._rank,
                          self._epoch, self._iter, self._flags, self._event)

    def set_flag(self, flag: int, on: bool = True, beat: bool = True) -> None:
        self._flags = (self._flags | flag) if on else (self._flags & ~flag)
        if beat:
            self.beat()
        else:
            _FLAGS.pack_into(self._map, self._offset + _FLAGS_AT, self._flags)

    def follow(self, site: CallSite, interval: float = 0.5) -> None:
        """Publish the name of the callback running now whenever it changes (a daemon thread): a rank stuck
        in a callback between beats is named with it."""
        def publish() -> None:
            last: tuple = (None, "")
            while True:
                time.sleep(interval)
                now = (site.cb, site.event)
                if now[0] is not None and (now[0] is not last[0] or now[1] != last[1]):
                    name = site.label().encode()[:40]
                    self._event = name
                    self._map[self._offset + _EVENT_AT: self._offset + _EVENT_AT + 40] = name.ljust(40, b"\0")
                last = now

        threading.Thread(target=publish, name="fastlaunch-callsite", daemon=True).start()

    def in_collective(self) -> "_Flagged":
        """Marks a blocking collective: a rank waiting in one waits for its peers, it is not the hung one.
        One object, reused: the gradient all-reduce enters it at every step."""
        return self._collective


def create(path: Path, local_ranks: int) -> None:
    """The launcher makes the zeroed file before the ranks start, its bytes allocated for real: a full disk
    is an OSError here, never a SIGBUS in a rank when a beat touches a page of the mapping."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = SLOT * local_ranks
    with open(path, "wb") as fh:
        fh.write(bytes(size))
        fh.flush()
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fh.fileno(), 0, size)
        os.fsync(fh.fileno())


def filesystem_of(path: Path) -> tuple[str, int]:
    """(the device that holds path, as `DEVICE at MOUNT`; its free bytes): for the one line of a full disk."""
    where = Path(os.path.realpath(path))
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        free = -1
    mount = where
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    device = str(mount)
    with contextlib.suppress(OSError):
        with open("/proc/self/mounts") as fh:
            for line in fh:
                fields = line.split()
                if len(fields) > 1 and re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), fields[1]) == str(mount):
                    device = f"{fields[0]} at {mount}"  # the last mount of a point is the one in use
    return device, free


def space_left(path: Path) -> str:
    """`N bytes free on DEVICE at MOUNT`, for the filesystem that holds path."""
    device, free = filesystem_of(path)
    return f"{free if free >= 0 else 'unknown'} bytes free on {device}"


def read_beats(path: Path) -> list[Beat]:
    """Every slot of the file (zeroed slots: ranks not started yet)."""
    data = path.read_bytes()
    beats = []
    for offset in range(0, len(data) - SLOT + 1, SLOT):
        t, counter, pid, rank, epoch, it, flags, event = _PACKER.unpack_from(data, offset)
        beats.append(Beat(t, counter, pid, rank, epoch, it, flags, event.rstrip(b"\0").decode(errors="replace"),
                          slot=offset // SLOT))
    return beats


class _Flagged:
    """A flag set on the heartbeat for the time of a with block."""

    def __init__(self, beats: Heartbeat, flag: int):
        self._beats, self._flag = beats, flag

    def __enter__(self) -> None:
        self._beats.set_flag(self._flag, True, beat=False)

    def __exit__(self, *exc) -> None:
        self._beats.set_flag(self._flag, False, beat=False)


class NoHeartbeat:
    """Stands in for a Heartbeat where the launcher made no progress file (a rank run by hand, tests)."""

    def beat(self, event: str | None = None, epoch: int | None = None, iteration: int | None = None) -> None:
        pass

    def set_flag(self, flag: int, on: bool = True, beat: bool = True) -> None:
        pass

    def follow(self, site: CallSite, interval: float = 0.5) -> None:
        pass

    def in_collective(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def open_slot(run_dir: Path | None, local_rank: int, rank: int) -> "Heartbeat | NoHeartbeat":
    """This rank's slot when the launcher made a progress file, else a stand-in that records nothing."""
    if run_dir is None or not progress_file(run_dir).exists():
        return NoHeartbeat()
    beats = Heartbeat(progress_file(run_dir), local_rank, rank)
    beats.beat("starting the script")
    return beats
