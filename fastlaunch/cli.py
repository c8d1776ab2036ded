"""Command line: argv -> LaunchConfig -> engine. Nothing past this module sees raw argv."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

from .errors import UsageError
from .options import BOOL_FLAGS as _BOOL_FLAGS
from .options import VALUE_FLAGS as _VALUE_FLAGS
from .options import merged_options
from .resolve import build_config

__all__ = ["main", "run", "split_argv", "HELP", "SUBCOMMANDS"]

_HELP_FLAGS = ("-h", "--help")
SUBCOMMANDS = ("slurm", "new", "doctor", "report")

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
  --sync-bn             BatchNorm statistics over every rank's share of the batch (SyncBatchNorm;
                        GPUs only)
  --grace S             seconds the ranks get to stop on SIGTERM/SIGUSR1 before they are killed
                        (default 30)
  --hang-timeout S      a rank with no progress inside a fit for S seconds is named, its stack
                        dumped into its log, and the job stopped (default 600; 0: off)
  --checkpoint-every epoch|none
                        rank 0 checkpoints after every epoch into the run directory (default none)
  --keep-checkpoints K  per-epoch checkpoints kept (default 2)
  --resume RUN_DIR      continue that run from its newest checkpoint, mid-epoch if it stopped there
                        (script, arguments and flags come from RUN_DIR/launch.yaml unless given)
  --no-instrument       no per-rank metrics and no report (on by default)
  --verbose             show the engine's own log lines
  --config FILE         a YAML launch config with these flags' names as keys (flags given here win)
  --accelerate-config FILE
                        take ranks, machines and precision from an accelerate config

several machines (run the same command on each; under srun, Slurm fills these in):
  --nnodes N|MIN:MAX    machines in the job; MIN:MAX lets machines join and leave (elastic)
  --node-rank K         this machine's place (0..N-1) with a fixed --nnodes; without it the
                        rendezvous orders the machines itself (node 0 need not hold rank 0)
  --rdzv-endpoint H:P   address of the first machine, the same on every machine
  --rdzv-id ID          job id shared by the machines (default fastlaunch)

subcommands:
  fastlaunch slurm --nodes N --gpus G --time T [--partition P] train.py args > job.sbatch
  fastlaunch new DIR --template minimal|vision|tabular|text
  fastlaunch doctor [--json] [train.py args]
  fastlaunch report RUN_DIR

examples:
  fastlaunch --gpus 4 train.py --epochs 5 --lr 1e-3
  fastlaunch --cpu 2 train.py --epochs 5
  fastlaunch train.py
  python -m fastlaunch --cpu 2 train.py
  fastlaunch --nnodes 2 --node-rank 0 --rdzv-endpoint 10.0.0.1:29400 --gpus 8 train.py

Each run writes runs/<stamp>-<stem>/: launch.yaml (the effective configuration) and
logs/rank<R>.log (stdout and stderr of each global rank). The console shows rank 0.
"""


def split_argv(argv: Sequence[str], value_flags: Sequence[str] = _VALUE_FLAGS,
               bool_flags: Sequence[str] = _BOOL_FLAGS) -> tuple[list[str], str | None, list[str]]:
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
        if name in value_flags:
            if "=" in token:
                launcher.append(token)
            elif i + 1 < len(argv):
                launcher += [token, argv[i + 1]]
                i += 1
            else:
                raise UsageError(f"launcher flag {name} needs a value", "nothing", f"write {name} VALUE before the script")
        elif token in bool_flags or token in _HELP_FLAGS:
            launcher.append(token)
        else:
            raise UsageError("unknown launcher flag before the script", token,
                             "see `fastlaunch --help`; flags meant for the script go after the script path")
        i += 1
    return launcher, None, []


def _resume_dir(tokens: list[str]) -> str | None:
    for i, token in enumerate(tokens):
        if token == "--resume" and i + 1 < len(tokens):
            return tokens[i + 1]
        if token.startswith("--resume="):
            return token.split("=", 1)[1]
    return None


def _previous_run(run_dir: str) -> tuple[dict, str, list[str]]:
    """A run's options, script and arguments, from its launch.yaml."""
    import yaml

    from .options import options_of_run
    from .rundir import LAUNCH_FILE

    path = Path(run_dir) / LAUNCH_FILE
    if not path.is_file():
        raise UsageError("--resume needs a run directory of fastlaunch", run_dir,
                         "pass a folder under runs/ that holds launch.yaml and checkpoints/")
    try:
        saved = yaml.safe_load(path.read_text())
        return options_of_run(saved), saved["script"], list(saved["script_args"])
    except (yaml.YAMLError, KeyError, TypeError, AttributeError, ValueError) as err:
        why = f"missing {err}" if isinstance(err, KeyError) else type(err).__name__
        raise UsageError("the run's launch.yaml is broken", f"{path}: {why}",
                         "restore it from a copy, or start the script again without --resume") from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point callable from tests with a list; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "slurm":
        from .cluster.slurm_command import slurm_main

        return slurm_main(argv[1:])
    if argv and argv[0] == "new":
        from .scaffold import new_main

        return new_main(argv[1:])
    if argv and argv[0] == "report":
        from .engine import report_main

        return report_main(argv[1:])
    if argv and argv[0] == "doctor":
        from .doctor_cli import doctor_main

        return doctor_main(argv[1:])
    try:
        tokens, script, script_args = split_argv(argv)
        if any(t in _HELP_FLAGS for t in tokens) or (script is None and not tokens):
            print(HELP, end="")
            return 0
        base = None
        resume = _resume_dir(tokens)
        if resume is not None:
            base, saved_script, saved_args = _previous_run(resume)
            if script is None:
                script, script_args = saved_script, saved_args
        if script is None:
            raise UsageError("no script given", " ".join(argv), "write the script path after the launcher flags: "
                             "fastlaunch --cpu 2 train.py")
        opts, given = merged_options(tokens, base=base)
        config = build_config(opts, given, script, script_args)
        from .rendezvous import bind_loopback
        from .rundir import prepare_run_dir

        listener = None if config.multi_node else bind_loopback(config.port)  # a busy --port fails here
        config = prepare_run_dir(config)
    except UsageError as err:
        print(err, file=sys.stderr)
        return err.exit_code
    from .engine import launch

    return launch(config, listener)


def run() -> None:
    """Console-script entry point."""
    sys.exit(main())
