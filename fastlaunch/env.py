"""The one reader of the environment: DistEnv (distributed facts), SlurmFacts, and the launcher's own view.

Detectors are tried in a fixed order and the first that matches wins:
  1. torchelastic: the engine started this process (TORCHELASTIC_RUN_ID with RANK/WORLD_SIZE);
  2. plain env:// variables (RANK and WORLD_SIZE set by some other launcher);
  3. a single process: rank 0 of 1.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

from .errors import UsageError, shown
from .option_table import ENV_PREFIX, rank_settings

__all__ = ["DistEnv", "SlurmFacts", "launcher_environ", "environ_overlay", "stop_marker_request"]

# Set by a Slurm job script of `fastlaunch slurm`: a file the launcher touches when it stops on a signal
# with a checkpoint (srun may kill the task before its exit status is seen).
STOP_MARKER_VAR = f"{ENV_PREFIX}STOP_MARKER"


def launcher_environ() -> Mapping[str, str]:
    """This process's environment, for the launcher's modules that read it (they take it as a Mapping)."""
    return os.environ


@contextlib.contextmanager
def environ_overlay(extra: Mapping[str, str]) -> Iterator[None]:
    """Set `extra` in this process's environment for the duration (children inherit it), then restore it."""
    saved = {k: os.environ.get(k) for k in extra}
    os.environ.update(extra)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def stop_marker_request(environ: Mapping[str, str]) -> Path | None:
    """The file to touch when the launcher stops on a signal with a checkpoint, when a job script asked."""
    value = environ.get(STOP_MARKER_VAR)
    return Path(value) if value else None


def _int(environ: Mapping[str, str], key: str, default: int) -> int:
    value = environ.get(key, "")
    return int(value) if value.strip() else default


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands in the job, and what the launcher asked of it."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    node_rank: int = 0
    agent_store: bool = False  # the engine's agent serves the store at MASTER_ADDR:MASTER_PORT
    master_addr: str = "127.0.0.1"
    master_port: int = 0
    source: str = "single"  # which detector matched
    device_type: str = "cpu"  # "cuda" or "cpu"
    seed: int | None = None
    precision: str = "no"
    cpus_per_rank: int | None = None
    node_cores: int | None = None  # the cores this machine's ranks share
    run_dir: Path | None = None
    restart_count: int = 0
    keep_global_batch: bool = False
    sync_bn: bool = False
    hang_timeout: int = 0
    resume_from: Path | None = None
    checkpoint_every: str = "none"
    keep_checkpoints: int = 2
    instrument: bool = True

    @property
    def is_distributed(self) -> bool:
        """True when more than one rank takes part."""
        return self.world_size > 1

    @property
    def under_fastlaunch(self) -> bool:
        """True when the fastlaunch launcher started this process."""
        return self.run_dir is not None

    @property
    def backend(self) -> str:
        """Process group backend for this rank's device."""
        return "nccl" if self.device_type == "cuda" else "gloo"

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "DistEnv":
        """Detect the environment; tests pass a dict."""
        environ = os.environ if environ is None else environ
        launcher = rank_settings(environ)  # the FASTLAUNCH_* variables (option_table.py)
        # 1 and 2 read the same variables: torchelastic sets the env:// set and more.
        if "RANK" in environ and "WORLD_SIZE" in environ:
            return cls(
                rank=_int(environ, "RANK", 0),
                local_rank=_int(environ, "LOCAL_RANK", 0),
                world_size=_int(environ, "WORLD_SIZE", 1),
                local_world_size=_int(environ, "LOCAL_WORLD_SIZE", 1),
                node_rank=_int(environ, "GROUP_RANK", 0),
                agent_store=environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True",
                master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
                master_port=_int(environ, "MASTER_PORT", 0),
                source="torchelastic" if "TORCHELASTIC_RUN_ID" in environ else "env",
                restart_count=_int(environ, "TORCHELASTIC_RESTART_COUNT", 0),
                **launcher,
            )
        return cls(**launcher)


def _slurm_int(environ: Mapping[str, str], key: str, default: int | None, low: int) -> int | None:
    """A whole-number SLURM_* variable (default when unset or empty), or a UsageError naming it."""
    value = environ.get(key, "")
    if not value.strip():
        return default
    try:
        number = int(value)
    except ValueError:
        number = low - 1
    if number < low:
        raise UsageError(f"Slurm variable {key} is not a whole number of at least {low}", f"{key}={shown(value)}",
                         "run fastlaunch inside a Slurm job as Slurm starts it, or unset the stale SLURM_* "
                         "variables of another job")
    return number


@dataclass(frozen=True)
class SlurmFacts:
    """What a Slurm allocation says about this process (read from SLURM_* variables)."""

    job_id: int
    nnodes: int
    node_id: int
    nodelist: str
    ntasks: int
    in_step: bool  # inside an srun step (a task), not the batch script itself
    gpus_on_node: int | None = None
    launch_node_ip: str | None = None

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> "SlurmFacts | None":
        """None outside Slurm."""
        environ = os.environ if environ is None else environ
        job = "SLURM_JOB_ID" if environ.get("SLURM_JOB_ID") else "SLURM_JOBID"
        if not environ.get(job):
            return None
        nodes = "SLURM_NNODES" if environ.get("SLURM_NNODES", "").strip() else "SLURM_JOB_NUM_NODES"
        return cls(
            job_id=_slurm_int(environ, job, 0, 0) or 0,
            nnodes=_slurm_int(environ, nodes, 1, 1) or 1,
            node_id=_slurm_int(environ, "SLURM_NODEID", 0, 0) or 0,
            nodelist=environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST", ""),
            ntasks=_slurm_int(environ, "SLURM_NTASKS", 1, 1) or 1,
            in_step="SLURM_STEP_ID" in environ or "SLURM_STEPID" in environ,
            gpus_on_node=_slurm_int(environ, "SLURM_GPUS_ON_NODE", None, 0),
            launch_node_ip=environ.get("SLURM_LAUNCH_NODE_IPADDR"),
        )
