"""An exception leaving a distributed fit (rank/escape.py): on every rank it goes on, as in one process; on
some ranks only, that rank records its failure and leaves with the exception's own status."""
from __future__ import annotations

import types

import pytest

from fastlaunch.errors import UsageError
from fastlaunch.rank import escape


def _ctx(arrive: bool, distributed: bool = True):
    calls = []

    def all_arrive(key, grace_s):
        calls.append(key)
        return arrive
    env = types.SimpleNamespace(is_distributed=distributed, world_size=2 if distributed else 1, rank=1)
    return types.SimpleNamespace(env=env, comm=types.SimpleNamespace(all_arrive=all_arrive)), calls


@pytest.fixture
def leaving(monkeypatch):
    """What settle did when it ended the rank: (the failure recorded, the exit status)."""
    seen: dict = {}
    monkeypatch.setattr(escape, "record_failure", lambda exc, status: seen.update(record=(type(exc), status)))
    monkeypatch.setattr(escape.time, "sleep", lambda s: None)

    def leave(status):
        seen["exit"] = status
        raise RuntimeError("left")
    monkeypatch.setattr(escape.os, "_exit", leave)
    return seen


def test_every_rank_leaving_the_same_fit_goes_on_as_one_process(leaving):
    ctx, calls = _ctx(arrive=True)
    escape.settle(ctx, 3, ValueError("same everywhere"))
    assert calls == ["escaped_fit/3"] and leaving == {}


@pytest.mark.parametrize("exc, status", [(ValueError("only here"), 1), (SystemExit(3), 3), (SystemExit("why"), 1),
                                         (KeyboardInterrupt(), 1),
                                         (UsageError("a step skipped alone", 1, "cancel before backward"), 2)])
def test_a_rank_leaving_alone_records_its_failure_and_leaves_with_its_status(leaving, exc, status):
    ctx, _ = _ctx(arrive=False)
    with pytest.raises(RuntimeError, match="left"):
        escape.settle(ctx, 0, exc)
    assert leaving == {"record": (type(exc), status), "exit": status}


@pytest.mark.parametrize("exc, distributed", [(SystemExit(0), True), (SystemExit(None), True),
                                              (ValueError("x"), False),
                                              (RuntimeError("[pair.cc:589] Connection closed by peer"), True)])
def test_no_wait_for_a_clean_exit_one_process_or_a_peer_that_died_first(leaving, exc, distributed):
    ctx, calls = _ctx(arrive=False, distributed=distributed)
    escape.settle(ctx, 0, exc)
    assert calls == [] and leaving == {}


def test_the_grace_is_three_steps_within_half_a_second_and_three_before_a_first_step_the_longest():
    assert escape.grace_for(10.0, 0) == escape.GRACE_S == 3.0
    assert escape.grace_for(1.0, 100) == 0.5  # 10 ms steps
    assert escape.grace_for(4.0, 10) == pytest.approx(1.2)  # 0.4 s steps
    assert escape.grace_for(100.0, 10) == 3.0
