"""LaunchConfig: the typed, frozen result of parsing the command line, and its worker environment."""
from __future__ import annotations

import enum
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from .env import launcher_environ
from .errors import UsageError
from .option_table import ENV_PREFIX, rank_variables

__all__ = ["Precision", "LaunchConfig", "ENV_PREFIX", "STOPPED_BY_SIGNAL", "stop_marker"]

# The exit status of ranks and launcher stopped (and checkpointed) by SIGTERM/SIGUSR1. EX_TEMPFAIL: the
# Slurm job script requeues itself on it.
STOPPED_BY_SIGNAL = 75


def stop_marker(log_dir: Path, rank: int) -> Path:
    """Written by a rank that stopped at the agreed point on a signal: whether a checkpoint was written
    (the launcher exits STOPPED_BY_SIGNAL only when it was)."""
    return Path(log_dir) / f"stopped-rank{rank}.json"


class Precision(str, enum.Enum):
    """Training precision asked of the launcher."""

    NO = "no"
    FP16 = "fp16"
    BF16 = "bf16"

    @classmethod
    def parse(cls, value: object) -> "Precision":
        """Parse a flag value, or raise a UsageError naming the valid choices."""
        try:
            return cls(str(value).lower())
        except ValueError:
            raise UsageError("unknown --precision", value, "use one of: no, fp16, bf16") from None


@dataclass(frozen=True)
class LaunchConfig:
    """Everything the engine needs to start one node's ranks."""

    script: Path
    script_args: tuple[str, ...]
    nproc_per_node: int
    device: str  # "cuda" or "cpu"
    run_dir: Path | None
    seed: int
    precision: Precision = Precision.NO
    port: int | None = None
    max_restarts: int = 0
    verbose: bool = False
    cpus_per_rank: int = 1
    node_cores: int = 0  # the cores the launcher may run on, shared by its ranks (0: not known)
    keep_global_batch: bool = False
    sync_bn: bool = False  # BatchNorm layers become SyncBatchNorm for each fit (GPUs)
    min_nodes: int = 1
    max_nodes: int = 1
    node_rank: int | None = None  # None: the rendezvous orders the nodes (c10d)
    rdzv_endpoint: str | None = None  # host:port of the first node; None on one node (loopback)
    rdzv_id: str = "fastlaunch"
    grace: int = 30  # seconds between asking the ranks to stop (SIGTERM) and killing them
    hang_timeout: int = 600  # seconds without progress inside a fit before a rank counts as hung (0: off)
    checkpoint_every: str = "none"  # "epoch": rank 0 checkpoints after every epoch
    keep_checkpoints: int = 2
    resume_from: Path | None = None  # a checkpoint file this run continues from
    auto_resume: bool = False  # every start of the job uses run_dir; resume from its newest checkpoint
    max_requeues: int = 3  # with auto_resume: starts after the first, at most
    start: int = 0  # with auto_resume: which start of the job this is (0: the first)
    instrument: bool = True  # per-rank memory, sync and timing records, and the report
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def multi_node(self) -> bool:
        """True when ranks span more than one machine (or may, under an elastic node range)."""
        return self.max_nodes > 1

    def to_env(self, base: Mapping[str, str] | None = None, launcher_pid: int | None = None) -> dict[str, str]:
        """Environment variables every worker gets on top of the launcher's own."""
        base = launcher_environ() if base is None else base
        env = {
            f"{ENV_PREFIX}LAUNCHER_PID": str(launcher_pid or os.getpid()),
            **rank_variables(self),  # the FASTLAUNCH_* settings option_table.py sends to the ranks
            "PYTHONUNBUFFERED": "1",  # rank 0's output reaches the console as it comes
        }
        if "PYTHONHASHSEED" not in base:  # set and dict orders (vocabularies, splits) agree across ranks
            env["PYTHONHASHSEED"] = str(self.seed)
        if "OMP_NUM_THREADS" not in base:
            env["OMP_NUM_THREADS"] = str(self.cpus_per_rank)
        if not self.multi_node:  # one machine: collectives stay on the loopback interface
            for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
                if key not in base:
                    env[key] = "lo"
        if self.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""  # CPU ranks never touch a GPU, even where there are some
        return env

    def as_dict(self) -> dict:
        """Plain data for launch.yaml."""
        d = asdict(self)
        d["script"], d["run_dir"] = str(self.script), str(self.run_dir) if self.run_dir else None
        d["script_args"], d["notes"] = list(self.script_args), list(self.notes)
        d["precision"] = self.precision.value
        d["resume_from"] = str(self.resume_from) if self.resume_from else None
        return d
