"""The launcher's option values: from argv, from a YAML launch config, from an accelerate config, or from
a run's launch.yaml (--resume). The options themselves are declared in option_table.py.
Precedence: command line > --config file > --accelerate-config file > a resumed run > defaults."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..errors import UsageError, shown
from ..option_table import LAUNCHER_OPTIONS, SLURM_KEYS, SLURM_OPTIONS, Option, options_from_run, switch_value
from .parsing import parse_flags, switch_flags, value_flags

__all__ = ["DEFAULTS", "VALUE_FLAGS", "BOOL_FLAGS", "parse_tokens", "load_launch_file", "load_accelerate_config",
           "merged_options", "options_of_run", "SLURM_KEYS"]

DEFAULTS: dict[str, Any] = {o.name: o.default for o in LAUNCHER_OPTIONS}
BOOL_FLAGS = switch_flags(LAUNCHER_OPTIONS)
VALUE_FLAGS = value_flags(LAUNCHER_OPTIONS)
_CONFIG_KEYS = tuple(o.name for o in LAUNCHER_OPTIONS if o.config_key)
_BY_NAME: dict[str, Option] = {o.name: o for o in SLURM_OPTIONS + LAUNCHER_OPTIONS}  # the launcher's gpus, cpu


def parse_tokens(tokens: list[str]) -> tuple[dict[str, Any], set[str]]:
    """The launcher's tokens as typed values over the defaults; also which options were given."""
    given, rest = parse_flags(LAUNCHER_OPTIONS, tokens)
    if rest:
        raise UsageError("unknown launcher flag before the script", rest[0],
                         "see `fastlaunch --help`; flags meant for the script go after the script path")
    return {**DEFAULTS, **given}, set(given)


def _read_yaml(path: str, flag: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"{flag} file not found", path, "check the path of the YAML file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise UsageError(f"{flag} file is not UTF-8 text", f"{path}: byte {err.start}",
                         "save it as UTF-8 (a YAML file of key: value lines)") from None
    except OSError as err:
        raise UsageError(f"{flag} file cannot be read", f"{path}: {err.strerror}", "check its permissions") from None
    except (yaml.YAMLError, ValueError, RecursionError) as err:
        first = str(err).splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{flag} is not valid YAML", f"{path}: {shown(first)}",
                         "fix the file; see launch_configs/ for examples") from None
    if not isinstance(data, dict):
        raise UsageError(f"{flag} must hold key: value pairs", path, "see launch_configs/ for examples")
    return data


def load_launch_file(path: str, extra_keys: tuple[str, ...] = ()) -> dict[str, Any]:
    """A fastlaunch YAML launch config: the command line's keys (dashes or underscores)."""
    data = {str(k).replace("-", "_"): v for k, v in _read_yaml(path, "--config").items()}
    valid = list(_CONFIG_KEYS) + list(extra_keys)
    unknown = sorted(set(data) - set(valid))
    if unknown:
        where = " (a `fastlaunch slurm` key)" if set(unknown) & set(SLURM_KEYS) else ""
        raise UsageError(f"unknown key in launch config {path}{where}", shown(", ".join(unknown)),
                         "valid keys: " + ", ".join(valid))
    return _in_kind(data, f"launch config {path}")


def _in_kind(data: dict[str, Any], source: str) -> dict[str, Any]:
    """Each value in its option's kind (option_table.Option.from_file); an empty one (None) leaves the default."""
    return {k: _BY_NAME[k].from_file(v, source) for k, v in data.items() if v is not None}


def _number(data: dict, key: str, default: int, low: int, path: str) -> int:
    """A whole number of an accelerate config (default when absent or empty), or a UsageError naming it."""
    value = data.get(key)
    if value is None or value == "":
        return default
    try:
        number = int(value) if isinstance(value, (int, str)) and not isinstance(value, bool) else low - 1
    except ValueError:
        number = low - 1
    if number >= low:
        return number
    raise UsageError(f"{key} in the accelerate config {path} is not a whole number of at least {low}",
                     f"{key}: {shown(value)}", "write it as `accelerate config` does, e.g. num_processes: 2")


def load_accelerate_config(path: str) -> dict[str, Any]:
    """Map an accelerate config onto fastlaunch options (num_processes counts every machine's ranks)."""
    data = _read_yaml(path, "--accelerate-config")
    machines = _number(data, "num_machines", 1, 1, path)
    total = _number(data, "num_processes", 1, 1, path)
    use_cpu = switch_value(data.get("use_cpu") or False)
    if use_cpu is None:
        raise UsageError(f"use_cpu in the accelerate config {path} takes true or false",
                         f"use_cpu: {shown(data['use_cpu'])}", "write use_cpu: true or use_cpu: false")
    if total % machines:
        raise UsageError("num_processes is not a multiple of num_machines in the accelerate config",
                         f"num_processes {total}, num_machines {machines}", "make it ranks-per-machine x machines")
    out: dict[str, Any] = {("cpu" if use_cpu else "gpus"): total // machines}
    if machines > 1:
        out["nnodes"] = str(machines)
        out["node_rank"] = _number(data, "machine_rank", 0, 0, path)
        if data.get("main_process_ip"):
            ip = _BY_NAME["rdzv_endpoint"].from_file(data["main_process_ip"], f"the accelerate config {path}")
            out["rdzv_endpoint"] = f"{ip}:{_number(data, 'main_process_port', 29500, 1, path)}"
    if not isinstance(data.get("mixed_precision") or "no", str):
        raise UsageError(f"mixed_precision in the accelerate config {path} takes no, fp16 or bf16",
                         f"mixed_precision: {shown(data['mixed_precision'])}", "write mixed_precision: bf16, for one")
    precision = str(data.get("mixed_precision") or "no").lower()
    if precision == "fp8":
        raise UsageError("fp8 mixed precision is not supported", "mixed_precision: fp8",
                         "use bf16 or fp16 in the accelerate config, or --precision")
    out["precision"] = precision
    return out


def options_of_run(saved: dict[str, Any]) -> dict[str, Any]:
    """The options that made a run, from its launch.yaml (for --resume), each in its option's kind."""
    return _in_kind(options_from_run(saved), "the run's launch.yaml")


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
