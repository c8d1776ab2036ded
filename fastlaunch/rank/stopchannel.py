"""The stop channel: how a stop asked on one rank (a cancel raised by a callback, a signal) stops every rank
at the same batch, with no collective of its own during training.

The protocol's invariant. Every rank of a distributed fit runs the same fastai events in the same order
(the sharded loaders give every rank the same number of batches), and at each of the points below every
rank calls the same collective with the same layout: its payload followed by this channel's flags
(one per KIND, most severe first). So every rank receives the same summed flags at the same point, and
`agree` on identical flags raises the identical exception on every rank. No rank acts on its own request:
a request only ever travels (`request` -> `piggyback` -> the collective -> `unpack` -> `agree`).
The points, all owned by this module's API:
  - each training step: the flags ride after the gradients in DDP's last bucket (`flag_bucket_hook`),
    read after backward (on GPUs READ_LAG steps later, without waiting for the step before);
  - end of training: the recorder's epoch reduction (`piggyback`/`unpack`);
  - end of validation: the whole-set metrics gather (`outgoing_list`/`combine`);
  - end of each epoch, after the trackers: one small all-reduce of the flags alone (`exchange`).
A preemption is acted on only between batches or at an epoch's end; elsewhere it stays pending, on
every rank alike, until the epoch's end.

One batch cancelled on one rank (CancelBatch/Backward/StepException raised by a callback before the step's
gradient all-reduce, e.g. on a loss that is not finite) is a SkipBatch request: that rank still joins the
step's all-reduce, contributing zeros (its gradients reach no rank), and on CPU ranks every rank then skips
that same step, as one process skips the batch (fastai's after_cancel_batch and after_batch on every rank).
On GPU ranks, whose flags are read READ_LAG steps late, the step goes on with the other ranks' gradients.
A batch cancel raised after the all-reduce on some ranks only (a step one rank skipped alone: its weights
now differ) is a SkippedAlone flag: at the next collective the job ends, that rank naming itself, the
callback, the event and the line.
"""
from __future__ import annotations

import collections
import contextlib
from typing import Any, Callable

import torch
import torch.distributed as dist
from fastai.callback.core import (CancelBackwardException, CancelBatchException, CancelEpochException,
                                  CancelFitException, CancelStepException, CancelTrainException)

from ..config import STOPPED_BY_SIGNAL
from ..errors import UsageError

__all__ = ["StopChannel", "Preempted", "Interrupted", "SkipBatch", "SkippedAlone", "ROUTED", "BATCH_CANCELS",
           "KINDS", "READ_LAG", "flag_bucket_hook"]


class Preempted(Exception):
    """A stop asked by a signal (SIGTERM, SIGUSR1): checkpoint, then leave with STOPPED_BY_SIGNAL."""


class Interrupted(Exception):
    """A stop asked by SIGINT in a notebook session (the kernel's interrupt button): the fit is cancelled on
    every rank at one batch, as fastai cancels (after_fit runs, the model is intact); then the fit raises
    KeyboardInterrupt on every rank, as Ctrl-C does in one process."""


class SkipBatch(Exception):
    """A batch cancelled on some rank before the gradient all-reduce: every rank skips this step."""


class SkippedAlone(Exception):
    """A rank skipped an optimizer step after the all-reduce, on its own (checked at the next collective)."""


# The cancels fastai's callbacks raise, routed through the channel.
ROUTED = (CancelFitException, CancelEpochException, CancelTrainException)
# The cancels of one batch's step (agreed as SkipBatch before the all-reduce, checked as SkippedAlone after).
BATCH_CANCELS = (CancelBatchException, CancelBackwardException, CancelStepException)
# Every kind of stop, most severe first: a request for a bigger stop wins when several are pending.
KINDS = (Preempted, Interrupted, *ROUTED, SkipBatch, SkippedAlone)
_SKIP, _ALONE = KINDS.index(SkipBatch), KINDS.index(SkippedAlone)
READ_LAG = 2  # GPU ranks read a backward's flags this many steps later


class StopChannel:
    """One distributed fit's stop requests: this rank's pending flags, and the flags last received."""

    def __init__(self, device: torch.device, comm: Any = None,
                 quiet_reads: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                 deferred: bool | None = None, new_event: Callable[[], Any] | None = None):
        self.device, self.comm, self.quiet_reads = device, comm, quiet_reads
        self.pending = [0] * len(KINDS)
        self._sent = [0] * len(KINDS)  # what left with the last collective: agree() consumes only these
        self.active = False
        self.interrupted = False  # an agreed Interrupted cancelled the fit: it ends with KeyboardInterrupt
        self.on_preempt: Callable[[str], None] | None = None  # called on every rank before leaving
        self._received: torch.Tensor | None = None
        # On a GPU the flags of a backward are read READ_LAG steps later (see take_received); tests fake it.
        self.deferred = getattr(device, "type", str(device)) == "cuda" if deferred is None else deferred
        self._new_event = new_event or (lambda: torch.cuda.Event())
        self._in_flight: collections.deque = collections.deque()  # [host copy, its event, kinds to ignore]
        self._alone: str | None = None  # what this rank skipped on its own, told if the others did not

    @property
    def skipping(self) -> bool:
        """This rank cancelled the step now running: it contributes zeros to the gradient all-reduce."""
        return bool(self.pending[_SKIP])

    def skipped_alone(self, cb: Any, event_name: str, exc: BaseException) -> None:
        """This rank skips a step after its all-reduce (fastai unwinds it): fine if every rank does, the end
        of the job if not. Keeps the callback, event and line for the message."""
        tb, where = exc.__traceback__, ""
        while tb is not None:
            where, tb = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}", tb.tb_next
        self._alone = f"{type(exc).__name__} raised by {type(cb).__name__}.{event_name} ({where})"
        self.pending[_ALONE] = 1

    # -- asking ---------------------------------------------------------------------------------------------
    def request(self, exc_type: type) -> None:
        """Hold a stop asked on this rank until every rank can act on it."""
        for i, cls in enumerate(KINDS):
            if issubclass(exc_type, cls):
                self.pending[i] = 1
                return

    # -- the flag layout: always after the payload, len(KINDS) numbers --------------------------------------
    def outgoing(self, dtype=torch.float32) -> torch.Tensor:
        """This rank's flags as a tensor."""
        self._sent = list(self.pending)
        return torch.tensor(self.pending, dtype=dtype, device=self.device)

    def piggyback(self, payload: torch.Tensor) -> torch.Tensor:
        """payload with this rank's flags appended, for a sum-reduction every rank makes at this point."""
        return torch.cat([payload, self.outgoing(payload.dtype).to(payload.device)])

    @staticmethod
    def unpack(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(payload, summed flags) of a reduced piggybacked tensor."""
        return packed[: -len(KINDS)], packed[-len(KINDS):]

    def outgoing_list(self) -> list[int]:
        """This rank's flags for an object gather."""
        self._sent = list(self.pending)
        return list(self.pending)

    @staticmethod
    def combine(gathered: list[list[int]]) -> list[float]:
        """The summed flags of every rank's outgoing_list."""
        return [float(sum(flags[i] for flags in gathered)) for i in range(len(KINDS))]

    def exchange(self) -> list[float]:
        """The flags alone, summed over ranks (one small all-reduce)."""
        flags = self.outgoing()
        self.comm.all_reduce(flags)
        return flags.tolist()

    # -- what backward carried ------------------------------------------------------------------------------
    def receive(self, summed: torch.Tensor) -> None:
        """Keep the summed flags from the last gradient all-reduce (read after backward)."""
        self._received = summed

    def take_received(self) -> list[float] | None:
        """The flags carried by a backward, the same on every rank at the same step.

        On CPU they are read at once. On a GPU, reading them now would block the host until the
        all-reduce finishes (a sync per step), so they are copied without blocking and read READ_LAG
        steps later, when the device is long past them: the host may run that many steps ahead and never
        waits for the step before. Every rank still acts at the same step, READ_LAG batches after the
        request.
        """
        received, self._received = self._received, None
        if received is None:
            return None
        if not self.deferred:
            with self.quiet_reads():  # already on the host: reading it waits for nothing
                return received.tolist()
        done = self._new_event()
        host = received.to("cpu", non_blocking=True)
        done.record()
        self._in_flight.append([host, done, set()])
        if len(self._in_flight) <= READ_LAG:
            return None
        host, event, ignored = self._in_flight.popleft()
        event.synchronize()  # recorded READ_LAG steps ago: complete unless the host ran that far ahead
        with self.quiet_reads():
            flags = host.tolist()
        return [0.0 if i in ignored else flag for i, flag in enumerate(flags)]

    # -- acting -----------------------------------------------------------------------------------------------
    def agree(self, summed: list[float], allowed: tuple[type, ...] = KINDS, position: str = "batch") -> None:
        """Act, on every rank alike, on the most severe stop any rank asked for (if allowed here).

        Only the requests that left with the collective are consumed: one asked after the flags left (a signal
        arriving during the backward pass) stays pending and travels with the next collective."""
        self.pending = [1 if asked and not sent else 0 for asked, sent in zip(self.pending, self._sent)]
        self._sent = [0] * len(KINDS)
        world = getattr(self.comm, "world_size", 1)
        # A rank that skipped a step on its own waits for the flags that carry it (on a GPU, read steps late):
        # every rank skipped (GradScaler's skip on the reduced gradients, GradientAccumulation): fine.
        if self._alone is not None and summed[_ALONE] > 0:
            what, self._alone = self._alone, None
            if summed[_ALONE] < world:  # some ranks stepped, this one did not: the weights differ now
                raise UsageError(f"{what} skipped this rank's optimizer step while {world - int(summed[_ALONE])} "
                                 f"of {world} ranks took it: the ranks' weights differ", "a step skipped by one rank",
                                 "cancel a batch before backward (in after_loss), where every rank skips it together, "
                                 "or decide from values every rank shares (the all-reduced gradients)")
        for index, (flag, cls) in enumerate(zip(summed, KINDS)):
            if flag <= 0 or cls is SkippedAlone:
                continue
            if cls is SkipBatch:
                if self.deferred or SkipBatch not in allowed:
                    continue  # read late on a GPU: the step went on without this batch's gradients
                skip = CancelBatchException()
                skip.agreed = True
                raise skip
            if cls is Preempted and Preempted not in allowed:
                self.pending[0] = 1  # every rank saw the same sum: every rank keeps it for the epoch's end
                continue
            if cls is Interrupted and CancelFitException in allowed:
                self.interrupted = True
                cls = CancelFitException
            elif cls not in allowed:
                continue
            if cls is Preempted:
                if self.on_preempt is not None:
                    self.on_preempt(position)
                raise SystemExit(STOPPED_BY_SIGNAL)
            for entry in self._in_flight:  # flags sent before this stop carry its request again: acted on now
                entry[2].add(index)
            exc = cls()
            exc.agreed = True  # raised by agreement: not intercepted again
            raise exc


def _done(value: torch.Tensor) -> torch.futures.Future:
    fut: torch.futures.Future = torch.futures.Future()
    fut.set_result(value)
    return fut


def flag_bucket_hook(channel: StopChannel, bucket) -> torch.futures.Future:
    """DDP comm hook: average the gradients; on the last bucket, sum the stop flags alongside.

    On CPU (gloo) every bucket's reduction starts at once and runs while backward goes on; the last bucket
    (DDP hooks its buckets in order, the last one last) waits for them all on the calling thread. No Python
    continuation ever runs on a gloo thread: one takes CPython's thread-state lock, and a DataLoader worker
    forked at that instant deadlocks in the child. On GPUs (NCCL) the work's future completes as it is
    enqueued, so the continuation runs on the calling thread and the reduction overlaps backward too.
    """
    world = dist.get_world_size()
    buffer = bucket.buffer()
    last = bucket.is_last()
    if channel.skipping:  # a batch cancelled on this rank: its gradients reach no rank
        buffer.zero_()
    packed = channel.piggyback(buffer.div(world)) if last else buffer.div_(world)

    def unpack(tensor: torch.Tensor) -> torch.Tensor:
        if not last:
            return tensor
        grads, flags = channel.unpack(tensor)
        channel.receive(flags)
        return grads

    if buffer.device.type == "cpu":
        channel.comm.begin_reduce(packed)
        if last:
            channel.comm.finish_reduces()
        return _done(unpack(packed))
    fut = channel.comm.reduce_gradients(packed).get_future()
    return fut.then(lambda f: unpack(f.value()[0]))


# DDP checks the hook's annotations as objects; this module's postponed annotations are strings.
flag_bucket_hook.__annotations__.update(bucket=dist.GradBucket, channel=StopChannel,
                                        **{"return": torch.futures.Future[torch.Tensor]})
