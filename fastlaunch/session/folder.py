"""Where a session's rank kernels listen: a fresh private folder per session, outside the run directory.

mkdtemp makes it atomically, mode 0700, this user's: no other local user can list it, plant a connection
file in it or connect to the ipc sockets the kernels open there. The session removes each connection file
(its key) as soon as it has connected, and the folder when the ranks end; a folder left by a notebook
kernel that was killed outright holds no key, and the next session removes it once its ranks are dead.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ["new_kernel_folder"]

_PREFIX = "fastlaunch-session-"


def _remove_dead_sessions() -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{_PREFIX}*"):
        try:
            if folder.stat().st_uid != os.geteuid():
                continue
            pids = [int(json.loads(p.read_text())["pid"]) for p in folder.glob("rank*.ready.json")]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if pids and not any(Path(f"/proc/{pid}").exists() for pid in pids):
            shutil.rmtree(folder, ignore_errors=True)


def new_kernel_folder() -> Path:
    """A fresh private folder for one session's rank kernels (stale ones of dead sessions removed first)."""
    _remove_dead_sessions()
    return Path(tempfile.mkdtemp(prefix=_PREFIX))
