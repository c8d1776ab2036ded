"""`%load_ext fastlaunch`: interactive sessions in a notebook.

    %fastlaunch --cpu 2        start N ranks (the command line's flags and defaults); then every cell runs
                               on every rank, in order, with state kept across cells
    %%local                    this cell in the notebook's kernel only
    %fastlaunch status         ranks, devices, memory now and since the session began
    %fastlaunch free           collect garbage and return cached GPU memory on every rank
    %fastlaunch stop           end the ranks (the run's report is written)
    %fastlaunch restart        a fresh world with the same flags

Routing: while a session runs, an input transformer puts `%%ranks` in front of every cell that is not a
session command or `%%local`; the `%%ranks` cell magic sends the cell to every rank (client.py) and shows
rank 0's output live (relay.py).
"""
from __future__ import annotations

import atexit
import shutil
import re
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from IPython.core.error import UsageError as IPythonUsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from ..errors import UsageError
from ..notebooks import RANK_HELPERS
from .client import Refused, Session, SessionOver
from .memory import MemoryLog
from .relay import RankError, RankResult, Relay, rank_error, show_rank_error

__all__ = ["load_ipython_extension", "FastlaunchMagics"]

_KEEP_LOCAL = re.compile(r"^\s*(%%local\b|%%ranks\b|%fastlaunch\b|%(load|reload|unload)_ext\b)")
_NOT_IN_SESSIONS = {"nnodes": "a session runs on this machine", "node_rank": "a session runs on this machine",
                    "rdzv_endpoint": "a session runs on this machine", "rdzv_id": "a session runs on this machine",
                    "resume": "a session starts fresh; resume a script or a notebook file with `fastlaunch --resume`",
                    "max_restarts": "restarted ranks would lose the notebook's state; use `%fastlaunch restart`"}
_COMMANDS = ("status", "free", "stop", "restart")


def _refuse(what: str, got: object, hint: str) -> IPythonUsageError:
    return IPythonUsageError(str(UsageError(what, got, hint)))


@magics_class
class FastlaunchMagics(Magics):
    def __init__(self, shell: Any):
        super().__init__(shell)
        self.session: Session | None = None
        self.tokens: list[str] = []
        self.local_depth = 0
        self.memory: MemoryLog | None = None
        self.records_seen: dict[int, int] = {}  # per rank: epoch records already reported
        self.fits_seen = 0
        self.cells = 0
        atexit.register(self.close)

    # -- %fastlaunch ---------------------------------------------------------------------------------------
    @line_magic
    def fastlaunch(self, line: str) -> None:
        """Start a session of N ranks (`%fastlaunch --cpu 2`), or: status, free, stop, restart."""
        words = shlex.split(line)
        if words and words[0] in _COMMANDS:
            if len(words) > 1:
                raise _refuse(f"%fastlaunch {words[0]} takes no arguments", line, f"write `%fastlaunch {words[0]}`")
            getattr(self, f"_{words[0]}")()
            return
        if self.session is not None and self.session.alive:
            raise _refuse("a session is already running", f"{len(self.session.pids)} ranks, {self.session.run_dir}",
                          "`%fastlaunch restart` for a fresh world, or `%fastlaunch stop` first")
        self._start(words)

    def _start(self, tokens: list[str], again: bool = False) -> None:
        """`again`: a restart, whose --run-dir (the last world's) takes the next free name: DIR-2, DIR-3, ..."""
        from ..launcher.options import BOOL_FLAGS, VALUE_FLAGS, parse_tokens
        from ..launcher.parsing import split_argv
        from ..launcher.rundir import claim_unique

        try:
            flags, script, _ = split_argv(tokens, VALUE_FLAGS, BOOL_FLAGS)
            if script is not None:
                raise UsageError("a session runs the notebook's cells, not a script", script,
                                 "run a script with `!fastlaunch --cpu 2 train.py`, or leave it out here")
            options, given = parse_tokens(flags)
            for name in sorted(given & set(_NOT_IN_SESSIONS)):
                raise UsageError(f"--{name.replace('_', '-')} is not for notebook sessions", " ".join(tokens),
                                 _NOT_IN_SESSIONS[name])
            made = options["run_dir"] is None or again  # a folder this call makes: removed if nothing starts
            if options["run_dir"] is not None:
                run_dir = Path(options["run_dir"]).resolve()
                if again and run_dir.exists():
                    run_dir = claim_unique(run_dir.parent, run_dir.name)
                flags = [t for i, t in enumerate(flags) if t != "--run-dir" and not t.startswith("--run-dir=")
                         and (i == 0 or flags[i - 1] != "--run-dir")]
            else:
                run_dir = claim_unique(Path("runs").resolve(), f"{time.strftime('%Y%m%d-%H%M%S')}-notebook")
            run_dir.mkdir(parents=True, exist_ok=True)
        except UsageError as err:
            raise IPythonUsageError(str(err)) from None
        try:
            self.session = Session.start(flags, run_dir, say=print)
        except Refused as err:
            if made:  # nothing started: nothing left
                shutil.rmtree(run_dir, ignore_errors=True)
            raise IPythonUsageError(str(err)) from None
        except SessionOver as err:
            raise _refuse("the session did not start", err, "see the run directory's launcher.log") from None
        self.tokens, self.memory = tokens, MemoryLog(run_dir / "session_memory.jsonl")
        self.records_seen, self.fits_seen = {}, 0

    def _live(self) -> Session:
        if self.session is None:
            raise _refuse("no session is running", "this cell", "start one with `%fastlaunch --cpu 2` (or --gpus N)")
        return self.session

    def _status(self) -> None:
        session = self._live()
        if not session.alive:
            print(f"fastlaunch: the session has ended; run dir {session.run_dir}. `%fastlaunch restart` starts a new one")
            return
        self._print_facts(session.call(f"{RANK_HELPERS}['facts']()"), "now")

    def _free(self) -> None:
        session = self._live()
        try:
            self._print_facts(session.call(f"{RANK_HELPERS}['free']()"), "after freeing")
        except SessionOver as err:
            self._over(err)

    def _print_facts(self, facts: list[Any], when: str) -> None:
        for fact in facts:
            if not fact:
                continue
            growth = self.memory.growth(fact["rank"], fact["reserved_mb"]) if self.memory else 0.0
            print(f"fastlaunch: rank {fact['rank']} (pid {fact['pid']}, {fact['device']}): {fact['fits']} fit(s); "
                  f"{fact['memory']} {when}: {fact['allocated_mb']:.0f} MB allocated, {fact['reserved_mb']:.0f} MB "
                  f"reserved ({growth:+.0f} MB since the session began)")

    def _stop(self) -> None:
        session = self._live()
        status = session.stop()
        self.session = None  # cells run in this kernel again
        print(f"fastlaunch: session stopped (status {status}); cells run in this kernel again; "
              f"run dir {session.run_dir}")

    def _restart(self) -> None:
        old = self.session
        if old is not None:
            old.stop(quiet=True)
        self.session = None
        try:
            self._start(self.tokens, again=True)
        except BaseException:
            self.session = old  # not started: cells must still say the ranks are gone, not run here
            raise

    def close(self) -> None:
        """At the kernel's exit: no rank left behind."""
        if self.session is not None:
            self.session.stop(quiet=True)

    # -- cells ------------------------------------------------------------------------------------------------
    @cell_magic
    def ranks(self, line: str, cell: str) -> Any:
        """Run the cell on every rank (what every cell does in a session)."""
        session = self._live()
        relay = Relay()
        try:
            outcome = session.run(cell, relay)
        except SessionOver as err:
            self._over(err)
        self.cells += 1
        self._after_cell(session, outcome.facts())
        error = rank_error(outcome)
        if error is not None:
            raise error
        return RankResult(**outcome.result) if outcome.result else None

    def _over(self, err: Exception) -> None:
        if self.session is not None and self.session.traceback:  # the failed rank's own traceback first
            print("\n".join(self.session.traceback), file=sys.stderr)
        raise _refuse("the session's ranks are gone", err,
                      "`%fastlaunch restart` starts a fresh world (the ranks' variables are lost)") from None

    def _after_cell(self, session: Session, facts: list[dict]) -> None:
        """After a cell that trained: its report lines, and memory recorded (advice once, when it keeps growing)."""
        from ..launcher.report import assemble_report, read_records, render_text

        new: list[dict] = []
        counts: dict[int, int] = {}
        for record in read_records(session.run_dir):  # each rank's records in time order
            n = counts[record["rank"]] = counts.get(record["rank"], 0) + 1
            if n > self.records_seen.get(record["rank"], 0):
                new.append(record)
        self.records_seen = counts
        if new:
            report = assemble_report(session.run_dir, len(session.pids), records=new)
            for line in render_text(report).splitlines():  # each epoch's figures were shown as it ended
                if line.startswith("fastlaunch: diagnosis:") and "missing from the report" not in line:
                    print(line)
        fits = int(facts[0].get("fits", 0)) if facts and facts[0] else 0
        trained, self.fits_seen = fits > self.fits_seen, max(fits, self.fits_seen)
        if self.memory is not None:
            self.memory.baseline(facts)
        if trained and self.memory is not None:
            advice = self.memory.record(self.cells, facts)
            if advice:
                print(advice)

    @cell_magic
    def local(self, line: str, cell: str) -> None:
        """Run the cell in the notebook's kernel only."""
        self.local_depth += 1
        try:
            assert self.shell is not None
            self.shell.run_cell(cell)
        finally:
            self.local_depth -= 1

    def route(self, lines: list[str]) -> list[str]:
        """Input transformer: while a session exists, a cell goes to the ranks unless it is a session command."""
        if self.session is None or self.local_depth or not lines:
            return lines
        first = next((line for line in lines if line.strip()), "")
        if not first or _KEEP_LOCAL.match(first):
            return lines
        return ["%%ranks\n", *lines]


def load_ipython_extension(shell: Any) -> None:
    from IPython.core.interactiveshell import InteractiveShell

    if not isinstance(shell, InteractiveShell):
        raise UsageError("fastlaunch's notebook sessions need an IPython kernel", type(shell).__name__,
                         "use the Python 3 (ipykernel) kernel in Jupyter")
    if any(isinstance(m, FastlaunchMagics) for m in shell.magics_manager.registry.values()):
        return  # loaded already
    magics = FastlaunchMagics(shell)
    shell.register_magics(magics)
    shell.input_transformers_cleanup.append(magics.route)
    shell.set_custom_exc((RankError,), show_rank_error)
