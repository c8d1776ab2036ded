"""The launcher's options: one table, parsed from argv (by fire), from a YAML launch config, or from an
accelerate config. Precedence: command line > --config file > --accelerate-config file > defaults."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from .errors import UsageError

__all__ = ["DEFAULTS", "VALUE_FLAGS", "BOOL_FLAGS", "parse_tokens", "load_launch_file", "load_accelerate_config",
           "merged_options", "options_of_run", "SLURM_KEYS"]

DEFAULTS: dict[str, Any] = {
    "gpus": "auto", "cpu": None, "precision": "no", "run_dir": None, "port": None, "max_restarts": 0,
    "seed": None, "verbose": False, "keep_global_batch": False, "sync_bn": False, "nnodes": "1", "node_rank": None,
    "rdzv_endpoint": None, "rdzv_id": None, "grace": 30, "hang_timeout": 600,
    "checkpoint_every": "none", "keep_checkpoints": 2, "resume": None, "no_instrument": False, "config": None, "accelerate_config": None,
}
BOOL_FLAGS = tuple(f"--{k.replace('_', '-')}" for k, v in DEFAULTS.items() if isinstance(v, bool))
VALUE_FLAGS = tuple(f"--{k.replace('_', '-')}" for k, v in DEFAULTS.items() if not isinstance(v, bool))
# Keys a launch config may also hold for `fastlaunch slurm` (the job script, not the launch itself).
SLURM_KEYS = ("nodes", "time", "partition", "cpus_per_rank", "grace", "job_name")


def _given(tokens: list[str]) -> set[str]:
    """Option names written on the command line."""
    return {t.split("=", 1)[0][2:].replace("-", "_") for t in tokens if t.startswith("--")}


def parse_tokens(tokens: list[str]) -> tuple[dict[str, Any], set[str]]:
    """fire turns the launcher's tokens into typed values; also return which options were given."""
    import fire

    parsed: dict = {}

    def _options(**kwargs):
        parsed.update(kwargs)

    fire.Fire(_options, command=tokens, name="fastlaunch")
    opts = {**DEFAULTS, **{k.replace("-", "_"): v for k, v in parsed.items()}}
    for flag in BOOL_FLAGS:  # fire reads --no-x as x=False: booleans are taken from the tokens themselves
        key = flag[2:].replace("-", "_")
        opts[key] = flag in tokens
    return opts, _given(tokens)


def _read_yaml(path: str, flag: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{flag} file not found", path, "check the path of the YAML file")
    try:
        data = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UsageError(f"{flag} is not valid YAML", f"{path}: {str(err).splitlines()[0]}",
                         "fix the file; see launch_configs/ for examples") from None
    if not isinstance(data, dict):
        raise UsageError(f"{flag} must hold key: value pairs", path, "see launch_configs/ for examples")
    return data


def load_launch_file(path: str, extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A fastlaunch YAML launch config: the command line's keys (dashes or underscores)."""
    data = {str(k).replace("-", "_"): v for k, v in _read_yaml(path, "--config").items()}
    valid = [k for k in DEFAULTS if k not in ("config", "accelerate_config")] + list(extra_keys)
    unknown = sorted(set(data) - set(valid))
    if unknown:
        where = " (a `fastlaunch slurm` key)" if set(unknown) & set(SLURM_KEYS) else ""
        raise UsageError(f"unknown key in launch config {path}{where}", ", ".join(unknown),
                         "valid keys: " + ", ".join(valid))
    return data


def load_accelerate_config(path: str) -> dict[str, Any]:
    """Map an accelerate config onto fastlaunch options (num_processes counts every machine's ranks)."""
    data = _read_yaml(path, "--accelerate-config")
    machines = int(data.get("num_machines", 1) or 1)
    total = int(data.get("num_processes", 1) or 1)
    if total % machines:
        raise UsageError("num_processes is not a multiple of num_machines in the accelerate config",
                         f"num_processes {total}, num_machines {machines}", "make it ranks-per-machine x machines")
    out: dict[str, Any] = {("cpu" if data.get("use_cpu") else "gpus"): total // machines}
    if machines > 1:
        out["nnodes"] = str(machines)
        out["node_rank"] = int(data.get("machine_rank", 0) or 0)
        if data.get("main_process_ip"):
            out["rdzv_endpoint"] = f"{data['main_process_ip']}:{data.get('main_process_port') or 29500}"
    precision = str(data.get("mixed_precision", "no") or "no").lower()
    if precision == "fp8":
        raise UsageError("fp8 mixed precision is not supported", "mixed_precision: fp8",
                         "use bf16 or fp16 in the accelerate config, or --precision")
    out["precision"] = precision
    return out


def options_of_run(saved: dict[str, Any]) -> dict[str, Any]:
    """The options that made a run, from its launch.yaml (for --resume)."""
    opts = {("cpu" if saved["device"] == "cpu" else "gpus"): saved["nproc_per_node"]}
    for key in ("precision", "seed", "keep_global_batch", "sync_bn", "grace", "hang_timeout", "checkpoint_every",
                "keep_checkpoints", "max_restarts", "node_rank", "rdzv_endpoint", "rdzv_id"):
        if saved.get(key) is not None:
            opts[key] = saved[key]
    lo, hi = saved.get("min_nodes", 1), saved.get("max_nodes", 1)
    opts["nnodes"] = str(hi) if lo == hi else f"{lo}:{hi}"
    return opts


def merged_options(tokens: list[str], extra_keys: tuple[str, ...] = (),
                   base: dict[str, Any] | None = None) -> tuple[dict[str, Any], set[str]]:
    """Defaults, then `base` (a resumed run's options), then --accelerate-config, then --config, then the
    command line; and the keys set by any of them."""
    cli, given = parse_tokens(tokens)
    opts = dict(DEFAULTS)
    layers = [base] if base else []
    if cli["accelerate_config"]:
        layers.append(load_accelerate_config(str(cli["accelerate_config"])))
    if cli["config"]:
        layers.append(load_launch_file(str(cli["config"]), extra_keys))
    layers.append({k: v for k, v in cli.items() if k in given})
    for layer in layers:
        opts.update(layer)
    return opts, {k for layer in layers for k in layer}
