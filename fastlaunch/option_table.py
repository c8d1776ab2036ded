"""The launcher's options, each declared once, and what is derived from the declarations.

An Option is one record: its flag, how a command-line token becomes its value, its default, its help
text, whether a YAML launch config (--config) may set it, how `--resume` reads it back from a run's
launch.yaml, the FASTLAUNCH_* variable its resolved value travels to the ranks in, and whether
`fastlaunch slurm` passes it on to the job's launch line. The parser, the option lists of `--help`,
LaunchConfig.to_env, DistEnv.from_environ, options_of_run and the Slurm pass-through all read these
records. Each option has a kind (switch, whole, text, path, literal): a value read from a file is checked
against its kind here (Option.from_file), and a whole number against the option's limits (Option.number) in
resolve.py, alike for every source (flags, files, a resumed run).

Imported by every rank (env.py reads the rank variables through it): standard library only.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from .errors import UsageError, shown
from .values import switch_value, whole_number

__all__ = ["ENV_PREFIX", "Option", "RankVar", "LAUNCHER_OPTIONS", "SLURM_OPTIONS", "RESOLVED_RANK_VARS", "SLURM_KEYS",
           "MAX_RANKS_PER_NODE", "text", "whole_or_text", "switch_value", "whole_number", "launcher_option",
           "rank_variables", "rank_settings", "options_from_run", "slurm_pass_through"]

ENV_PREFIX = "FASTLAUNCH_"
MAX_RANKS_PER_NODE = 1024  # more ranks on one machine is a typo, not a plan
_WEEK = 7 * 24 * 3600  # seconds: a longer wait is a typo (and overflows the timers it sets)
def text(token: str) -> str:
    """A value taken as written."""
    return token


def whole_or_text(token: str) -> int | str:
    """A whole number as an int; anything else as written, for resolve.py to name the flag in its error."""
    try:
        return int(token)
    except ValueError:
        return token


@dataclass(frozen=True)
class RankVar:
    """How a resolved setting reaches every rank: LaunchConfig.<field> is written to FASTLAUNCH_<name>,
    and read back into DistEnv.<dist_field> (DistEnv's own default stands when the variable is unset or empty)."""

    name: str
    field: str
    kind: str  # "text", "int", "count" (an int, 0 read as unset), "flag" ("1"/"0") or "path"
    dist_field: str = ""

    @property
    def var(self) -> str:
        return ENV_PREFIX + self.name

    @property
    def dist_name(self) -> str:
        return self.dist_field or self.field

    def encode(self, value: Any) -> str:
        if self.kind == "flag":
            return "1" if value else "0"
        if self.kind == "path":
            return str(value) if value else ""
        return str(getattr(value, "value", value))  # an enum (Precision) travels as its value

    def decode(self, raw: str) -> Any:
        """The value for DistEnv, or None to leave DistEnv's default."""
        if not raw.strip():
            return None
        found: Any = switch_value(raw) if self.kind == "flag" else raw
        if self.kind in ("int", "count"):
            try:
                found = int(raw)
            except ValueError:
                found = None
        if found is None:
            what = "1 or 0" if self.kind == "flag" else "a whole number"
            raise UsageError(f"{self.var} takes {what}", shown(raw), f"unset {self.var}: the launcher sets it")
        if self.kind == "count":
            return found or None
        return Path(raw) if self.kind == "path" else found


def _saved(key: str) -> Callable[[Mapping[str, Any]], Any]:
    """Read a launch.yaml key as it was written (None: not restored)."""
    return lambda saved: saved.get(key)


def _ranks_of(device_is_cpu: bool) -> Callable[[Mapping[str, Any]], Any]:
    return lambda saved: saved["nproc_per_node"] if (saved["device"] == "cpu") == device_is_cpu else None


def _node_span(saved: Mapping[str, Any]) -> str:
    lo, hi = saved.get("min_nodes", 1), saved.get("max_nodes", 1)
    return str(hi) if lo == hi else f"{lo}:{hi}"


# Each kind of option: the YAML types a file may give it (never a bool but for a switch), what it takes as an
# error line says it, and the hint ({k}: the key).
_KINDS: dict[str, tuple[tuple[type, ...], str, str]] = {
    "switch": ((), "true or false (or yes/no, on/off, 1/0)", "write {k}: true or {k}: false"),
    "whole": ((int, str), "a whole number", "write {k}: N with N a whole number"),
    "text": ((str, int, float), "text", "write {k}: VALUE on one line, quoted where YAML would read it otherwise "
             "({k}: 'no')"),
    "path": ((str, int, float), "a path", "write {k}: DIR, one path on one line"),
    "literal": ((str,), "quoted text", "quote it, e.g. {k}: \"2:00:00\" (YAML reads an unquoted 2:00:00 as 7200 "
                "seconds)"),
}


@dataclass(frozen=True)
class Option:
    """One option of a command. Help text breaks lines with \\n, indented under the first one."""

    name: str
    default: Any
    help: str  # "": accepted but not listed on its own (see label)
    metavar: str = ""  # empty for a switch (a bool default)
    parse: Callable[[str], Any] = text
    section: str = "launcher"  # the part of `--help` that lists it
    config_key: bool = True  # a YAML launch config may set it, under its name
    from_run: Callable[[Mapping[str, Any]], Any] | None = None  # its value from a run's launch.yaml, for --resume
    to_ranks: RankVar | None = None
    slurm: bool = False  # `fastlaunch slurm` passes it on to the job's launch line
    label: str = ""  # the help's left column, when not "FLAG METAVAR"
    aliases: tuple[str, ...] = ()
    # "switch", "whole", "text", "path" or "literal" (text a file must quote); "": from the default and parse
    kind: str = ""
    limits: tuple[int, int | None] = (0, None)  # a whole number's range
    why_limit: str = ""  # said with the range when a value is above it

    def __post_init__(self) -> None:
        if not self.kind:
            kind = "switch" if self.switch else "whole" if self.parse is whole_or_text else "text"
            object.__setattr__(self, "kind", kind)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def number(self, value: object) -> int:
        """A whole number within this option's limits, or a UsageError naming its flag."""
        return whole_number(self.flag, value, *self.limits, why=self.why_limit)

    def from_file(self, value: Any, source: str) -> Any:
        """A value read from a YAML file (source names it) in this option's kind: a switch as a bool, a number
        given for a text as text; anything else a UsageError naming the key, the value and the kind. Limits
        are checked later, with the other sources' values (resolve.py)."""
        types, what, hint = _KINDS[self.kind]
        if self.kind == "switch" and switch_value(value) is not None:
            return switch_value(value)
        if isinstance(value, types) and not isinstance(value, bool) and str(value).isprintable():
            return str(value) if self.kind in ("text", "path") else value
        raise UsageError(f"{self.name} in {source} takes {what}", shown(value), hint.format(k=self.name))

    @property
    def switch(self) -> bool:
        return isinstance(self.default, bool)

    @property
    def flags(self) -> tuple[str, ...]:
        return (self.flag, *self.aliases)


def _opt(name: str, default: Any, help: str, metavar: str = "", parse: Callable[[str], Any] = text, *,
         env: tuple[str, str, str] | None = None, restore: bool = False,
         from_run: Callable[[Mapping[str, Any]], Any] | None = None, **rest: Any) -> Option:
    """An Option; env: (variable, LaunchConfig field, kind); restore: --resume reads its launch.yaml key."""
    return Option(name, default, help, metavar, parse, to_ranks=RankVar(*env) if env else None,
                  from_run=_saved(name) if restore else from_run, **rest)


LAUNCHER_OPTIONS: tuple[Option, ...] = (
    _opt("gpus", "auto", "ranks per node, one per GPU (default auto: every visible GPU;\n"
         "with no usable GPU, 2 CPU ranks after saying why)", "N|auto", whole_or_text, from_run=_ranks_of(False),
         limits=(1, MAX_RANKS_PER_NODE), why_limit="ranks per machine"),
    _opt("cpu", None, "N CPU ranks over gloo (GPUs, if any, are hidden from them)", "N", whole_or_text,
         from_run=_ranks_of(True), limits=(1, MAX_RANKS_PER_NODE), why_limit="ranks per machine"),
    _opt("precision", "no", "no | fp16 | bf16 (default no)", "P", env=("PRECISION", "precision", "text"),
         restore=True, slurm=True),
    _opt("run_dir", None, "run directory (default runs/<YYYYmmdd-HHMMSS>-<script stem>)", "DIR",
         env=("RUN_DIR", "run_dir", "path"), kind="path"),
    _opt("port", None, "rendezvous port on 127.0.0.1 (default: a free one)", "P", whole_or_text),
    _opt("max_restarts", 0, "restart the ranks up to K times after a failure (default 0)", "K", whole_or_text,
         restore=True, slurm=True),
    _opt("seed", None, "seed for python, numpy and torch on every rank (default: random, recorded)", "S",
         whole_or_text, env=("SEED", "seed", "int"), restore=True, slurm=True, limits=(0, 2**32 - 1),
         why_limit="the range of PYTHONHASHSEED and numpy's seed"),
    _opt("verbose", False, "show the engine's own log lines"),
    _opt("keep_global_batch", False, "divide the script's batch size by the ranks, so bs stays the global batch\n"
         "(default: bs per rank, global batch = bs x ranks)", env=("KEEP_GLOBAL_BATCH", "keep_global_batch", "flag"),
         restore=True, slurm=True),
    _opt("sync_bn", False, "BatchNorm statistics over every rank's share of the batch (SyncBatchNorm;\nGPUs only)",
         env=("SYNC_BN", "sync_bn", "flag"), restore=True, slurm=True),
    _opt("nnodes", "1", "machines in the job (default 1); MIN:MAX lets machines join and leave (elastic)",
         "N|MIN:MAX", section="nodes", from_run=_node_span),
    _opt("node_rank", None, "this machine's place (0..N-1) with a fixed --nnodes; without it the\n"
         "rendezvous orders the machines itself (node 0 need not hold rank 0)", "K", whole_or_text,
         section="nodes", restore=True),
    _opt("rdzv_endpoint", None, "address of the first machine, the same on every machine", "H:P", section="nodes",
         restore=True),
    _opt("rdzv_id", None, "job id shared by the machines (default fastlaunch)", "ID", section="nodes", restore=True),
    _opt("grace", 30, "seconds the ranks get to stop on SIGTERM/SIGUSR1 before they are killed\n(default 30)", "S",
         whole_or_text, restore=True, limits=(0, _WEEK), why_limit="7 days at most"),
    _opt("hang_timeout", 600, "a rank with no progress inside a fit for S seconds is named, its stack\n"
         "dumped into its log, and the job stopped (default 600; 0: off)", "S", whole_or_text,
         env=("HANG_TIMEOUT", "hang_timeout", "int"), restore=True, limits=(0, _WEEK), why_limit="7 days at most"),
    _opt("checkpoint_every", "none", "rank 0 checkpoints after every epoch into the run directory (default none)",
         "epoch|none", env=("CHECKPOINT_EVERY", "checkpoint_every", "text"), restore=True),
    _opt("keep_checkpoints", 2, "per-epoch checkpoints kept (default 2)", "K", whole_or_text,
         env=("KEEP_CHECKPOINTS", "keep_checkpoints", "int"), restore=True, limits=(1, None)),
    _opt("resume", None, "continue that run from its newest checkpoint, mid-epoch if it stopped there\n"
         "(script, arguments and flags come from RUN_DIR/launch.yaml unless given)", "RUN_DIR",
         env=("RESUME", "resume_from", "path"), kind="path"),
    _opt("auto_resume", False, "for jobs a scheduler requeues: every start uses --run-dir, and a start that\n"
         "finds a checkpoint there resumes from the newest (fastlaunch slurm sets it)"),
    _opt("max_requeues", None, "with --auto-resume: starts after the first, at most (default 3)", "N",
         whole_or_text, slurm=True),
    _opt("no_instrument", False, "no per-rank metrics and no report (on by default)",
         env=("INSTRUMENT", "instrument", "flag")),
    _opt("config", None, "a YAML launch config with these flags' names as keys (flags given here win)", "FILE",
         config_key=False, kind="path"),
    _opt("accelerate_config", None, "take ranks, machines and precision from an accelerate config", "FILE",
         config_key=False, kind="path"),
)

# Facts the launcher works out (not options) that travel to the ranks too.
RESOLVED_RANK_VARS: tuple[RankVar, ...] = (RankVar("DEVICE", "device", "text", dist_field="device_type"),
                                           RankVar("CPUS_PER_RANK", "cpus_per_rank", "count"),
                                           RankVar("NODE_CORES", "node_cores", "count"))

# `fastlaunch slurm`'s own options; it also takes the launcher options marked slurm=True.
SLURM_OPTIONS: tuple[Option, ...] = (
    _opt("nodes", 1, "machines (default 1)", "N", whole_or_text, limits=(1, None)),
    _opt("gpus", None, "ranks per node: GPUs per node, or CPU ranks per node", "G", whole_or_text,
         label="--gpus G | --cpu C", limits=(1, MAX_RANKS_PER_NODE), why_limit="ranks per machine"),
    _opt("cpu", None, "", "C", whole_or_text, limits=(1, MAX_RANKS_PER_NODE), why_limit="ranks per machine"),
    _opt("time", None, "time limit (e.g. 2:00:00 or 1-00:00:00)", "T", kind="literal"),
    _opt("partition", None, "partition to submit to", "P"),
    _opt("cpus_per_rank", None, "cores per rank (default: the partition's cores per node / ranks, or 4\nwhere Slurm cannot be asked): the task asks for ranks x C", "C", whole_or_text,
         limits=(1, None)),
    _opt("grace", 90, "seconds of warning before the time limit (USR1, default 90)", "S", whole_or_text,
         limits=(0, 65535), why_limit="Slurm's --signal takes no more"),
    _opt("job_name", None, "default: the script's stem", "NAME"),
    _opt("config", None, "a YAML launch config (these keys and the launcher's)", "FILE", config_key=False,
         kind="path"),
    _opt("submit", False, "submit it with sbatch and print the job id instead", config_key=False),
)
# Keys a launch config may also hold for `fastlaunch slurm` (the job script, not the launch itself);
# gpus and cpu are launcher keys already.
SLURM_KEYS = tuple(o.name for o in SLURM_OPTIONS if o.config_key and o.name not in ("gpus", "cpu"))


def launcher_option(name: str) -> Option:
    """The launcher's option of that name."""
    return next(o for o in LAUNCHER_OPTIONS if o.name == name)


def _rank_vars() -> tuple[RankVar, ...]:
    return tuple(o.to_ranks for o in LAUNCHER_OPTIONS if o.to_ranks) + RESOLVED_RANK_VARS


def rank_variables(config: Any) -> dict[str, str]:
    """FASTLAUNCH_* variables for the ranks, from a LaunchConfig."""
    return {v.var: v.encode(getattr(config, v.field)) for v in _rank_vars()}


def rank_settings(environ: Mapping[str, str]) -> dict[str, Any]:
    """DistEnv keyword arguments from the FASTLAUNCH_* variables that are set."""
    found = {v.dist_name: v.decode(environ.get(v.var, "")) for v in _rank_vars()}
    return {k: v for k, v in found.items() if v is not None}


def options_from_run(saved: Mapping[str, Any]) -> dict[str, Any]:
    """The options a run's launch.yaml restores (those it recorded; a KeyError when a required key is missing)."""
    found = {o.name: o.from_run(saved) for o in LAUNCHER_OPTIONS if o.from_run}
    return {k: v for k, v in found.items() if v is not None}


def slurm_pass_through(opts: Mapping[str, Any]) -> list[str]:
    """The launcher flags a `fastlaunch slurm` job's launch line carries: those set, in table order."""
    flags: list[str] = []
    for option in (o for o in LAUNCHER_OPTIONS if o.slurm):
        value = opts.get(option.name)
        if value is True:
            flags.append(option.flag)
        elif value not in (None, False):
            flags += [option.flag, str(value)]
    return flags
