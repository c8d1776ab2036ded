"""The one advisor for DataLoader workers: `fastlaunch doctor` (before a run, from the cores) and the run's
diagnoses (after it, from the measured wait) draw their advice from these rules, so they never disagree and
never advise the value already in use.

Rule: a rank keeps one core for its training loop; the other cores of its share load data, so
num_workers = cores per rank - 1. A rank that still waits for data with that many workers needs lighter item
transforms or more cores, not another worker.
"""
from __future__ import annotations

__all__ = ["loader_workers", "workers_reason", "data_wait_advice"]


def loader_workers(cores_per_rank: int) -> int:
    """DataLoader workers per rank for this many cores per rank."""
    return max(0, cores_per_rank - 1)


def workers_reason(cores_per_rank: int) -> str:
    n = loader_workers(cores_per_rank)
    return (f"{cores_per_rank} core(s) per rank: one for the training loop"
            + (f", {n} for loading" if n else ", none left for loader workers"))


def data_wait_advice(rank: int, wait_frac: float, workers: int, cores_per_rank: int, step_time: float) -> str:
    """The diagnosis of a rank that waits for data: the evidence, then a fix that is not what is in use."""
    best = loader_workers(cores_per_rank)
    evidence = (f"rank {rank} waits for data {wait_frac:.0%} of each step ({wait_frac * step_time * 1000:.0f} ms of "
                f"{step_time * 1000:.0f} ms; num_workers={workers}; {workers_reason(cores_per_rank)})")
    if workers < best:
        return f"{evidence}: use num_workers={best}"
    return f"{evidence}: more workers would take the training loop's core; use lighter item transforms, " \
           "or give each rank more cores (fewer ranks per machine, or a larger allocation)"
