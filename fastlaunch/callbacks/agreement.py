"""Agreed stops: a cancel raised on one rank stops every rank at the same batch, with no extra collective.

fastai's cancel exceptions (CancelFit/Epoch/Train) raised by any callback on any rank are held as a
request instead of unwinding that rank alone (which would leave the others waiting in the next
all-reduce forever). The request travels to the other ranks inside a collective that happens anyway:
  - every training step: four extra numbers appended to DDP's last gradient bucket (a comm hook);
  - at the end of training and of validation: the epoch-end reductions of the recorder and metrics;
  - at the end of each epoch (after the trackers): one small all_reduce per epoch.
Every rank reads the same summed flags at the same point and raises the same exception there.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from fastai.callback.core import (CancelEpochException, CancelFitException,
                                  CancelTrainException)

from .. import heartbeat
from ..config import STOPPED_BY_SIGNAL
from ..instrument import syncs
from .base import LeanCallback

__all__ = ["StopState", "AgreedStop", "flag_bucket_hook", "ROUTED", "KINDS", "Preempted", "stop_state",
           "active_state", "STOPPED_BY_SIGNAL"]


class Preempted(Exception):
    """A stop asked by a signal (SIGTERM, SIGUSR1): checkpoint, then leave with STOPPED_BY_SIGNAL."""


# The cancels fastai's callbacks raise, routed through agreement.
ROUTED = (CancelFitException, CancelEpochException, CancelTrainException)
# Every kind of stop, most severe first: a request for a bigger stop wins when several are pending.
KINDS = (Preempted, *ROUTED)
_active: "StopState | None" = None


def active_state() -> "StopState | None":
    """The StopState of the distributed fit running in this process, if any (for signal handlers)."""
    return _active if _active is not None and _active.active else None
_all_reduce = dist.all_reduce  # captured once: DDP's own traffic, not counted as fastlaunch collectives


class StopState:
    """This rank's pending stop requests, and the flags last received from all ranks."""

    def __init__(self, device: torch.device):
        global _active
        self.device = device
        self.pending = [0] * len(KINDS)
        self.active = False
        self.on_preempt = None  # called on every rank as (position,) before leaving; rank 0 checkpoints
        _active = self
        self._received: torch.Tensor | None = None
        self._in_flight: tuple[torch.Tensor, object] | None = None

    def request(self, exc_type: type) -> None:
        """Hold a cancel raised on this rank until every rank can act on it."""
        for i, cls in enumerate(KINDS):
            if issubclass(exc_type, cls):
                self.pending[i] = 1
                return

    def outgoing(self, dtype=torch.float32) -> torch.Tensor:
        """The flags to add to a collective this rank takes part in anyway."""
        return torch.tensor(self.pending, dtype=dtype, device=self.device)

    def receive(self, summed: torch.Tensor) -> None:
        """Keep the summed flags from the last gradient all-reduce (read after backward)."""
        self._received = summed

    def take_received(self) -> list[float] | None:
        """The flags carried by a backward, the same on every rank at the same step.

        On CPU they are read at once. On a GPU, reading them now would block the host until the
        all-reduce finishes (a sync per step), so they are copied without blocking and read one step
        later: every rank still acts at the same step, one batch after the request.
        """
        received, self._received = self._received, None
        if received is None:
            return None
        if received.device.type != "cuda":
            with syncs.not_counted():  # already on the host: reading it waits for nothing
                return received.tolist()
        previous, event = self._in_flight or (None, None)
        host = received.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        self._in_flight = (host, done)
        if previous is None:
            return None
        event.synchronize()  # recorded a whole step ago: already complete in practice
        with syncs.not_counted():
            return previous.tolist()

    def agree(self, summed: list[float], allowed: tuple[type, ...] = KINDS, position: str = "batch") -> None:
        """Act, on every rank alike, on the most severe stop any rank asked for (if allowed here).

        A preemption is acted on between batches or at the end of an epoch; elsewhere (end of training,
        end of validation) it stays pending on every rank until the end of the epoch.
        """
        self.pending = [0] * len(KINDS)
        for flag, cls in zip(summed, KINDS):
            if flag <= 0:
                continue
            if cls is Preempted and Preempted not in allowed:
                self.pending[0] = 1  # every rank saw the same sum: every rank keeps it for the epoch's end
                continue
            if cls not in allowed:
                continue
            if cls is Preempted:
                if self.on_preempt is not None:
                    self.on_preempt(position)
                raise SystemExit(STOPPED_BY_SIGNAL)
            exc = cls()
            exc.agreed = True  # raised by agreement: not intercepted again
            raise exc


def stop_state(learn) -> StopState | None:
    """The StopState of a Learner in a distributed fit, else None."""
    state = getattr(learn, "_fastlaunch_stop", None)
    return state if state is not None and state.active else None


def _done(value: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


def flag_bucket_hook(state: StopState, bucket) -> torch.futures.Future:
    """DDP comm hook: average the gradients; on the last bucket, sum the stop flags alongside.

    On CPU (gloo) each bucket is reduced on the calling thread: a Python continuation run by a gloo
    thread takes CPython's thread-state lock, and a DataLoader worker forked at that instant deadlocks
    in the child. On GPUs (NCCL) the work's future completes as it is enqueued, so the continuation
    runs on the calling thread anyway and the reduction stays overlapped with the backward pass.
    """
    world = dist.get_world_size()
    buffer = bucket.buffer()
    last = bucket.is_last()
    packed = torch.cat([buffer.div(world), state.outgoing(buffer.dtype)]) if last else buffer.div_(world)

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        if not last:
            return tensor
        state.receive(tensor[-len(KINDS):])
        return tensor[: -len(KINDS)]

    if buffer.device.type == "cpu":
        with heartbeat.in_collective():
            _all_reduce(packed)
        return _done(unpack(packed))
    fut = _all_reduce(packed, async_op=True).get_future()
    return fut.then(lambda f: unpack(f.value()[0]))


# DDP checks the hook's annotations as objects; this module's postponed annotations are strings.
flag_bucket_hook.__annotations__.update(bucket=dist.GradBucket, state=StopState,
                                        **{"return": torch.futures.Future[torch.Tensor]})


class AgreedStop(LeanCallback):
    """Acts on agreed flags after each backward, and once per epoch after the trackers have spoken."""

    order = 200  # after EarlyStopping, SaveModelCallback and every other tracker

    def after_backward(self):
        state = stop_state(self.learn)
        if state is not None:
            flags = state.take_received()
            if flags is not None:
                state.agree(flags)

    def after_epoch(self):
        state = stop_state(self.learn)
        if state is None:
            return
        flags = state.outgoing()
        dist.all_reduce(flags)
        state.agree(flags.tolist(), allowed=(Preempted, CancelFitException), position="epoch_end")

    def after_fit(self):
        global _active
        state = getattr(self.learn, "_fastlaunch_stop", None)
        if state is not None:
            state.active = False
            self.learn._fastlaunch_stop = None
            _active = None
