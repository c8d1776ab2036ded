"""`fastlaunch slurm ... train.py args`: render (and optionally submit) a ready-to-run Slurm job script."""
from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from ..errors import UsageError
from ..options import load_launch_file
from ..resolve import count
from .slurm import SbatchSpec, render_sbatch, submit

__all__ = ["slurm_main", "spec_from_options", "SLURM_HELP"]

_DEFAULTS: dict[str, Any] = {"nodes": 1, "gpus": None, "cpu": None, "time": None, "partition": None,
                             "cpus_per_rank": 4, "grace": 90, "job_name": None, "config": None,
                             "precision": None, "seed": None, "max_restarts": None,
                             "submit": False, "keep_global_batch": False, "sync_bn": False}
# become launcher flags in the job
_PASSED_ON = ("precision", "seed", "max_restarts", "keep_global_batch", "sync_bn")
_VALUE = tuple(f"--{k.replace('_', '-')}" for k, v in _DEFAULTS.items() if not isinstance(v, bool))
_BOOL = tuple(f"--{k.replace('_', '-')}" for k, v in _DEFAULTS.items() if isinstance(v, bool))
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")

SLURM_HELP = """\
usage: fastlaunch slurm --nodes N (--gpus G | --cpu C) --time T [options] SCRIPT [script arguments...]

Prints a ready-to-submit sbatch script that runs `fastlaunch` once per node under srun.

  --nodes N            machines (default 1)
  --gpus G | --cpu C   ranks per node: GPUs per node, or CPU ranks per node
  --time T             time limit (e.g. 2:00:00 or 1-00:00:00)
  --partition P        partition to submit to
  --cpus-per-rank C    cores per rank (default 4): the task asks for ranks x C
  --grace S            seconds of warning before the time limit (USR1, default 90)
  --job-name NAME      default: the script's stem
  --config FILE        a YAML launch config (these keys and the launcher's)
  --precision, --seed, --max-restarts, --keep-global-batch, --sync-bn: passed on to fastlaunch in the job
  --submit             submit it with sbatch and print the job id instead

example:
  fastlaunch slurm --nodes 2 --gpus 8 --time 2:00:00 --partition gpu train.py --epochs 5 > job.sbatch
"""


def _parse(tokens: list[str]) -> dict[str, Any]:
    import fire

    parsed: dict = {}

    def _options(**kwargs):
        parsed.update(kwargs)

    fire.Fire(_options, command=tokens, name="fastlaunch slurm")
    opts = dict(_DEFAULTS)
    if parsed.get("config"):
        from ..options import SLURM_KEYS

        file = load_launch_file(str(parsed["config"]), extra_keys=SLURM_KEYS)
        opts.update({k: v for k, v in file.items() if k in _DEFAULTS})
    opts.update(parsed)
    return opts


def spec_from_options(opts: dict[str, Any], script: str, script_args: Sequence[str], *,
                      python: str = sys.executable, workdir: str | None = None) -> SbatchSpec:
    """Validate the subcommand's options into a SbatchSpec."""
    if not Path(script).is_file():
        raise UsageError("script not found", script, "check the path; the script comes after the flags")
    if opts["gpus"] is not None and opts["cpu"] is not None:
        raise UsageError("--gpus and --cpu both given", f"--gpus {opts['gpus']} --cpu {opts['cpu']}",
                         "--gpus G for GPU nodes, --cpu C for CPU ranks")
    if opts["gpus"] is None and opts["cpu"] is None:
        raise UsageError("ranks per node not given", "neither --gpus nor --cpu", "add --gpus G (GPUs per node) or --cpu C")
    use_gpus = opts["gpus"] is not None
    ranks = count("--gpus" if use_gpus else "--cpu", opts["gpus"] if use_gpus else opts["cpu"], 1)
    time = str(opts["time"] or "")
    if not _TIME.match(time):
        raise UsageError("--time is not a Slurm time limit", time or "nothing", "e.g. --time 2:00:00 or 1-00:00:00")
    flags: list[str] = []
    for key in _PASSED_ON:
        value = opts[key]
        if value is True:
            flags.append(f"--{key.replace('_', '-')}")
        elif value not in (None, False):
            flags += [f"--{key.replace('_', '-')}", str(value)]
    return SbatchSpec(nodes=count("--nodes", opts["nodes"], 1), ranks_per_node=ranks, use_gpus=use_gpus, time=time,
                      script=script, script_args=tuple(script_args), python=python,
                      workdir=workdir or os.getcwd(), job_name=str(opts["job_name"] or Path(script).stem),
                      partition=opts["partition"], cpus_per_rank=count("--cpus-per-rank", opts["cpus_per_rank"], 1),
                      grace=count("--grace", opts["grace"], 0), launcher_flags=tuple(flags))


def slurm_main(argv: Sequence[str]) -> int:
    """`fastlaunch slurm`: print the job script (or submit it); exit 2 on bad input."""
    from ..cli import split_argv

    try:
        tokens, script, script_args = split_argv(list(argv), _VALUE, _BOOL)
        if "-h" in tokens or "--help" in tokens or (script is None and not tokens):
            print(SLURM_HELP, end="")
            return 0
        if script is None:
            raise UsageError("no script given", " ".join(argv), "put the script path after the flags")
        opts = _parse(tokens)
        text = render_sbatch(spec_from_options(opts, script, script_args))
    except UsageError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    if not opts["submit"]:
        print(text, end="")
        return 0
    try:
        job = submit(text)
    except (OSError, RuntimeError) as err:
        print(f"fastlaunch: error: sbatch refused the job (got {err}). HINT: run `fastlaunch slurm ...` without "
              "--submit to see the script, and check the partition and limits", file=sys.stderr)
        return 1
    print(job)
    return 0
