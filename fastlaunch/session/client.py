"""A notebook session's ranks, seen from the notebook's kernel.

`Session.start` runs the launcher as a child process (`python -m fastlaunch FLAGS --run-dir D kernel.py`),
the same engine as the command line: the elastic agent starts the ranks, each rank serves the notebook's
cells from an IPython kernel (rank/kernel.py) and says where it listens. The session connects to every
rank with jupyter_client, sends each cell to all of them, shows rank 0's messages as they arrive
(relay.py) and waits for every rank's reply. The notebook's kernel imports neither torch nor fastai.

The launcher runs in its own process group (the notebook's interrupt button must reach the ranks through
the session, not the launcher) and dies with the notebook's kernel: parent-death signal, and `stop` at exit.
"""
from __future__ import annotations

import ast
import ctypes
import importlib.util
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from ..notebooks import FACTS_EXPRESSION, ready_path
from .folder import new_kernel_folder
from .relay import CellOutcome, Relay

__all__ = ["Session", "SessionOver", "Refused"]

_READY_GUARD_S = 900.0  # a hang guard for the ranks' start (imports, rendezvous), not a timing
_STOP_WAIT_S = 30.0
_INTERRUPT_GRACE_S = 10.0  # after an interrupt, how long ranks that stopped wait for the others (a guard)
_PR_SET_PDEATHSIG = 1
# The launcher's summary of how the ranks ended (launcher/outcome.py): a failure, a hang, a signal.
_SUMMARY = re.compile(r"^(rank \d+ (failed|also failed|stopped)|.* hung: |interrupted|SIG\w+ received|"
                      r"the script exited)")


def _die_with_parent() -> None:
    """In the launcher's child process: SIGKILL when the notebook's kernel goes, however it goes."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _kernel_file() -> str:
    spec = importlib.util.find_spec("fastlaunch.rank.kernel")  # its path, without importing the rank side
    assert spec is not None and spec.origin is not None
    return spec.origin


def _value(expression_reply: dict) -> Any:
    """A user expression's value (its repr, read back), or None when it failed."""
    if expression_reply.get("status") != "ok":
        return None
    try:
        return ast.literal_eval(expression_reply["data"]["text/plain"])
    except (KeyError, ValueError, SyntaxError):
        return None


class SessionOver(Exception):
    """The ranks are gone (a rank died, a hang was named, the launcher was stopped)."""


class Refused(Exception):
    """The launcher refused the session's flags: its own one-line error, HINT included."""


class Session:
    """The ranks of one interactive session: started, fed cells, interrupted, stopped."""

    def __init__(self, tokens: list[str], run_dir: Path, process: subprocess.Popen, log: Path, kernels: Path):
        self.tokens, self.run_dir, self.process, self.log = tokens, run_dir, process, log
        self.kernels = kernels  # the ranks' private folder: their ipc sockets (and, until connected, keys)
        self.clients: list[Any] = []
        self.pids: list[int] = []
        self.device = "cpu"
        self.started = time.monotonic()
        self.traceback: list[str] = []  # a failed rank's, once the ranks are gone

    # -- starting ------------------------------------------------------------------------------------------
    @classmethod
    def start(cls, tokens: list[str], run_dir: Path, say: Callable[[str], None]) -> "Session":
        """Start the ranks and connect to each; a UsageError (the launcher's own line) if it refuses."""
        log = run_dir / "launcher.log"
        # fresh, 0700, this user's (mkdtemp), outside the run directory, which others may be able to read
        kernels = new_kernel_folder()
        command = [sys.executable, "-m", "fastlaunch", *tokens, "--run-dir", str(run_dir), _kernel_file(),
                   str(kernels)]
        try:
            with open(log, "ab") as out:
                process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out,
                                           stderr=subprocess.STDOUT, start_new_session=True,
                                           preexec_fn=_die_with_parent)
        except OSError:
            shutil.rmtree(kernels, ignore_errors=True)
            raise
        session = cls(tokens, run_dir, process, log, kernels)
        try:
            session._connect(say)
        except BaseException:
            session.stop(quiet=True)
            raise
        return session

    def _world_size(self) -> int | None:
        try:
            saved = yaml.safe_load((self.run_dir / "launch.yaml").read_text())
            self.device = str(saved.get("device", "cpu"))
            return int(saved["nproc_per_node"])
        except (OSError, yaml.YAMLError, KeyError, TypeError, ValueError):
            return None

    def _connect(self, say: Callable[[str], None]) -> None:
        from jupyter_client import BlockingKernelClient

        deadline = time.monotonic() + _READY_GUARD_S
        world = None
        while True:
            if self.process.poll() is not None:
                raise Refused(self._refusal())
            world = world or self._world_size()
            if world is not None and all(ready_path(self.kernels, r).exists() for r in range(world)):
                break
            if time.monotonic() > deadline:
                raise SessionOver(f"the ranks did not start within {_READY_GUARD_S:.0f} s; see {self.log}")
            time.sleep(0.1)
        for rank in range(world):
            ready = json.loads(ready_path(self.kernels, rank).read_text())
            client = BlockingKernelClient(connection_file=ready["connection_file"])
            client.load_connection_file()
            Path(ready["connection_file"]).unlink(missing_ok=True)  # its key now lives in memory only
            client.start_channels()
            client.wait_for_ready(timeout=120)
            self.clients.append(client)
            self.pids.append(int(ready["pid"]))
        say(f"fastlaunch: {world} rank{'s' if world > 1 else ''} on {self.device} ready in "
            f"{time.monotonic() - self.started:.1f}s; every cell runs on every rank (%%local: this kernel only); "
            f"run dir {self.run_dir}")

    def _refusal(self) -> str:
        """The launcher's own words when it exits before the ranks are ready."""
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("fastlaunch: error:")]
        if errors:  # its one-line error: what, the value, HINT
            return errors[-1]
        said = " / ".join(lines[-3:]) or f"exit status {self.process.returncode}"
        return f"fastlaunch: error: the session's ranks did not start (got {said}). HINT: see {self.log}"

    # -- running cells ---------------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def run(self, code: str, relay: Relay) -> CellOutcome:
        """Run one cell on every rank; rank 0's messages go to `relay` as they arrive."""
        if not self.alive:
            raise SessionOver(self._gone())
        ids = [c.execute(code, store_history=True, allow_stdin=False, user_expressions={"facts": FACTS_EXPRESSION})
               for c in self.clients]
        return self._wait(ids, relay)

    def call(self, expression: str) -> list[Any]:
        """An expression evaluated on every rank between cells (status, free): each rank's value."""
        if not self.alive:
            raise SessionOver(self._gone())
        ids = [c.execute("", silent=True, store_history=False, user_expressions={"v": expression})
               for c in self.clients]
        outcome = self._wait(ids, None)
        return [_value(reply.get("user_expressions", {}).get("v", {})) for reply in outcome.replies]

    def _wait(self, ids: list[str], relay: Relay | None) -> CellOutcome:
        import zmq

        poller = zmq.Poller()
        channels = {}
        for rank, client in enumerate(self.clients):
            for kind, channel in (("iopub", client.iopub_channel), ("shell", client.shell_channel)):
                poller.register(channel.socket, zmq.POLLIN)
                channels[channel.socket] = (rank, kind, channel)
        replies: list[dict | None] = [None] * len(self.clients)
        rank_zero_idle = relay is None
        told = False
        first_reply_at: float | None = None
        interrupted_at: float | None = None
        while not (rank_zero_idle and all(r is not None for r in replies)):
            if interrupted_at is not None and time.monotonic() - interrupted_at > _INTERRUPT_GRACE_S:
                self._end_waiting(replies)
            try:
                ready = dict(poller.poll(200))
                for socket in ready:
                    rank, kind, channel = channels[socket]
                    while channel.msg_ready():
                        msg = channel.get_msg(timeout=0)
                        if msg["parent_header"].get("msg_id") != ids[rank]:
                            continue
                        if kind == "shell":
                            replies[rank] = msg["content"]
                            first_reply_at = first_reply_at or time.monotonic()
                        elif rank == 0 and relay is not None:
                            rank_zero_idle = relay.show(msg) or rank_zero_idle
                if not self.alive:
                    raise SessionOver(self._gone())
                if (not told and first_reply_at is not None and time.monotonic() - first_reply_at > 10
                        and any(r and r.get("status") == "error" for r in replies)):
                    told = True
                    failed = [str(i) for i, r in enumerate(replies) if r and r.get("status") == "error"]
                    running = [str(i) for i, r in enumerate(replies) if r is None]
                    print(f"fastlaunch: rank(s) {', '.join(failed)} failed this cell; rank(s) {', '.join(running)} "
                          "still run it: if they wait for the failed ones, interrupt the kernel", file=sys.stderr)
            except KeyboardInterrupt:  # the notebook's interrupt button: every rank stops at one batch
                self.interrupt()
                interrupted_at = interrupted_at or time.monotonic()
        for socket in channels:
            poller.unregister(socket)
        return CellOutcome([r or {} for r in replies], relay.result if relay is not None else None)

    def _end_waiting(self, replies: list) -> None:
        """After an interrupt, ranks still busy while others stopped wait in a collective for them, where no
        signal reaches Python: end the world (every variable is lost) rather than freeze the notebook."""
        waiting = [i for i, r in enumerate(replies) if r is None]
        stopped = [i for i, r in enumerate(replies) if r is not None]
        if not stopped:
            return  # no rank stopped yet: every one is still busy (a long native call); keep waiting
        for rank in waiting:
            try:
                os.kill(self.pids[rank], signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            self.process.wait(timeout=_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()
        shutil.rmtree(self.kernels, ignore_errors=True)
        raise SessionOver(f"after the interrupt rank(s) {', '.join(map(str, waiting))} still waited (in a collective, "
                          f"for rank(s) {', '.join(map(str, stopped))}, which stopped): the session's world was ended")

    def interrupt(self) -> None:
        for pid in self.pids:
            try:
                os.kill(pid, signal.SIGINT)
            except ProcessLookupError:
                pass

    # -- ending ------------------------------------------------------------------------------------------------
    def _gone(self) -> str:
        """What the launcher said when the ranks went away: its lines naming what happened (a failed rank's
        traceback, which the launcher shows after them, is kept in `self.traceback`)."""
        try:
            self.process.wait(timeout=_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            pass
        else:
            shutil.rmtree(self.kernels, ignore_errors=True)  # the ranks are gone: so are their sockets
        said = self.log.read_text(errors="replace").splitlines()
        lines = [ln.strip()[len("fastlaunch: "):] for ln in said if ln.startswith("fastlaunch: ")]
        named = [ln for ln in lines if _SUMMARY.match(ln)]
        start = next((i for i, ln in enumerate(said) if re.match(r"fastlaunch: rank \d+'s traceback:", ln)), None)
        if start is not None:
            tail = itertools.takewhile(lambda ln: ln.startswith("  "), said[start + 1:])
            self.traceback = [ln[2:] for ln in tail]
        return " / ".join(named[:2]) or f"the launcher exited with status {self.process.returncode}"

    def stop(self, quiet: bool = False) -> int | None:
        """Shut every rank's kernel down, let the launcher finish (its report), and close the channels."""
        for client in self.clients:
            try:
                client.shutdown()
            except Exception:
                pass
        try:
            self.process.wait(timeout=_STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=_STOP_WAIT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for client in self.clients:
            try:
                client.stop_channels()
            except Exception:
                pass
        self.clients = []
        shutil.rmtree(self.kernels, ignore_errors=True)  # sockets, and any key a rank wrote after connecting
        return self.process.returncode
