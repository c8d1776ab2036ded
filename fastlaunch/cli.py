"""Command line: argv -> LaunchConfig -> engine. Nothing past this module sees raw argv."""
from __future__ import annotations

import secrets
import sys
from pathlib import Path
from typing import Callable, Sequence

from .config import LaunchConfig, Precision
from .device import GpuProbe, bf16_supported, probe_gpus, usable_cores
from .errors import UsageError

__all__ = ["main", "run", "split_argv", "build_config", "HELP"]

# Launcher flags that take a value, and those that do not. Everything after the script is the script's.
_VALUE_FLAGS = ("--gpus", "--cpu", "--precision", "--run-dir", "--port", "--max-restarts", "--seed")
_BOOL_FLAGS = ("--verbose", "--keep-global-batch")
_HELP_FLAGS = ("-h", "--help")

HELP = """\
usage: fastlaunch [launcher flags] SCRIPT [script arguments...]

Runs an ordinary one-GPU fastai script data-parallel on N GPUs or N CPU processes,
with no change to the script. Everything after SCRIPT reaches the script unchanged.

launcher flags (before SCRIPT):
  --gpus N|auto         ranks per node, one per GPU (default auto: every visible GPU;
                        with no usable GPU, 2 CPU ranks after saying why)
  --cpu N               N CPU ranks over gloo (GPUs, if any, are hidden from them)
  --precision P         no | fp16 | bf16 (default no)
  --run-dir DIR         run directory (default runs/<YYYYmmdd-HHMMSS>-<script stem>)
  --port P              rendezvous port on 127.0.0.1 (default: a free one)
  --max-restarts K      restart the ranks up to K times after a failure (default 0)
  --seed S              seed for python, numpy and torch on every rank (default: random, recorded)
  --keep-global-batch   divide the script's batch size by the ranks, so bs stays the global batch
                        (default: bs per rank, global batch = bs x ranks)
  --verbose             show the engine's own log lines
  -h, --help            show this help

examples:
  fastlaunch --gpus 4 train.py --epochs 5 --lr 1e-3
  fastlaunch --cpu 2 train.py --epochs 5
  fastlaunch train.py
  python -m fastlaunch --cpu 2 train.py

Each run writes runs/<stamp>-<stem>/: launch.yaml (the effective configuration) and
logs/rank<R>.log (stdout and stderr of each global rank). The console shows rank 0.
"""


def split_argv(argv: Sequence[str]) -> tuple[list[str], str | None, list[str]]:
    """Split argv at the script path: (launcher tokens, script, script args byte for byte)."""
    launcher: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":  # explicit end of launcher flags: the next token is the script
            return launcher, (argv[i + 1] if i + 1 < len(argv) else None), list(argv[i + 2:])
        if not token.startswith("-") or token == "-":
            return launcher, token, list(argv[i + 1:])
        name = token.split("=", 1)[0]
        if name in _VALUE_FLAGS:
            if "=" in token:
                launcher.append(token)
            elif i + 1 < len(argv):
                launcher += [token, argv[i + 1]]
                i += 1
            else:
                raise UsageError(f"launcher flag {name} needs a value", "nothing", f"write {name} VALUE before the script")
        elif token in _BOOL_FLAGS or token in _HELP_FLAGS:
            launcher.append(token)
        else:
            raise UsageError("unknown launcher flag before the script", token,
                             "see `fastlaunch --help`; flags meant for the script go after the script path")
        i += 1
    return launcher, None, []


def _parse_flags(tokens: list[str]) -> dict:
    """Let fire turn the launcher's tokens into typed keyword values."""
    import fire

    parsed: dict = {}

    def _options(gpus="auto", cpu=None, precision="no", run_dir=None, port=None,
                 max_restarts=0, seed=None, verbose=False, keep_global_batch=False):
        parsed.update(locals())

    fire.Fire(_options, command=tokens, name="fastlaunch")
    return parsed


def _count(flag: str, value: object, minimum: int) -> int:
    """An integer flag value >= minimum, or a UsageError naming the flag."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value))
        except ValueError:
            raise UsageError(f"{flag} takes a whole number", value, f"e.g. {flag} {max(minimum, 2)}") from None
    if value < minimum:
        raise UsageError(f"{flag} must be at least {minimum}", value, f"e.g. {flag} {max(minimum, 2)}")
    return value


def _ranks(opts: dict, probe: Callable[[], GpuProbe], cores: int) -> tuple[int, str, list[str]]:
    """Decide (ranks per node, device type, notes) from --gpus / --cpu."""
    gpus, cpu = opts["gpus"], opts["cpu"]
    explicit_gpus = str(gpus).lower() != "auto"
    if cpu is not None:
        if explicit_gpus:
            raise UsageError("--gpus and --cpu both given", f"--gpus {gpus} --cpu {cpu}",
                             "use --gpus N for GPU ranks or --cpu N for CPU ranks, not both")
        return _count("--cpu", cpu, 1), "cpu", []
    found = probe()
    if explicit_gpus:
        wanted = _count("--gpus", gpus, 1)
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


def build_config(tokens: list[str], script: str, script_args: list[str], *,
                 probe: Callable[[], GpuProbe] = probe_gpus, cores: int | None = None,
                 bf16_probe: Callable[[], bool] = bf16_supported,
                 run_dir: Path | None = None) -> LaunchConfig:
    """Validate the launcher's tokens and the script; no side effects but the GPU probe."""
    opts = _parse_flags(tokens)
    path = Path(script)
    if not path.exists():
        raise UsageError("script not found", script, "check the path; the script comes after the launcher flags")
    if not path.is_file():
        raise UsageError("script is not a file", script, "pass a Python file such as train.py")
    precision = Precision.parse(opts["precision"])
    max_restarts = _count("--max-restarts", opts["max_restarts"], 0)
    port = None if opts["port"] is None else _count("--port", opts["port"], 0)
    if port is not None and port > 65535:
        raise UsageError("--port is out of range", port, "use a port from 1024 to 65535, or leave it out")
    seed = secrets.randbelow(2**31) if opts["seed"] is None else _count("--seed", opts["seed"], 0)
    cores = usable_cores() if cores is None else cores
    nproc, device, notes = _ranks(opts, probe, cores)
    if precision is Precision.BF16 and device == "cuda" and not bf16_probe():
        raise UsageError("--precision bf16 on GPUs without bf16 support", "--precision bf16",
                         "use --precision fp16 on these GPUs")
    chosen_dir = run_dir if run_dir is not None else (Path(str(opts["run_dir"])) if opts["run_dir"] else None)
    return LaunchConfig(
        script=path.resolve(), script_args=tuple(script_args), nproc_per_node=nproc, device=device,
        run_dir=chosen_dir.resolve() if chosen_dir else None, seed=seed, precision=precision, port=port,
        max_restarts=max_restarts, verbose=bool(opts["verbose"]), cpus_per_rank=max(1, cores // nproc),
        keep_global_batch=bool(opts["keep_global_batch"]),
        notes=tuple(notes),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point callable from tests with a list; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        tokens, script, script_args = split_argv(argv)
        if any(t in _HELP_FLAGS for t in tokens) or (script is None and not tokens):
            print(HELP, end="")
            return 0
        if script is None:
            raise UsageError("no script given", " ".join(argv), "write the script path after the launcher flags: "
                             "fastlaunch --cpu 2 train.py")
        config = build_config(tokens, script, script_args)
        from .rundir import prepare_run_dir

        config = prepare_run_dir(config)
    except UsageError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    from .engine import launch

    return launch(config)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
