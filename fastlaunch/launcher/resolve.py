"""Launcher options -> LaunchConfig: ranks per node, device, nodes and rendezvous (Slurm filled in)."""
from __future__ import annotations

import secrets
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping

from ..config import LaunchConfig, Precision
from ..device import GpuProbe, bf16_supported, probe_gpus, usable_cores
from ..env import SlurmFacts, launcher_environ
from ..errors import UsageError, shown
from ..lines import launcher_line
from ..notebooks import code_cells, is_notebook
from ..option_table import launcher_option, switch_value, whole_number

__all__ = ["build_config", "count"]


def count(flag: str, value: object, minimum: int, maximum: int | None = None) -> int:
    """An integer flag value from minimum to maximum, or a UsageError naming the flag."""
    return whole_number(flag, value, minimum, maximum)


def _whole(opts: Mapping[str, Any], name: str) -> int:
    """A whole-number option within the limits the option table gives it."""
    return launcher_option(name).number(opts[name])


def _switch(opts: Mapping[str, Any], name: str) -> bool:
    """A switch's value, from a flag, a file or a resumed run alike."""
    found = switch_value(opts[name])
    if found is None:
        flag = launcher_option(name).flag
        raise UsageError(f"{flag} takes true or false", shown(opts[name]), f"give {flag} alone, or leave it out")
    return found


def _ranks(opts: dict, probe: Callable[[], GpuProbe], cores: int, slurm_gpus: int | None) -> tuple[int, str, list]:
    """Decide (ranks per node, device type, notes) from --gpus / --cpu."""
    gpus, cpu = opts["gpus"], opts["cpu"]
    explicit_gpus = str(gpus).lower() != "auto"
    if cpu is not None:
        if explicit_gpus:
            raise UsageError("--gpus and --cpu both given", f"--gpus {gpus} --cpu {cpu}",
                             "use --gpus N for GPU ranks or --cpu N for CPU ranks, not both")
        return launcher_option("cpu").number(cpu), "cpu", []
    found = probe()
    if explicit_gpus:
        wanted = launcher_option("gpus").number(gpus)
        if slurm_gpus is not None and slurm_gpus < wanted:
            raise UsageError("--gpus asks for more GPUs than Slurm allocated on this node",
                             f"--gpus {wanted}, SLURM_GPUS_ON_NODE={slurm_gpus}",
                             f"use --gpus {slurm_gpus}, or ask sbatch for --gpus-per-node={wanted}")
        if found.count < wanted:
            why = f": {found.reason}" if found.reason else ""
            raise UsageError("--gpus asks for more GPUs than torch can see",
                             f"--gpus {wanted}, {found.count} visible{why}",
                             f"use --gpus {found.count}" if found.count else "use --cpu N to run CPU ranks")
        return wanted, "cuda", []
    if found.count > 0:
        return found.count, "cuda", []
    n = 2 if cores > 1 else 1
    note = (f"fastlaunch: no usable GPU ({found.reason}); running {n} CPU rank{'s' if n > 1 else ''} over gloo. "
            "HINT: --gpus N requires N GPUs; --cpu N picks the CPU rank count.")
    return n, "cpu", [note]


def _node_range(value: object) -> tuple[int, int]:
    """--nnodes N or MIN:MAX."""
    text = str(value)
    try:
        lo, hi = (int(p) for p in text.split(":", 1)) if ":" in text else (int(text), int(text))
    except ValueError:
        raise UsageError("--nnodes takes N or MIN:MAX", value, "e.g. --nnodes 2, or --nnodes 1:4 (elastic)") from None
    if lo < 1 or hi < lo:
        raise UsageError("--nnodes range is empty or below 1", value, "e.g. --nnodes 2, or --nnodes 1:4 (elastic)")
    return lo, hi


def _endpoint(value: object) -> str:
    text = str(value)
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise UsageError("--rdzv-endpoint takes host:port", value, "e.g. --rdzv-endpoint 10.0.0.1:29400 (the first node)")
    return text


def _nodes(opts: dict, given_nnodes: bool, slurm: SlurmFacts | None,
           resolve_endpoint: Callable[[SlurmFacts], str]) -> dict[str, Any]:
    """min/max nodes, node rank, endpoint and id: from the flags, or from a Slurm allocation."""
    if slurm is not None and not given_nnodes and slurm.nnodes > 1:
        if not slurm.in_step:
            raise UsageError("fastlaunch runs in the batch script of a multi-node allocation",
                             f"SLURM_NNODES={slurm.nnodes}", "start it with srun, one task per node: "
                             "srun --ntasks-per-node=1 fastlaunch ... (or render a job with `fastlaunch slurm`)")
        if slurm.ntasks != slurm.nnodes:
            raise UsageError("fastlaunch needs one Slurm task per node", f"SLURM_NTASKS={slurm.ntasks} on "
                             f"{slurm.nnodes} nodes", "use srun --ntasks-per-node=1; --gpus/--cpu sets ranks per node")
        return dict(min_nodes=slurm.nnodes, max_nodes=slurm.nnodes, node_rank=slurm.node_id,
                    rdzv_endpoint=resolve_endpoint(slurm), rdzv_id=f"slurm-{slurm.job_id}")
    lo, hi = _node_range(opts["nnodes"])
    node_rank = None if opts["node_rank"] is None else _whole(opts, "node_rank")
    if hi == 1:
        return dict(min_nodes=1, max_nodes=1, node_rank=None, rdzv_endpoint=None, rdzv_id="fastlaunch")
    if not opts["rdzv_endpoint"]:
        raise UsageError("--nnodes above 1 needs the first node's address", f"--nnodes {opts['nnodes']}",
                         "add --rdzv-endpoint HOST:PORT, the same on every node")
    if node_rank is not None and lo != hi:
        raise UsageError("--node-rank needs a fixed --nnodes", f"--nnodes {opts['nnodes']} --node-rank {node_rank}",
                         "drop --node-rank: an elastic range orders the nodes itself")
    if node_rank is not None and node_rank >= hi:
        raise UsageError("--node-rank must be below --nnodes", f"--node-rank {node_rank} --nnodes {hi}",
                         f"use 0 to {hi - 1}")
    return dict(min_nodes=lo, max_nodes=hi, node_rank=node_rank, rdzv_endpoint=_endpoint(opts["rdzv_endpoint"]),
                rdzv_id=str(opts["rdzv_id"] or "fastlaunch"))


def _check_script(path: Path, script: str) -> None:
    """The script must exist, be a file, and be Python source that compiles."""
    if not path.exists():
        raise UsageError("script not found", script, "check the path; the script comes after the launcher flags")
    if not path.is_file():
        raise UsageError("script is not a file", script, "pass a Python file such as train.py")
    if is_notebook(path):  # its cells may hold magics: read as a notebook, not compiled as Python
        code_cells(path)
        return
    try:
        compile(path.read_bytes(), str(path), "exec")
    except (SyntaxError, ValueError, UnicodeDecodeError) as err:
        where = f" (line {err.lineno}: {err.msg})" if isinstance(err, SyntaxError) and err.lineno else ""
        raise UsageError("the script is not valid Python", f"{script}{where}",
                         "fastlaunch runs Python scripts; check the file and its syntax with `python SCRIPT`") from None


def _check_not_nested(environ: Mapping[str, str]) -> list[str]:
    """A launch from inside another launcher's rank is refused; stale torchrun variables are noted."""
    inside = [k for k in ("TORCHELASTIC_RUN_ID", "RANK", "LOCAL_RANK") if k in environ]
    if inside:
        raise UsageError("fastlaunch was started inside a rank of another launch",
                         ", ".join(f"{k}={environ[k]}" for k in inside),
                         "run fastlaunch from a plain shell, not from a script that torchrun or fastlaunch started "
                         "(or unset these variables if they are left over)")
    stale = sorted(k for k in environ if k.startswith("PET_"))
    return [f"fastlaunch: warning: ignoring {', '.join(stale)} (only torchrun's argument parser reads PET_* "
            "variables; use fastlaunch's flags or --config)"] if stale else []


def _resume_checkpoint(run_dir: object) -> Path | None:
    """The newest checkpoint of the run to resume, or a HINT error when it has none."""
    if not run_dir:
        return None
    from ..checkpoint import checkpoint_dir, latest

    found = latest(Path(str(run_dir)), say=launcher_line)
    if found is None:
        if list(checkpoint_dir(Path(str(run_dir))).glob("*.pt")):
            raise UsageError("the run to resume has no good checkpoint", f"{run_dir}/checkpoints",
                             "the lines above say why each was skipped; start the script again without --resume")
        raise UsageError("the run to resume has no checkpoint", f"{run_dir}/checkpoints",
                         "runs checkpoint with --checkpoint-every epoch, or when stopped by SIGTERM/SIGUSR1")
    return found.resolve()


def build_config(opts: dict, given: set[str], script: str, script_args: list[str], *,
                 probe: Callable[[], GpuProbe] | None = None, cores: int | None = None,
                 bf16_probe: Callable[[], bool] | None = None, environ: Mapping[str, str] | None = None,
                 resolve_endpoint: Callable[[SlurmFacts], str] | None = None) -> LaunchConfig:
    """Validate the options and the script; no side effects but the GPU probe (and scontrol under Slurm)."""
    environ = launcher_environ() if environ is None else environ
    probe, bf16_probe = probe or probe_gpus, bf16_probe or bf16_supported
    path = Path(script)
    _check_script(path, script)
    notes = _check_not_nested(environ)
    precision = Precision.parse(opts["precision"])
    max_restarts = _whole(opts, "max_restarts")
    port = None if opts["port"] is None else _whole(opts, "port")
    if port is not None and port > 65535:
        raise UsageError("--port is out of range", port, "use a port from 1024 to 65535, or leave it out")
    slurm = SlurmFacts.from_environ(environ)
    if resolve_endpoint is None:
        from ..tools.cluster.slurm import rendezvous_endpoint

        resolve_endpoint = rendezvous_endpoint
    nodes = _nodes(opts, "nnodes" in given, slurm, resolve_endpoint)
    if opts["seed"] is not None:
        seed = _whole(opts, "seed")
    elif nodes["max_nodes"] > 1:  # every node must draw the same seed: derive it from what they share
        seed = zlib.crc32(f"{nodes['rdzv_id']}|{nodes['rdzv_endpoint']}".encode()) % 2**31
    else:
        seed = secrets.randbelow(2**31)
    cores = usable_cores() if cores is None else cores
    nproc, device, rank_notes = _ranks(opts, probe, cores, slurm.gpus_on_node if slurm else None)
    grace = _whole(opts, "grace")
    every = str(opts["checkpoint_every"]).lower()
    if every not in ("epoch", "none"):
        raise UsageError("--checkpoint-every takes epoch or none", opts["checkpoint_every"],
                         "use --checkpoint-every epoch")
    resume_from = _resume_checkpoint(opts["resume"])
    hang_timeout = _whole(opts, "hang_timeout")
    if precision is Precision.BF16 and device == "cuda" and not bf16_probe():
        raise UsageError("--precision bf16 on GPUs without bf16 support", "--precision bf16",
                         "use --precision fp16 on these GPUs")
    if _switch(opts, "sync_bn") and device != "cuda":
        raise UsageError("--sync-bn needs GPUs: gloo cannot synchronise BatchNorm across CPU ranks",
                         f"--sync-bn with {nproc} CPU rank(s)", "leave --sync-bn out on CPU, or use --gpus N")
    run_dir = Path(str(opts["run_dir"])).resolve() if opts["run_dir"] else None
    return LaunchConfig(
        script=path.resolve(), script_args=tuple(script_args), nproc_per_node=nproc, device=device,
        run_dir=run_dir, seed=seed, precision=precision, port=port, max_restarts=max_restarts,
        verbose=_switch(opts, "verbose"), cpus_per_rank=max(1, cores // nproc), node_cores=cores,
        keep_global_batch=_switch(opts, "keep_global_batch"), sync_bn=_switch(opts, "sync_bn"),
        notes=tuple(notes + rank_notes), grace=grace,
        hang_timeout=hang_timeout, checkpoint_every=every,
        keep_checkpoints=_whole(opts, "keep_checkpoints"), resume_from=resume_from,
        auto_resume=_switch(opts, "auto_resume"),
        max_requeues=3 if opts["max_requeues"] is None else _whole(opts, "max_requeues"),
        instrument=not _switch(opts, "no_instrument"), **nodes,
    )
