"""What a Slurm partition's nodes offer, asked of `sinfo` before a job is written: cores, GPUs and memory per
node (the smallest node's, so that an ask that fits it fits every node). None when Slurm cannot be asked."""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from typing import Callable

from ...errors import UsageError

__all__ = ["NodeShape", "probe_partition", "check_fits", "default_cpus_per_rank"]

Runner = Callable[..., subprocess.CompletedProcess]


@dataclass(frozen=True)
class NodeShape:
    cores: int
    gpus: int
    memory_mb: int


def probe_partition(partition: str | None, run: Runner = subprocess.run) -> NodeShape | None:
    """The smallest node of the partition (or of the default partition), or None without a reachable Slurm."""
    cmd = ["sinfo", "--noheader", "--format=%c %G %m", *([f"--partition={partition}"] if partition else [])]
    try:
        proc = run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    rows = [line.split() for line in proc.stdout.splitlines() if line.strip()] if proc.returncode == 0 else []
    shapes = []
    for row in rows:
        if len(row) < 3 or not row[0].rstrip("+").isdigit():
            continue
        gpus = sum(int(n) for n in re.findall(r"gpu(?::[^:,()]+)?:(\d+)", row[1]))
        memory = int(row[2].rstrip("+")) if row[2].rstrip("+").isdigit() else 0
        shapes.append(NodeShape(int(row[0].rstrip("+")), gpus, memory))
    if not shapes:
        return None
    return NodeShape(min(s.cores for s in shapes), min(s.gpus for s in shapes), min(s.memory_mb for s in shapes))


def default_cpus_per_rank(shape: NodeShape | None, ranks_per_node: int, fallback: int = 4) -> int:
    """The partition's cores shared among the node's ranks; `fallback` when Slurm cannot be asked."""
    return fallback if shape is None else max(1, shape.cores // ranks_per_node)


def check_fits(shape: NodeShape | None, ranks_per_node: int, cpus_per_rank: int, use_gpus: bool,
               partition: str | None) -> None:
    """An ask no node of the partition can meet would wait forever: refused, naming the largest that fits."""
    if shape is None:
        return
    where = f"partition {partition}" if partition else "the default partition"
    if use_gpus and ranks_per_node > shape.gpus:
        raise UsageError(f"{where}'s nodes have fewer GPUs than the job asks", f"--gpus {ranks_per_node}, "
                         f"{shape.gpus} per node", f"use --gpus {shape.gpus}" if shape.gpus else "pick a GPU partition")
    if ranks_per_node > shape.cores:
        raise UsageError(f"{where}'s nodes have fewer cores than the job has ranks per node",
                         f"{ranks_per_node} ranks, {shape.cores} cores per node", f"use at most {shape.cores} ranks per node")
    if ranks_per_node * cpus_per_rank > shape.cores:
        fits = shape.cores // ranks_per_node
        raise UsageError(f"the job asks more cores per node than {where}'s nodes have",
                         f"{ranks_per_node} ranks x --cpus-per-rank {cpus_per_rank} = {ranks_per_node * cpus_per_rank}, "
                         f"{shape.cores} per node", f"use --cpus-per-rank {fits} (or leave it out: the default fits)")
