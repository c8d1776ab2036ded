"""An exception that leaves a distributed fit on some ranks only: that rank cannot go on in step.

Inside a fit every rank makes the same collectives in the same order. When an exception (a bug in a
callback, `sys.exit(3)`, an out-of-memory error) leaves the fit on one rank while its peers train on, the
peers wait for it in the next gradient all-reduce, and nothing the failing rank does afterwards can meet
them: a script that catches the exception and carries on, an atexit handler that lingers, or a notebook
session's kernel that shows the error and waits for the next cell would each leave the peers waiting until
the hang timeout, which then names a waiting rank.

So the ranks count their escapes on the job's store. When every rank leaves the same fit with an exception
within a grace (3 steps, 0.5 to 3 s: the same bug everywhere, and the ranks are within a step of each other
once training runs), the exception goes on as
in one process: the script may catch it, a session shows it and lives on. Otherwise this rank writes its
failure record and leaves at once with the exception's status; the launcher's failure watch stops the
peers within a second, names this rank and shows its traceback.
"""
from __future__ import annotations

import os
import sys
import time
import traceback

from ..errors import UsageError
from ..records import is_consequence_message
from .failure import record_failure

__all__ = ["GRACE_S", "settle", "exit_status", "grace_for"]

_KILL_WAIT_S = 10.0
GRACE_S = 3.0  # the longest a failing rank waits for its peers to fail in the same fit (a guard, not a timing)
_MIN_GRACE_S = 0.5


def grace_for(elapsed_s: float, steps: int) -> float:
    """How long to wait for peers failing alike: after a first step the ranks move in step (every step ends in
    a gradient all-reduce), so peers failing the same way come within a step: 3 steps, from 0.5 to 3 s.
    Before one, the ranks may be seconds apart (setup): the longest."""
    if steps < 1:
        return GRACE_S
    return min(GRACE_S, max(_MIN_GRACE_S, 3 * elapsed_s / steps))


def exit_status(exc: BaseException) -> int:
    """The status a process leaving with exc would have: SystemExit's code, a UsageError's 2, else 1."""
    if isinstance(exc, SystemExit):
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    return exc.exit_code if isinstance(exc, UsageError) else 1


def settle(ctx, fit_index: int, exc: BaseException, grace_s: float = GRACE_S) -> None:
    """Called where an exception leaves a distributed fit: returns when every rank left it the same way
    (or when this is not a distributed run, or a zero exit); otherwise records the failure and exits."""
    if not ctx.env.is_distributed or ctx.env.world_size <= 1 or exit_status(exc) == 0:
        return
    if is_consequence_message(str(exc)):  # a peer died first: its death is the launcher's to name
        return
    try:
        if ctx.comm.all_arrive(f"escaped_fit/{fit_index}", grace_s):
            return
    except Exception:  # no store to count on: the peers cannot be told, so this rank must not linger
        pass
    status = exit_status(exc)
    record_failure(exc, status)  # the launcher's failure watch now stops every rank of the node, this one too
    if isinstance(exc, UsageError):  # a mistake the user made: its one line
        print(exc, file=sys.stderr)
    elif not isinstance(exc, SystemExit):
        traceback.print_exception(exc)
    print(f"fastlaunch: rank {ctx.env.rank} left fit {fit_index} with {type(exc).__name__} while its peers "
          "trained on; ending the job (the peers cannot continue without it)", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    time.sleep(_KILL_WAIT_S)  # a hang guard: the watch kills within a second; alone (no launcher) leave anyway
    os._exit(status)
