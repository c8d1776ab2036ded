"""Command line: argv -> LaunchConfig -> engine, or a subcommand from COMMANDS. Nothing past this module
(and the subcommands' own entry points) sees raw argv; parsing.py says how it is read."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

from ..tools.cluster.slurm_command import slurm_main
from ..tools.doctor_cli import doctor_main
from ..env import launcher_environ
from ..errors import UsageError
from ..lines import launcher_line
from ..option_table import LAUNCHER_OPTIONS
from .options import BOOL_FLAGS, VALUE_FLAGS, merged_options, options_of_run
from .parsing import option_rows, wants_help
from .parsing import split_argv as _split_argv
from ..tools.report_command import report_main
from .resolve import build_config
from ..tools.scaffold import new_main

__all__ = ["main", "run", "split_argv", "HELP", "COMMANDS", "SUBCOMMANDS"]

# Subcommands: `fastlaunch NAME args...` runs COMMANDS[NAME](args) and exits with what it returns.
COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "slurm": slurm_main,
    "new": new_main,
    "doctor": doctor_main,
    "report": report_main,
}
SUBCOMMANDS = tuple(COMMANDS)

# What a requeued start of a multi-machine job takes from its own command line and scheduler, never from the
# saved launch.yaml (which is node 0's).
_THIS_START = frozenset(o.name for o in LAUNCHER_OPTIONS if o.section == "nodes")

_SECTIONS = {"launcher": "launcher flags (before SCRIPT):",
             "nodes": "several machines (run the same command on each; under srun, Slurm fills these in):"}


def _option_help() -> str:
    """The launcher's options, section by section, from the option table."""
    return "\n".join(title + "\n" + option_rows([o for o in LAUNCHER_OPTIONS if o.section == name], 22)
                     for name, title in _SECTIONS.items())


HELP = f"""\
usage: fastlaunch [launcher flags] SCRIPT [script arguments...]

Runs an ordinary one-GPU fastai script data-parallel on N GPUs or N CPU processes,
with no change to the script. Everything after SCRIPT reaches the script unchanged.

{_option_help()}
subcommands:
  fastlaunch slurm --nodes N --gpus G --time T [--partition P] train.py args > job.sbatch
  fastlaunch new DIR --template minimal|vision|tabular|text
  fastlaunch doctor [--json] [train.py args]
  fastlaunch report RUN_DIR
  (fastlaunch SUBCOMMAND --help for each one's flags)

examples:
  fastlaunch --gpus 4 train.py --epochs 5 --lr 1e-3
  fastlaunch --cpu 2 train.py --epochs 5
  fastlaunch train.py
  python -m fastlaunch --cpu 2 train.py
  fastlaunch --nnodes 2 --node-rank 0 --rdzv-endpoint 10.0.0.1:29400 --gpus 8 train.py

Each run writes runs/<stamp>-<stem>/: launch.yaml (the effective configuration) and
logs/rank<R>.log (stdout and stderr of each global rank). The console shows rank 0.
"""


def split_argv(argv: Sequence[str], value_flags: Sequence[str] = VALUE_FLAGS,
               bool_flags: Sequence[str] = BOOL_FLAGS) -> tuple[list[str], str | None, list[str]]:
    """Split argv at the script path: (launcher tokens, script, script args byte for byte)."""
    return _split_argv(argv, value_flags, bool_flags)


def _previous_run(run_dir: str) -> tuple[dict, str, list[str]]:
    """A run's options, script and arguments, from its launch.yaml."""
    import yaml

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
    if argv and argv[0] in COMMANDS:
        return COMMANDS[argv[0]](argv[1:])
    try:
        tokens, script, script_args = split_argv(argv)
        if wants_help(tokens) or (script is None and not tokens):
            print(HELP, end="")
            return 0
        base = None
        first, _ = merged_options(tokens)
        resume = first["resume"]
        if first["auto_resume"]:  # a requeued start of the same job: its newest checkpoint, if any
            from .autoresume import resume_source

            resume = resume_source(first, say=launcher_line)
        if resume is not None:
            base, saved_script, saved_args = _previous_run(str(resume))
            if first["auto_resume"]:  # this start's own place among the machines, not the saved one's
                base = {k: v for k, v in base.items() if k not in _THIS_START}
            if script is None:
                script, script_args = saved_script, saved_args
        if script is None:
            raise UsageError("no script given", " ".join(argv), "write the script path after the launcher flags: "
                             "fastlaunch --cpu 2 train.py")
        opts, given = merged_options(tokens, base=base)
        opts["resume"] = resume
        config = build_config(opts, given, script, script_args, environ=launcher_environ())
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
