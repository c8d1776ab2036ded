"""A rank's failure record: the engine's error file, written the moment a rank fails."""
from __future__ import annotations

import json
import os
import sys
import time
import traceback

__all__ = ["record_failure"]


def record_failure(exc: BaseException, status: int) -> None:
    """Write the engine's error file, with a sub-second time, this process's pid and the exit status it
    would leave with. The launcher acts on the record at once (failwatch.py): a rank that lingers after
    failing (atexit handlers, threads, a slow teardown) never holds its peers in a collective. Written to
    a temporary name and renamed, so the launcher never reads half a record."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    now = time.time()
    message = f"SystemExit: {exc.code}" if isinstance(exc, SystemExit) else f"{type(exc).__name__}: {exc}"
    record = {"message": {"message": message, "extraInfo": {
        "py_callstack": "".join(traceback.format_exception(exc)), "timestamp": str(int(now)),
        "fastlaunch_time": now, "fastlaunch_pid": os.getpid(), "fastlaunch_exit": status}}}
    sys.stdout.flush()
    sys.stderr.flush()
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(record, fh)
        os.replace(tmp, path)
    except OSError:
        pass
