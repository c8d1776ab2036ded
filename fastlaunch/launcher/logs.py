"""Per-rank log files for the engine (logs/rank<R>.log) and rank 0's output followed onto the console."""
from __future__ import annotations

import os
import threading
from collections import deque
from pathlib import Path
from typing import Callable, TextIO

from torch.distributed.elastic.multiprocessing.api import LogsDest, LogsSpecs

from .bars import BarCollapser, final_state
from .rundir import attempt_of, rank_log_name

__all__ = ["RankLogsSpecs", "ConsoleFollower", "tail_lines", "rank_log_name", "attempt_of"]


class RankLogsSpecs(LogsSpecs):
    """One file per global rank and attempt, stdout and stderr together, plus an error file each.

    The engine opens stdout and stderr of a rank on the same path; the worker's first act is to point
    its stderr at its stdout descriptor, so both streams share one file offset from then on.
    """

    def __init__(self, log_dir: Path, console_rank: int = 0,
                 on_console_log: Callable[[Path], None] | None = None):
        super().__init__(log_dir=str(log_dir))
        self.log_dir = Path(log_dir)
        self._console_rank = console_rank
        self._on_console_log = on_console_log
        self._paths: dict[int, Path] = {}
        self._error_files: dict[int, Path] = {}

    @property
    def root_log_dir(self) -> str:
        return str(self.log_dir)

    def log_path(self, rank: int) -> Path | None:
        """The latest attempt's log of a global rank, if this node ran it."""
        return self._paths.get(rank)

    def error_files(self) -> dict[int, Path]:
        """The latest attempt's error file of each global rank this node runs."""
        return dict(self._error_files)

    def reify(self, envs: dict[int, dict[str, str]]) -> LogsDest:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        dest = LogsDest()
        for local_rank, env in envs.items():
            rank = int(env["RANK"])
            attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
            log = self.log_dir / rank_log_name(rank, attempt)
            error_file = self.log_dir / rank_log_name(rank, attempt, "error.json")
            error_file.unlink(missing_ok=True)
            dest.stdouts[local_rank] = dest.stderrs[local_rank] = str(log)
            dest.error_files[local_rank] = str(error_file)
            env["TORCHELASTIC_ERROR_FILE"] = str(error_file)
            self._paths[rank] = log
            self._error_files[rank] = error_file
            if rank == self._console_rank and self._on_console_log is not None:
                self._on_console_log(log)
        return dest


def tail_lines(path: Path, n: int) -> list[str]:
    """The last n lines of a text file, progress bars in their final state."""
    try:
        with open(path, "rb") as fh:
            lines = deque((final_state(line.rstrip(b"\n")).decode(errors="replace") for line in fh), maxlen=n)
    except OSError:
        return []
    return list(lines)


class ConsoleFollower:
    """Copies a growing log file to the console as it is written, switching files on restart."""

    def __init__(self, out: TextIO, interval: float = 0.05):
        self._out, self._interval = out, interval
        self._path: Path | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fastlaunch-console", daemon=True)
        self._mid_line = False  # rank 0's last output did not end its line (a progress bar)
        # a terminal shows the live progress bar; a pipe or a file gets each bar's final state
        self._collapse = None if getattr(out, "isatty", lambda: False)() else BarCollapser()

    def follow(self, path: Path) -> None:
        """Follow this file from its start (a new attempt's rank 0 log)."""
        with self._lock:
            self._path = path

    def __enter__(self) -> "ConsoleFollower":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        rest = self._collapse.flush() if self._collapse is not None else b""
        if rest:
            self._write(rest)
        if self._mid_line:  # the launcher's own lines that follow start on a fresh line
            self._write(b"\n")

    def _write(self, data: bytes) -> None:
        self._mid_line = not data.endswith(b"\n")
        buffer = getattr(self._out, "buffer", None)
        if buffer is not None:
            self._out.flush()
            buffer.write(data)
            buffer.flush()
        else:
            self._out.write(data.decode(errors="replace"))
            self._out.flush()

    def _run(self) -> None:
        current, fd = None, None
        try:
            while True:
                stopping = self._stop.is_set()  # read before draining so the last bytes are never lost
                with self._lock:
                    wanted = self._path
                if wanted != current and wanted is not None and wanted.exists():
                    if fd is not None:
                        os.close(fd)
                    fd, current = os.open(wanted, os.O_RDONLY), wanted
                chunk = os.read(fd, 1 << 16) if fd is not None else b""
                if chunk:
                    shown = self._collapse.feed(chunk) if self._collapse is not None else chunk
                    if shown:
                        self._write(shown)
                    continue
                if stopping:
                    return
                self._stop.wait(self._interval)
        finally:
            if fd is not None:
                os.close(fd)
