"""The pieces of agreed stops and whole-set metrics, in one process."""
from __future__ import annotations

import pytest
import torch
from fastai.callback.core import CancelEpochException, CancelFitException, CancelTrainException

from fastlaunch.callbacks.agreement import StopState
from fastlaunch.callbacks.metrics import interleave


def test_most_severe_request_wins_and_is_marked_agreed():
    state = StopState(torch.device("cpu"))
    state.request(CancelTrainException)
    state.request(CancelFitException)
    assert state.outgoing().tolist() == [1.0, 0.0, 1.0]
    with pytest.raises(CancelFitException) as exc:
        state.agree([1.0, 0.0, 2.0])
    assert exc.value.agreed and state.pending == [0, 0, 0]


def test_stops_not_allowed_at_a_point_are_dropped():
    state = StopState(torch.device("cpu"))
    state.request(CancelTrainException)
    state.agree([0.0, 0.0, 1.0], allowed=(CancelFitException, CancelEpochException))  # training is over
    assert state.pending == [0, 0, 0]
    state.agree([0.0, 0.0, 0.0])  # nothing asked: nothing raised


def test_flags_carried_by_backward_are_read_once():
    state = StopState(torch.device("cpu"))
    assert state.take_received() is None
    state.receive(torch.tensor([0.0, 1.0, 0.0]))
    assert state.take_received() == [0.0, 1.0, 0.0]
    assert state.take_received() is None


def test_interleave_restores_dataset_order_without_padding():
    n, world = 7, 2
    parts = [torch.arange(r, n, world) for r in range(world)]  # rank 0: 0 2 4 6, rank 1: 1 3 5
    assert interleave(parts, n).tolist() == list(range(n))
    parts3 = [torch.arange(r, 10, 3).float()[:, None].repeat(1, 2) for r in range(3)]
    assert interleave(parts3, 10)[:, 0].tolist() == [float(i) for i in range(10)]
