"""Rank 0's messages shown in the notebook as they arrive, and a cell's outcome over every rank.

Rank 0's kernel publishes what one process would (streams, HTML progress bars and their updates, figures,
tables, clear_output); `Relay.show` republishes each in the notebook's kernel, so the notebook sees it once,
live. The cell's value (rank 0's execute_result) becomes the notebook cell's own result. An error on any
rank becomes the cell's error output with that rank's traceback (rank 0's when it failed too), so "Run All"
stops there as in one process; the ranks keep their state.
"""
from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from typing import Any

__all__ = ["Relay", "CellOutcome", "RankResult", "RankError", "rank_error"]


class Relay:
    """Shows rank 0's iopub messages of the running cell in this kernel; keeps its result."""

    def __init__(self) -> None:
        self.result: dict | None = None

    def show(self, msg: dict) -> bool:
        """Publish one message; True when rank 0 has finished the cell (all its output has been shown)."""
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            stream = sys.stdout if content.get("name") == "stdout" else sys.stderr
            stream.write(content.get("text", ""))
            stream.flush()
        elif kind in ("display_data", "update_display_data"):
            from IPython.display import publish_display_data

            sys.stdout.flush()  # keep printed lines and displays in the order rank 0 made them
            publish_display_data(content.get("data", {}), content.get("metadata") or {},
                                 transient=content.get("transient") or None, update=kind == "update_display_data")
        elif kind == "clear_output":
            from IPython.display import clear_output

            clear_output(wait=content.get("wait", False))
        elif kind == "execute_result":
            self.result = {"data": content.get("data", {}), "metadata": content.get("metadata", {})}
        elif kind == "status":
            return content.get("execution_state") == "idle"
        return False


class RankResult:
    """Rank 0's value of a cell, shown by the notebook as the cell's own result."""

    def __init__(self, data: dict, metadata: dict):
        self._data, self._metadata = data, metadata

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self._data, self._metadata

    def __repr__(self) -> str:
        return str(self._data.get("text/plain", ""))


@dataclass
class CellOutcome:
    """Every rank's execute_reply (in rank order) and rank 0's result."""

    replies: list[dict]
    result: dict | None = None

    def failed(self) -> list[int]:
        return [rank for rank, reply in enumerate(self.replies) if reply.get("status") == "error"]

    def facts(self) -> list[dict]:
        """What each rank said about itself after the cell (fits, memory), where it could."""
        out = []
        for reply in self.replies:
            expr = reply.get("user_expressions", {}).get("facts", {})
            try:
                out.append(ast.literal_eval(expr["data"]["text/plain"]) if expr.get("status") == "ok" else {})
            except (KeyError, ValueError, SyntaxError):
                out.append({})
        return out


class RankError(Exception):
    """A cell's exception on a rank, shown with that rank's traceback (see rank_error)."""

    traceback: list[str] = []


def rank_error(outcome: CellOutcome) -> RankError | None:
    """The error to show for a cell: rank 0's if it failed, else the lowest failing rank's, named."""
    failed = outcome.failed()
    if not failed:
        return None
    rank = failed[0]
    reply = outcome.replies[rank]
    ename, evalue = str(reply.get("ename", "Error")), str(reply.get("evalue", ""))
    lines = list(reply.get("traceback") or [f"{ename}: {evalue}"])
    if rank != 0:
        others = ", ".join(str(r) for r in failed)
        lines.insert(0, f"fastlaunch: this cell failed on rank(s) {others} of {len(outcome.replies)}, "
                        f"not on rank 0; rank {rank}'s traceback:")
    error_class = type(ename, (RankError,), {"__module__": "fastlaunch.session"})
    error = error_class(evalue)
    error.traceback = lines
    return error


def show_rank_error(shell: Any, etype: type, value: BaseException, tb: Any, tb_offset: Any = None) -> list[str]:
    """IPython's custom exception handler for RankError: the cell's error output is the rank's traceback, not
    the session's (ename and evalue are the rank's exception's)."""
    stb = list(getattr(value, "traceback", [str(value)]))
    shell._showtraceback(etype, value, stb)
    return stb
