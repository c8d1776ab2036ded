"""Every collective fastlaunch makes, in one place: called on every rank, no-ops at world size 1.

A Comm belongs to one RankContext. It starts the process group lazily (nccl on GPUs, gloo on CPU), owns
the client of the job's store, and marks each blocking collective on the rank's heartbeat, so that the
launcher's hang watch tells a rank waiting for its peers from the one they wait for.
"""
from __future__ import annotations

import collections
import functools
import itertools
import pickle
import time
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from .. import heartbeat as hb
from ..env import DistEnv

__all__ = ["Comm", "PG_TIMEOUT"]

PG_TIMEOUT = timedelta(minutes=30)
STORE_WAIT = timedelta(hours=4)


def _group_timeout(denv: DistEnv) -> timedelta:
    """Longer than the hang timeout, so the launcher names a hung rank before gloo/nccl time out."""
    return max(PG_TIMEOUT, timedelta(seconds=2 * denv.hang_timeout))


class Comm:
    """This rank's collectives. `init_process_group` is torch's, captured before any patch."""

    def __init__(self, env: DistEnv, beats: Any = None):
        self.env = env
        self.beats = beats if beats is not None else hb.NoHeartbeat()
        self.init_process_group = dist.init_process_group
        self._grad_all_reduce = dist.all_reduce  # torch's own, for DDP's gradient traffic (see reduce_gradients)
        self._first_calls = itertools.count()  # the same sequence on every rank: every rank makes the same calls
        self._store_client: Any = None
        self._held: collections.deque = collections.deque(maxlen=self._KEEP)  # see _run
        self._begun: list = []  # gradient reductions started and not yet waited for (begin_reduce)

    @property
    def world_size(self) -> int:
        return self.env.world_size if self.env.is_distributed else 1

    # -- the process group ------------------------------------------------------------------------------
    def attempt_store(self):
        """The job's store with a prefix per restart attempt: after a restart the engine serves the same
        store, and without a prefix the new ranks read the old ranks' gloo addresses (a hang or refusal)."""
        denv = self.env
        if denv.source != "torchelastic":
            return None
        base = dist.TCPStore(denv.master_addr, denv.master_port, denv.world_size,
                             is_master=not denv.agent_store and denv.rank == 0, timeout=_group_timeout(denv))
        return dist.PrefixStore(f"/fastlaunch/attempt_{denv.restart_count}", base)

    def join(self, init: Callable[[], Any]) -> Any:
        """Start the group, telling the hang watch that this rank waits for its peers meanwhile."""
        self.beats.set_flag(hb.JOINING_GROUP)
        try:
            result = init()
        finally:
            self.beats.set_flag(hb.JOINING_GROUP, False)
        self.beats.set_flag(hb.REACHED_GROUP)
        return result

    def ensure_group(self) -> bool:
        """Start the process group on first need; True when distributed."""
        denv = self.env
        if not denv.is_distributed:
            return False
        if dist.is_initialized():
            return True
        kwargs: dict[str, Any] = {"backend": denv.backend, "timeout": _group_timeout(denv),
                                  "store": self.attempt_store(), "rank": denv.rank, "world_size": denv.world_size}
        if denv.device_type == "cuda":
            kwargs["device_id"] = torch.device("cuda", denv.local_rank)
        self.join(lambda: self.init_process_group(**kwargs))
        return True

    def guarded_init(self) -> Callable[..., Any]:
        """A replacement for dist.init_process_group: a script's own call reuses a group fastlaunch already
        started, and joins this attempt's store (never init twice, never an old attempt's addresses)."""
        original, comm = self.init_process_group, self

        @functools.wraps(original)
        def init_process_group(*args, **kwargs):
            if dist.is_initialized():
                return None
            denv = comm.env
            kwargs.setdefault("timeout", _group_timeout(denv))
            if (kwargs.get("init_method") in (None, "env://") and "store" not in kwargs and len(args) < 2
                    and denv.source == "torchelastic"):
                kwargs.update(store=comm.attempt_store(), rank=denv.rank, world_size=denv.world_size)
                kwargs.pop("init_method", None)
            return comm.join(lambda: original(*args, **kwargs))

        return init_process_group

    def shutdown(self) -> None:
        """Destroy the process group if one was started (by fastlaunch or the script)."""
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    # -- collectives --------------------------------------------------------------------------------------
    # On gloo a collective's work, and the tensors it holds, may be released by a gloo thread after the caller
    # has moved on; the release of a tensor whose Python object is gone takes the GIL on that thread, and a
    # DataLoader worker forked at that instant (every epoch starts some) deadlocks in the child. So every
    # blocking collective is waited for here and its work kept until a few later ones: its last reference is
    # dropped by this thread.
    _KEEP = 4

    def _run(self, collective: Callable[..., Any], *args, **kwargs) -> None:
        with self.beats.in_collective():
            work = collective(*args, async_op=True, **kwargs)
            if work is not None:
                work.wait()
        self._held.append((work, args))

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.ensure_group():
            self._run(dist.barrier)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks in place and return it."""
        if self.ensure_group():
            self._run(dist.all_reduce, tensor)
        return tensor

    def reduce_gradients(self, packed: torch.Tensor):
        """Sum DDP's gradient bucket (with the stop flags) over ranks on a GPU: DDP's own traffic, made with
        torch's all_reduce as captured at start (a script's counting wrappers see fastlaunch's collectives,
        not the gradients). Returns the work handle, whose wait belongs to the device."""
        return self._grad_all_reduce(packed, async_op=True)

    def begin_reduce(self, bucket: torch.Tensor) -> None:
        """Start summing a gradient bucket over ranks in place, on the host (gloo), and return at once:
        the reduction overlaps the rest of the backward pass. `finish_reduces` waits for every one begun."""
        self._begun.append((self._grad_all_reduce(bucket, async_op=True), bucket))

    def finish_reduces(self) -> None:
        """Wait for the gradient reductions begun this step. Their work handles are kept until a few more
        collectives (see _run): this thread, not a gloo thread, drops the last reference."""
        begun, self._begun = self._begun, []
        with self.beats.in_collective():
            for work, _ in begun:
                work.wait()
        self._held.append(begun)

    def broadcast_tensors(self, tensors, src: int = 0) -> None:
        """Rank src's values into every rank's tensors, in place."""
        if self.ensure_group():
            for tensor in tensors:
                self._run(dist.broadcast, tensor, src=src)

    def _on_host(self) -> bool:
        return self.env.backend == "gloo"

    def _all_gather_bytes(self, data: bytes) -> list[bytes]:
        """Every rank's bytes, in rank order (two all_gathers of tensors this thread releases)."""
        world = self.env.world_size
        size = torch.tensor([len(data)], dtype=torch.long)
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(world)]
        self._run(dist.all_gather, sizes, size)
        lengths = [int(n) for n in torch.cat(sizes).tolist()]
        padded = torch.zeros(max(lengths), dtype=torch.uint8)
        if data:
            padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        parts = [torch.empty(max(lengths), dtype=torch.uint8) for _ in range(world)]
        self._run(dist.all_gather, parts, padded)
        return [part[:n].numpy().tobytes() for part, n in zip(parts, lengths)]

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's obj, in rank order, on every rank."""
        if not self.ensure_group():
            return [obj]
        if self._on_host():
            return [pickle.loads(b) for b in self._all_gather_bytes(pickle.dumps(obj))]
        out: list[Any] = [None] * self.env.world_size
        with self.beats.in_collective():
            dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank src's obj on every rank."""
        if not self.ensure_group():
            return obj
        if self._on_host():
            return pickle.loads(self._all_gather_bytes(pickle.dumps(obj) if self.env.rank == src else b"")[src])
        box = [obj]
        with self.beats.in_collective():
            dist.broadcast_object_list(box, src=src)
        return box[0]

    def gather_to_rank_zero(self, obj: Any) -> list[Any] | None:
        """Every rank's obj, in rank order, on rank 0; None elsewhere."""
        if not self.ensure_group():
            return [obj]
        if self._on_host():
            everyone = self.all_gather_object(obj)
            return everyone if self.env.rank == 0 else None
        out = [None] * self.env.world_size if self.env.rank == 0 else None
        with self.beats.in_collective():
            dist.gather_object(obj, out, dst=0)
        return out

    # -- waits on the store (no process group) -----------------------------------------------------------
    def _store(self):
        """A client of the job's rendezvous store, namespaced per attempt."""
        if self._store_client is None:
            denv = self.env
            base = dist.TCPStore(denv.master_addr, denv.master_port, is_master=False, timeout=STORE_WAIT)
            self._store_client = dist.PrefixStore(f"fastlaunch/attempt{denv.restart_count}/", base)
        return self._store_client

    def all_arrive(self, key: str, grace_s: float) -> bool:
        """Count this rank at `key` on the store; True once every rank of the job is counted there within
        grace_s (ranks that never come, e.g. waiting in a collective, make it False). No process group."""
        store = self._store()
        count = store.add(key, 1)
        deadline = time.monotonic() + grace_s
        while count < self.env.world_size and time.monotonic() < deadline:
            time.sleep(0.02)
            count = store.add(key, 0)
        return count >= self.env.world_size

    def local_rank_zero_first(self, fn: Callable[..., Any], *args, **kwargs) -> Any:
        """Run fn on each node's local rank 0 first; the node's other ranks wait on the store, then run it.

        The wait is on the store with a long timeout, not a process group barrier (whose timeout is short
        and which would start the group): downloads and extractions can take an hour.
        """
        denv = self.env
        if denv.local_world_size <= 1 or not denv.master_port:
            return fn(*args, **kwargs)
        key = f"first/node{denv.node_rank}/{next(self._first_calls)}"
        self.beats.set_flag(hb.WAITING)  # a known wait (or rank 0's long download): not a hang
        try:
            if denv.local_rank == 0:
                try:
                    return fn(*args, **kwargs)
                finally:
                    self._store().set(key, "done")  # also on failure: the others then try, and fail, on their own
            self._store().wait([key], STORE_WAIT)
            return fn(*args, **kwargs)
        finally:
            self.beats.set_flag(hb.WAITING, False)
