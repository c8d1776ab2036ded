"""Collectives for fastlaunch: called on every rank, no-ops at world size 1, process group started lazily."""
from __future__ import annotations

import functools
import itertools
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist

from . import heartbeat
from .env import DistEnv

__all__ = ["current_env", "is_rank_zero", "rank_zero_only", "ensure_process_group", "barrier",
           "broadcast_object", "gather_to_rank_zero", "all_gather_object", "all_reduce_sum", "shutdown",
           "install_init_guard", "local_rank_zero_first", "PG_TIMEOUT"]

PG_TIMEOUT = timedelta(minutes=30)
STORE_WAIT = timedelta(hours=4)
F = TypeVar("F", bound=Callable[..., Any])
_original_init = dist.init_process_group


@functools.lru_cache(maxsize=1)
def current_env() -> DistEnv:
    """This process's DistEnv, read once."""
    return DistEnv.from_environ()


def is_rank_zero() -> bool:
    """True on global rank 0 (and in a single process)."""
    return current_env().rank == 0


def rank_zero_only(fn: F) -> F:
    """Run fn on rank 0 only; other ranks get None."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        return fn(*args, **kwargs) if is_rank_zero() else None
    return wrapper  # type: ignore[return-value]


def _group_timeout(denv: DistEnv) -> timedelta:
    """Longer than the hang timeout, so the launcher names a hung rank before gloo/nccl time out."""
    return max(PG_TIMEOUT, timedelta(seconds=2 * denv.hang_timeout))


def _attempt_store(denv: DistEnv):
    """The job's store with a prefix per restart attempt: after a restart the engine serves the same
    store, and without a prefix the new ranks read the old ranks' gloo addresses (a hang or refusal)."""
    if denv.source != "torchelastic":
        return None
    base = dist.TCPStore(denv.master_addr, denv.master_port, denv.world_size,
                         is_master=not denv.agent_store and denv.rank == 0, timeout=_group_timeout(denv))
    return dist.PrefixStore(f"/fastlaunch/attempt_{denv.restart_count}", base)


def _join(init: Callable[[], Any]) -> Any:
    """Start the group, telling the hang watch that this rank waits for its peers meanwhile."""
    heartbeat.set_flag(heartbeat.JOINING_GROUP)
    try:
        result = init()
    finally:
        heartbeat.set_flag(heartbeat.JOINING_GROUP, False)
    heartbeat.set_flag(heartbeat.REACHED_GROUP)
    return result


def ensure_process_group(denv: DistEnv | None = None) -> bool:
    """Start the process group on first need (nccl on GPUs, gloo on CPU); True when distributed."""
    denv = denv or current_env()
    if not denv.is_distributed:
        return False
    if dist.is_initialized():
        return True
    kwargs: dict[str, Any] = {"backend": denv.backend, "timeout": _group_timeout(denv),
                              "store": _attempt_store(denv), "rank": denv.rank, "world_size": denv.world_size}
    if denv.device_type == "cuda":
        kwargs["device_id"] = torch.device("cuda", denv.local_rank)
    _join(lambda: _original_init(**kwargs))
    return True


def install_init_guard() -> None:
    """A script's own init_process_group reuses a group fastlaunch already started: never init twice."""
    @functools.wraps(_original_init)
    def init_process_group(*args, **kwargs):
        if dist.is_initialized():
            return None
        denv = current_env()
        kwargs.setdefault("timeout", _group_timeout(denv))
        if (kwargs.get("init_method") in (None, "env://") and "store" not in kwargs and len(args) < 2
                and denv.source == "torchelastic"):
            kwargs.update(store=_attempt_store(denv), rank=denv.rank, world_size=denv.world_size)
            kwargs.pop("init_method", None)
        return _join(lambda: _original_init(*args, **kwargs))

    dist.init_process_group = init_process_group


def barrier() -> None:
    """Wait for every rank."""
    if ensure_process_group():
        with heartbeat.in_collective():
            dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank src's obj on every rank."""
    if not ensure_process_group():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_to_rank_zero(obj: Any) -> list[Any] | None:
    """Every rank's obj, in rank order, on rank 0; None elsewhere."""
    if not ensure_process_group():
        return [obj]
    denv = current_env()
    out = [None] * denv.world_size if denv.rank == 0 else None
    with heartbeat.in_collective():
        dist.gather_object(obj, out, dst=0)
    return out


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks in place and return it."""
    if ensure_process_group():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def shutdown() -> None:
    """Destroy the process group if one was started (by fastlaunch or the script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's obj, in rank order, on every rank."""
    if not ensure_process_group():
        return [obj]
    out: list[Any] = [None] * current_env().world_size
    with heartbeat.in_collective():
        dist.all_gather_object(out, obj)
    return out


_first_calls = itertools.count()  # the same sequence on every rank: every rank makes the same calls
_store_client: Any = None


def _store():
    """A client of the job's rendezvous store (no process group needed), namespaced per attempt."""
    global _store_client
    if _store_client is None:
        denv = current_env()
        base = dist.TCPStore(denv.master_addr, denv.master_port, is_master=False, timeout=STORE_WAIT)
        _store_client = dist.PrefixStore(f"fastlaunch/attempt{denv.restart_count}/", base)
    return _store_client


def local_rank_zero_first(fn: Callable[..., Any], *args, **kwargs) -> Any:
    """Run fn on each node's local rank 0 first; the node's other ranks wait on the store, then run it.

    The wait is on the store with a long timeout, not a process group barrier (whose timeout is short
    and which would start the group): downloads and extractions can take an hour.
    """
    denv = current_env()
    if denv.local_world_size <= 1 or not denv.master_port:
        return fn(*args, **kwargs)
    key = f"first/node{denv.node_rank}/{next(_first_calls)}"
    heartbeat.set_flag(heartbeat.WAITING)  # a known wait (or rank 0's long download): not a hang
    try:
        if denv.local_rank == 0:
            try:
                return fn(*args, **kwargs)
            finally:
                _store().set(key, "done")  # also on failure: the others then try, and fail, on their own
        _store().wait([key], STORE_WAIT)
        return fn(*args, **kwargs)
    finally:
        heartbeat.set_flag(heartbeat.WAITING, False)
