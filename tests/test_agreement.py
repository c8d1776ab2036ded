"""The pieces of agreed stops and whole-set metrics, in one process."""
from __future__ import annotations

import pytest
import torch
from fastai.callback.core import CancelEpochException, CancelFitException, CancelTrainException

from fastlaunch.rank.stopchannel import Interrupted, Preempted, StopChannel
from fastlaunch.rank.callbacks.metrics import interleave


def test_most_severe_request_wins_and_is_marked_agreed():
    state = StopChannel(torch.device("cpu"))
    state.request(CancelTrainException)
    state.request(CancelFitException)
    assert state.outgoing().tolist() == [0.0, 0.0, 1.0, 0.0, 1.0, 0.0, 0.0]  # preempt, interrupt, fit, epoch, train, skip, alone
    with pytest.raises(CancelFitException) as exc:
        state.agree([0.0, 0.0, 1.0, 0.0, 2.0, 0.0, 0.0])
    assert exc.value.agreed and state.pending == [0, 0, 0, 0, 0, 0, 0]


def test_stops_not_allowed_at_a_point_are_dropped():
    state = StopChannel(torch.device("cpu"))
    state.request(CancelTrainException)
    state.outgoing()  # the flags leave with a collective
    state.agree([0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0], allowed=(CancelFitException, CancelEpochException))  # training is over
    assert state.pending == [0, 0, 0, 0, 0, 0, 0]
    state.agree([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # nothing asked: nothing raised


def test_a_preemption_waits_for_a_batch_boundary_or_the_epoch_end_then_checkpoints_and_leaves():
    state = StopChannel(torch.device("cpu"))
    written = []
    state.on_preempt = written.append
    state.request(Preempted)
    state.agree([1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0], allowed=(CancelFitException, CancelEpochException))  # end of training
    assert state.pending == [1, 0, 0, 0, 0, 0, 0] and written == []  # kept, on every rank, for the epoch's end
    with pytest.raises(SystemExit) as leaving:
        state.agree(state.outgoing().tolist(), allowed=(Preempted, CancelFitException), position="epoch_end")
    assert leaving.value.code == 75 and written == ["epoch_end"]


def test_flags_carried_by_backward_are_read_once():
    state = StopChannel(torch.device("cpu"))
    assert state.take_received() is None
    state.receive(torch.tensor([0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]))
    assert state.take_received() == [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert state.take_received() is None


class _FakeEvent:
    """A CUDA event on CPU: records which events the host waited for."""

    waited: list = []

    def __init__(self):
        self.step = None

    def record(self):
        self.step = len(_FakeEvent.made)
        _FakeEvent.made.append(self)

    def synchronize(self):
        _FakeEvent.waited.append(self.step)


def _gpu_like_channel():
    _FakeEvent.made, _FakeEvent.waited = [], []
    return StopChannel(torch.device("cpu"), deferred=True, new_event=_FakeEvent)


def _backward(channel):
    """One step's flags as the gradient all-reduce sums them (one rank), then what the rank reads."""
    channel.receive(channel.outgoing())
    return channel.take_received()


def test_gpu_ranks_read_flags_two_steps_late_and_never_wait_for_the_step_before():
    from fastlaunch.rank.stopchannel import READ_LAG

    channel = _gpu_like_channel()
    reads = []
    for step in range(6):
        if step == 1:
            channel.request(CancelEpochException)
        flags = _backward(channel)
        reads.append(flags)
        if flags is not None:
            try:
                channel.agree(flags)
            except CancelEpochException:
                reads.append("cancelled")
    assert READ_LAG == 2 and reads[:2] == [None, None]
    # the request rode step 1 (and was consumed there): read and acted on at step 3, once
    assert reads[2:] == [[0.0] * 7, [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0], "cancelled", [0.0] * 7, [0.0] * 7]
    # at step s the host waited for step s-2's event only: the step before is never waited for
    assert _FakeEvent.waited == [0, 1, 2, 3]


def test_flags_in_flight_when_a_stop_is_acted_on_do_not_act_again():
    channel = _gpu_like_channel()
    channel.request(CancelEpochException)
    _backward(channel)
    channel.pending = [0, 0, 0, 1, 0, 0, 0]  # another request of the same stop, sent with the next step too
    _backward(channel)
    with pytest.raises(CancelEpochException):
        channel.agree(_backward(channel))
    later = [_backward(channel) for _ in range(3)]  # step 1's flags, still in flight, carried the same request
    assert later == [[0.0] * 7] * 3
    for flags in later:
        channel.agree(flags)  # nothing raised


def test_interleave_restores_dataset_order_without_padding():
    n, world = 7, 2
    parts = [torch.arange(r, n, world) for r in range(world)]  # rank 0: 0 2 4 6, rank 1: 1 3 5
    assert interleave(parts, n).tolist() == list(range(n))
    parts3 = [torch.arange(r, 10, 3).float()[:, None].repeat(1, 2) for r in range(3)]
    assert interleave(parts3, 10)[:, 0].tolist() == [float(i) for i in range(10)]


def test_a_request_made_after_the_flags_left_is_kept_for_the_next_collective():
    state = StopChannel(torch.device("cpu"))
    sent = state.outgoing().tolist()  # packed into the gradients during backward...
    state.request(Preempted)  # ...then a signal arrives before the flags are read
    state.agree(sent)
    assert state.pending == [1, 0, 0, 0, 0, 0, 0]  # not lost: it travels with the next step's gradients
    with pytest.raises(SystemExit):
        state.agree(state.outgoing().tolist())


def test_an_interrupt_cancels_the_fit_on_every_rank_and_is_remembered():
    state = StopChannel(torch.device("cpu"))
    state.request(Interrupted)
    state.request(CancelTrainException)
    with pytest.raises(CancelFitException) as exc:  # fastai's own cancel: after_fit runs, the model is intact
        state.agree(state.outgoing().tolist(), allowed=(CancelFitException, CancelEpochException))
    assert exc.value.agreed and state.interrupted and state.pending == [0, 0, 0, 0, 0, 0, 0]


def test_a_batch_cancelled_before_the_all_reduce_is_skipped_by_every_rank_on_cpu_and_passes_on_a_gpu():
    from types import SimpleNamespace

    from fastai.callback.core import CancelBatchException

    from fastlaunch.rank.stopchannel import KINDS, SkipBatch

    skip = [0.0] * len(KINDS)
    skip[KINDS.index(SkipBatch)] = 1.0  # one of two ranks cancelled its batch
    state = StopChannel(torch.device("cpu"), comm=SimpleNamespace(world_size=2))
    state.request(SkipBatch)
    assert state.skipping  # its gradients go out as zeros
    state.outgoing()
    with pytest.raises(CancelBatchException) as exc:
        state.agree(skip)
    assert exc.value.agreed and not state.skipping
    other = StopChannel(torch.device("cpu"), comm=SimpleNamespace(world_size=2))  # the rank that did not cancel
    with pytest.raises(CancelBatchException):
        other.agree(skip)
    late = StopChannel(torch.device("cpu"), comm=SimpleNamespace(world_size=2), deferred=True)  # read steps late
    late.agree(skip)  # nothing raised: the step went on with the other ranks' gradients


def test_a_step_skipped_by_one_rank_alone_is_an_error_naming_the_callback_and_fine_when_every_rank_skips():
    from types import SimpleNamespace

    from fastai.callback.core import CancelStepException

    from fastlaunch.errors import UsageError
    from fastlaunch.rank.stopchannel import KINDS, SkippedAlone

    class ClipOrSkip:
        pass

    def raised():
        try:
            raise CancelStepException()
        except CancelStepException as exc:
            return exc

    for skipped_by, error in ((1, True), (2, False)):
        state = StopChannel(torch.device("cpu"), comm=SimpleNamespace(world_size=2))
        state.skipped_alone(ClipOrSkip(), "before_step", raised())
        state.outgoing()
        summed = [0.0] * len(KINDS)
        summed[KINDS.index(SkippedAlone)] = float(skipped_by)
        if error:
            with pytest.raises(UsageError) as exc:
                state.agree(summed)
            assert "CancelStepException raised by ClipOrSkip.before_step (" in str(exc.value)
            assert "test_agreement.py:" in str(exc.value) and "HINT:" in str(exc.value)
        else:
            state.agree(summed)
        assert state.pending == [0] * len(KINDS)


def test_on_a_gpu_a_skip_every_rank_made_is_fine_when_its_flags_arrive_steps_late():
    from types import SimpleNamespace

    from fastai.callback.core import CancelStepException

    from fastlaunch.rank.stopchannel import KINDS, SkippedAlone

    state = StopChannel(torch.device("cpu"), comm=SimpleNamespace(world_size=2), deferred=True)
    state.skipped_alone(object(), "before_step", CancelStepException())  # GradScaler's skip, on every rank
    state.outgoing()
    state.agree([0.0] * len(KINDS))  # the flags read now were sent before the skip: nothing to judge yet
    both = [0.0] * len(KINDS)
    both[KINDS.index(SkippedAlone)] = 2.0
    state.agree(both)  # every rank skipped: no error
    assert state._alone is None
