"""Whether a run directory that already exists may be used: nobody else can have put anything in it.

A run directory holds what a run reads back (launch.yaml, checkpoints to resume from) and what it writes
(logs, the heartbeat, the report). One that another local user can write lets them plant a checkpoint
(--auto-resume would load their weights) or a symbolic link where a log goes (the run would overwrite the
file it points to with the rank's output). So --run-dir, its logs/ and checkpoints/ must be directories
(not links) owned by this user and writable by nobody else, and no entry in them may be a link. Group
write is allowed only for the user's own private group (a umask of 002 on systems that give each user a
group of their own). The folders fastlaunch makes itself (runs/<stamp>-<stem>) are trusted by construction.
"""
from __future__ import annotations

import grp
import os
import pwd
import stat
from pathlib import Path

from ..errors import UsageError

__all__ = ["check_run_dir", "SUBFOLDERS"]

SUBFOLDERS = ("logs", "checkpoints")
_HINT = "use a directory of your own that only you can write (chmod go-w DIR), or leave --run-dir out"


def _private_group(gid: int) -> bool:
    """The user's primary group with no other member: group write gives nobody else anything."""
    if gid != os.getegid():
        return False
    try:
        members = set(grp.getgrgid(gid).gr_mem)
        me = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        return False
    return members <= {me}


def _check_folder(path: Path) -> bool:
    """Refuse a folder that is a link, not a directory, someone else's or writable by others; False when
    absent."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return False
    if stat.S_ISLNK(info.st_mode):
        raise UsageError("a run directory's folder is a symbolic link", f"{path} -> {os.readlink(path)}", _HINT)
    if not stat.S_ISDIR(info.st_mode):
        raise UsageError("a run directory's folder is not a directory", path, _HINT)
    mode = stat.filemode(info.st_mode)
    if info.st_uid != os.geteuid():
        raise UsageError("the run directory belongs to another user", f"{path}: owner uid {info.st_uid}, {mode}",
                         _HINT)
    if info.st_mode & stat.S_IWOTH or (info.st_mode & stat.S_IWGRP and not _private_group(info.st_gid)):
        raise UsageError("the run directory can be written by other users", f"{path}: {mode}", _HINT)
    return True


def check_run_dir(path: Path) -> None:
    """Refuse an existing run directory that others could have written into (see the module's text)."""
    if not _check_folder(path):
        return
    for folder in (path, *(path / name for name in SUBFOLDERS)):
        if folder != path and not _check_folder(folder):
            continue
        for entry in os.scandir(folder):
            if entry.is_symlink():
                raise UsageError("the run directory holds a symbolic link", f"{entry.path} -> "
                                 f"{os.readlink(entry.path)}", "remove it; fastlaunch never follows links there")
