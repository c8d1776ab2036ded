"""The run directory: runs/<YYYYmmdd-HHMMSS>-<stem>[-N]/, created once, never shared by two runs; or the one
--run-dir names (DIR/node<N>/ for each machine of a multi-node job), which only the starts of one job share
(--auto-resume, autoresume.py)."""
from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path

import yaml

from ..config import LaunchConfig
from ..errors import UsageError
from .trust import check_run_dir
from .autoresume import archive_logs, check_requeues, node_dir, previous_start

__all__ = ["prepare_run_dir", "claim_unique", "rank_log_name", "attempt_of", "LAUNCH_FILE"]

LAUNCH_FILE = "launch.yaml"


def rank_log_name(rank: int, attempt: int, suffix: str = "log") -> str:
    """logs/rank<R>.log on the first attempt, rank<R>.attempt<A>.log after a restart."""
    return f"rank{rank}.{suffix}" if attempt == 0 else f"rank{rank}.attempt{attempt}.{suffix}"


def attempt_of(path: Path) -> int:
    """The attempt a log or error file belongs to (rank_log_name's inverse)."""
    part = Path(path).name.split(".")[1]
    return int(part[len("attempt"):]) if part.startswith("attempt") else 0


def claim_unique(root: Path, name: str) -> Path:
    """mkdir is atomic: the first run to create a name owns it; later ones take -2, -3, ..."""
    root.mkdir(parents=True, exist_ok=True)
    for n in range(1, 10_000):
        path = root / (name if n == 1 else f"{name}-{n}")
        try:
            path.mkdir()
            return path
        except FileExistsError:
            continue
    raise UsageError("no free run directory name", root / name, "clean up old runs or pass --run-dir")


def _write_new(path: Path, text: str) -> None:
    """Write a file of the run directory afresh, never through a link planted where it goes."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)


def prepare_run_dir(config: LaunchConfig, root: Path = Path("runs"), now: float | None = None) -> LaunchConfig:
    """Create the run directory (or check the one given), write launch.yaml, return the final config."""
    start = 0
    try:
        if config.run_dir is None:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(now))
            path = claim_unique(root.resolve(), f"{stamp}-{config.script.stem}")
        elif config.multi_node and config.node_rank is None:  # the rendezvous orders the machines: no fixed name
            check_run_dir(config.run_dir.resolve())
            path = claim_unique(config.run_dir, socket.gethostname())
        else:
            check_run_dir(config.run_dir.resolve())
            path = node_dir(config.run_dir, config.multi_node, config.node_rank)
            if path != config.run_dir:
                check_run_dir(path.resolve())
            if (path / LAUNCH_FILE).exists():
                if not config.auto_resume:
                    raise UsageError("--run-dir already holds another run", path,
                                     "pass a new directory, or leave --run-dir out for a fresh runs/<stamp>-<stem>")
                start = (previous_start(path) or 0) + 1  # a requeued start of the same job
                check_requeues(path, start, config.max_requeues)
                archive_logs(path, start - 1)
            path.mkdir(parents=True, exist_ok=True)
        (path / "logs").mkdir(exist_ok=True)
        config = dataclasses.replace(config, run_dir=path, start=start)
        _write_new(path / LAUNCH_FILE, yaml.safe_dump(config.as_dict(), sort_keys=False))
    except OSError as err:
        raise UsageError("cannot write the run directory", f"{err.filename or config.run_dir}: {err.strerror}",
                         "pass --run-dir pointing to a writable place") from None
    return config
