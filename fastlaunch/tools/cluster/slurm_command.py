"""`fastlaunch slurm ... train.py args`: render (and optionally submit) a ready-to-run Slurm job script."""
from __future__ import annotations

import os
import re
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

from ...errors import UsageError, shown
from ...option_table import LAUNCHER_OPTIONS, SLURM_KEYS, SLURM_OPTIONS, Option, slurm_pass_through
from ...launcher.options import load_launch_file
from ...launcher.parsing import option_rows, parse_flags, split_argv, switch_flags, value_flags, wants_help
from .partition import NodeShape, check_fits, default_cpus_per_rank, probe_partition
from .slurm import DIRECTIVE_SAFE, SbatchSpec, render_sbatch, submit
from ...lines import launcher_line

__all__ = ["slurm_main", "spec_from_options", "SLURM_HELP", "OPTIONS"]

# The subcommand's own options, then the launcher options it passes on to the job (set only when given).
_PASSED_ON = tuple(o for o in LAUNCHER_OPTIONS if o.slurm)
OPTIONS: tuple[Option, ...] = SLURM_OPTIONS + tuple(replace(o, default=False if o.switch else None) for o in _PASSED_ON)
_DEFAULTS: dict[str, Any] = {o.name: o.default for o in OPTIONS}
_BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}
_TIME = re.compile(r"(\d+-)?\d+(:\d{1,2}){0,2}")

SLURM_HELP = f"""\
usage: fastlaunch slurm --nodes N (--gpus G | --cpu C) --time T [options] SCRIPT [script arguments...]

Prints a ready-to-submit sbatch script that runs `fastlaunch` once per node under srun.

{option_rows(SLURM_OPTIONS, 21)}\
  {", ".join(o.flag for o in _PASSED_ON)}: passed on to fastlaunch in the job

example:
  fastlaunch slurm --nodes 2 --gpus 8 --time 2:00:00 --partition gpu train.py --epochs 5 > job.sbatch
"""


def _parse(tokens: list[str]) -> dict[str, Any]:
    """Defaults, then the --config file's keys this subcommand knows, then the flags given."""
    given, rest = parse_flags(OPTIONS, tokens, "fastlaunch slurm")
    if rest:
        raise UsageError("unknown launcher flag before the script", rest[0],
                         "see `fastlaunch --help`; flags meant for the script go after the script path")
    opts = dict(_DEFAULTS)
    if given.get("config"):
        file = load_launch_file(str(given["config"]), extra_keys=SLURM_KEYS)
        opts.update({k: v for k, v in file.items() if k in _DEFAULTS})
    opts.update(given)
    return opts


def spec_from_options(opts: dict[str, Any], script: str, script_args: Sequence[str], *,
                      python: str = sys.executable, workdir: str | None = None,
                      shape: NodeShape | None = None) -> SbatchSpec:
    """Validate the subcommand's options into a SbatchSpec."""
    if not Path(script).is_file():
        raise UsageError("script not found", script, "check the path; the script comes after the flags")
    if opts["gpus"] is not None and opts["cpu"] is not None:
        raise UsageError("--gpus and --cpu both given", f"--gpus {opts['gpus']} --cpu {opts['cpu']}",
                         "--gpus G for GPU nodes, --cpu C for CPU ranks")
    if opts["gpus"] is None and opts["cpu"] is None:
        raise UsageError("ranks per node not given", "neither --gpus nor --cpu", "add --gpus G (GPUs per node) or --cpu C")
    use_gpus = opts["gpus"] is not None
    ranks = _number(opts, "gpus" if use_gpus else "cpu")
    time = str(opts["time"] or "")
    if not _TIME.fullmatch(time):
        raise UsageError("--time is not a Slurm time limit", shown(time or "nothing"),
                         "e.g. --time 2:00:00 or 1-00:00:00")
    for option in _PASSED_ON:  # checked here as the job's launcher will, so that a bad one never waits in the queue
        if opts[option.name] is not None and option.kind == "whole":
            option.number(opts[option.name])
    flags = slurm_pass_through(opts)
    cpus = (_number(opts, "cpus_per_rank") if opts["cpus_per_rank"] is not None
            else default_cpus_per_rank(shape, ranks))
    check_fits(shape, ranks, cpus, use_gpus, opts["partition"])
    # the script's stem names the job unless --job-name does: what an #SBATCH line cannot carry becomes _
    name = str(opts["job_name"]) if opts["job_name"] else "_".join(DIRECTIVE_SAFE.findall(Path(script).stem)) or "job"
    return SbatchSpec(nodes=_number(opts, "nodes"), ranks_per_node=ranks, use_gpus=use_gpus, time=time,
                      script=script, script_args=tuple(script_args), python=python,
                      workdir=workdir or os.getcwd(), job_name=name,
                      partition=str(opts["partition"]) if opts["partition"] else None, cpus_per_rank=cpus,
                      grace=_number(opts, "grace"), launcher_flags=tuple(flags))


def _number(opts: dict[str, Any], name: str) -> int:
    """A whole-number option within the limits the option table gives it."""
    return _BY_NAME[name].number(opts[name])


def slurm_main(argv: Sequence[str]) -> int:
    """`fastlaunch slurm`: print the job script (or submit it); exit 2 on bad input."""
    try:
        tokens, script, script_args = split_argv(list(argv), value_flags(OPTIONS), switch_flags(OPTIONS))
        if wants_help(tokens) or (script is None and not tokens):
            print(SLURM_HELP, end="")
            return 0
        if script is None:
            raise UsageError("no script given", " ".join(argv), "put the script path after the flags")
        opts = _parse(tokens)
        text = render_sbatch(spec_from_options(opts, script, script_args, shape=probe_partition(opts["partition"])))
    except UsageError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    if not opts["submit"]:
        print(text, end="")
        return 0
    try:
        job = submit(text)
    except (OSError, RuntimeError) as err:
        launcher_line(f"fastlaunch: error: sbatch refused the job (got {err}). HINT: run `fastlaunch slurm ...` "
                      "without --submit to see the script, and check the partition and limits")
        return 1
    print(job)
    launcher_line(f"fastlaunch: submitted job {job}; its output goes to {os.getcwd()}/slurm-{job}.out. Follow it: "
                  f"tail -f slurm-{job}.out   state: squeue -j {job} (sacct -j {job} once ended)   "
                  f"stop: scancel {job}")
    return 0
