"""How a job ended, in plain words: the rank that failed first and its traceback, a hung rank's stack,
each automatic restart as it happens, and whether a stop by a signal left a checkpoint to resume from."""
from __future__ import annotations

from collections.abc import Set as AbstractSet

import json
import signal
from pathlib import Path

from ..config import STOPPED_BY_SIGNAL, stop_marker
from .failwatch import is_consequence_message
from .logs import RankLogsSpecs, attempt_of, tail_lines
from ..lines import launcher_line as say

__all__ = ["root_cause", "is_consequence", "summarize_failure", "summarize_hang", "consequences_of", "say_restart",
           "signal_status", "script_exit_status"]

_TAIL_LINES = 40


def _exit_status(exitcode: int) -> int:
    """A worker's exit code as a shell status: signals become 128 + signal number."""
    return 128 - exitcode if exitcode < 0 else (exitcode or 1)


def _message(failure) -> str:
    """A failure's recorded message on one line; for a rank that left without a record (torch's placeholder
    message), how it left."""
    if not _extra(failure):
        code = failure.exitcode
        said = " ".join(str(failure.message or "").split())
        if said and "To enable traceback" not in said:  # the engine's own words (a signal: "Signal 9 (SIGKILL)...")
            return said
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        if code == STOPPED_BY_SIGNAL:
            return f"stopped by a signal with status {code} (it was stopped, it did not fail)"
        return f"exited with status {code} without a Python error (sys.exit or os._exit outside a fit)"
    message = failure.message
    if isinstance(message, dict):
        message = message.get("message", "")
    return " ".join(str(message).split())


def _callstack(failure) -> str:
    """The Python traceback a rank recorded in its error file, if any."""
    message = failure.error_file_data.get("message") if isinstance(failure.error_file_data, dict) else None
    if isinstance(message, dict):
        return str(message.get("extraInfo", {}).get("py_callstack", ""))
    return ""


def _extra(failure) -> dict:
    """What fastlaunch's worker added to the rank's failure record (empty without one)."""
    message = failure.error_file_data.get("message") if isinstance(failure.error_file_data, dict) else None
    return message.get("extraInfo", {}) if isinstance(message, dict) else {}


def _precise_time(failure) -> float:
    """The failure's time: fastlaunch's sub-second record when the rank wrote one."""
    return float(_extra(failure).get("fastlaunch_time", failure.timestamp))


def _exit_code(failure) -> int:
    """The exit code the rank recorded with its failure (the failure watch may have killed it since)."""
    return int(_extra(failure).get("fastlaunch_exit", failure.exitcode))


def is_consequence(failure) -> bool:
    """A rank that failed because another did: the engine or the stop protocol stopped it (SIGTERM, or the
    'stopped by a signal' status with no failure of its own), or its peer vanished."""
    if failure.exitcode == -signal.SIGTERM:
        return True
    if not _extra(failure):
        return failure.exitcode == STOPPED_BY_SIGNAL
    return is_consequence_message(_message(failure))


def root_cause(failures: dict, stopped: AbstractSet[int] = frozenset()) -> int:
    """The global rank that failed first for its own reasons; `stopped`: ranks the failure watch killed
    because another had recorded a failure (never the cause)."""
    failures = {r: f for r, f in failures.items() if r not in stopped} or failures

    def key(item):
        rank, failure = item
        return (is_consequence(failure), failure.error_file_data == {}, _precise_time(failure), rank)
    return min(failures.items(), key=key)[0]


def summarize_failure(err, logs_specs: RankLogsSpecs, console_rank: int, stopped: set[int]) -> int:
    """Name the failing rank, its error and log, and show the tail of its log; return the exit status.
    `stopped`: ranks the failure watch killed because another rank had recorded a failure."""
    failures = err.failures  # global rank -> ProcessFailure
    rank = root_cause(failures, stopped)
    failure = failures[rank]
    log = logs_specs.log_path(rank)
    say(f"fastlaunch: rank {rank} failed (exit code {_exit_code(failure)}): {_message(failure)}")
    # rank 0's own output already reached the console; a user's mistake (UsageError) is its one line
    if rank != console_rank and not _message(failure).startswith("UsageError:"):
        stack = _callstack(failure)
        if stack:
            say(f"fastlaunch: rank {rank}'s traceback:")
            lines = stack.rstrip().splitlines()
        else:
            say(f"fastlaunch: last lines of {log}:")
            lines = tail_lines(log, _TAIL_LINES) if log is not None else []
        for line in lines:
            say(f"  {line}")
    for other in sorted(r for r in failures if r != rank):
        why = "stopped as a consequence" if other in stopped or is_consequence(failures[other]) else "also failed"
        say(f"fastlaunch: rank {other} {why} (exit code {_exit_code(failures[other])}): "
            f"{_message(failures[other])[:160]}")
    say(f"fastlaunch: logs: {logs_specs.log_dir}")
    status = _exit_status(_exit_code(failure))
    # 75 asks a Slurm job to be requeued: a script's error is never that (it would fail again)
    return 1 if status == STOPPED_BY_SIGNAL else status


def summarize_hang(verdict, logs_specs: RankLogsSpecs, stack_taken: bool = True) -> int:
    """Name the hung rank, what it was doing, and the stack it dumped into its log."""
    beat, why = verdict
    say(f"fastlaunch: {beat.who} hung: {why}")
    log = logs_specs.log_path(beat.rank) if beat.started and stack_taken else None
    if log is not None:
        lines = tail_lines(log, _TAIL_LINES)
        start = max((i for i, line in enumerate(lines) if "most recent call first" in line), default=0)
        say(f"fastlaunch: its stack (from {log}):")
        for line in lines[max(0, start - 1):]:
            say(f"  {line}")
    say(f"fastlaunch: the job was stopped; logs: {logs_specs.log_dir}")
    return 1


def script_exit_status(err) -> int | None:
    """N when every rank ended by the script's own sys.exit(N) (the same status everywhere, no failure
    recorded): not a crash, and no rank to blame."""
    codes = {f.exitcode for f in err.failures.values()}
    if len(codes) == 1 and next(iter(codes)) > 0 and not any(_extra(f) for f in err.failures.values()):
        return next(iter(codes))
    return None


def consequences_of(err, killed: set[int]) -> set[int]:
    """Ranks the failure watch killed that recorded no failure of their own: consequences."""
    return {r for r in killed if r in err.failures and not _extra(err.failures[r])}


def say_restart(max_restarts: int):
    """For the failure watch: each failure that the engine will answer with a restart, said at once with
    its traceback (the console otherwise shows only rank 0's view of its peer vanishing)."""
    def on_failure(rank: int, path: Path, record: dict) -> None:
        attempt = attempt_of(path)
        if attempt >= max_restarts:
            return  # the last attempt: the job's own failure summary names it
        stack = str(record.get("py_callstack", "")).rstrip().splitlines()
        say(f"\nfastlaunch: rank {rank} failed in attempt {attempt}: {record.get('message', '')[:300]}; "
              f"restarting the ranks (restart {attempt + 1} of at most {max_restarts})")
        say(f"fastlaunch: rank {rank}'s traceback:")
        for line in stack:
            say(f"  {line}")
    return on_failure


def signal_status(sigval: int, log_dir: Path, ranks: list[int]) -> int:
    """The exit status for a stop by a signal: STOPPED_BY_SIGNAL (requeue me) only when every rank of this
    node stopped at the agreed point with a checkpoint written; else 128 + the signal, and a line why."""
    if sigval not in (signal.SIGTERM, signal.SIGUSR1):
        return 128 + int(sigval)
    written = []
    for rank in ranks:
        try:
            written.append(json.loads(stop_marker(log_dir, rank).read_text()).get("checkpoint"))
        except (OSError, ValueError):
            written.append(None)
    if ranks and all(written):
        return STOPPED_BY_SIGNAL
    say(f"fastlaunch: no checkpoint was written before the ranks stopped (outside a fit, or a rank did not "
          f"reach the agreed stop within --grace): exit status {128 + int(sigval)}, not {STOPPED_BY_SIGNAL}")
    return 128 + int(sigval)
