"""Slurm: node lists, node addresses as Slurm knows them, the job's rendezvous, and sbatch scripts."""
from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass
from string import Template
from typing import Callable, Sequence

from ...env import SlurmFacts
from ...errors import UsageError, shown
from ...resources import data_path

__all__ = ["parse_nodelist", "node_addr", "job_port", "rendezvous_endpoint", "SbatchSpec", "render_sbatch",
           "check_spec", "DIRECTIVE_SAFE", "JOB_RUN_DIR"]

JOB_RUN_DIR = "runs/slurm-${SLURM_JOB_ID}"  # relative to the job's --chdir (the submit directory)
# What a `#SBATCH --key=VALUE` value may hold as written: no space (sbatch splits the line there and reads the
# rest as more directives), no quote, backslash or # (sbatch's own quoting and comments), nothing the shell
# would read either.
DIRECTIVE_SAFE = re.compile(r"[\w.,:@%+=/-]+")


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand(name: str) -> list[str]:
    """Expand the first bracket group of a host name, then the rest recursively."""
    match = re.search(r"\[([^\]]+)\]", name)
    if not match:
        return [name]
    head, tail = name[: match.start()], name[match.end():]
    out = []
    for item in match.group(1).split(","):
        if "-" in item:
            lo, hi = item.split("-", 1)
            width = len(lo) if lo.startswith("0") else 0
            out += [f"{head}{str(i).zfill(width)}" for i in range(int(lo), int(hi) + 1)]
        else:
            out.append(head + item)
    return [full for part in out for full in _expand(part + tail)]


def parse_nodelist(nodelist: str) -> list[str]:
    """'gpu[01-04,07],cpu1' -> ['gpu01', 'gpu02', 'gpu03', 'gpu04', 'gpu07', 'cpu1']."""
    return [host for part in _split_top(nodelist.strip()) for host in _expand(part)]


Runner = Callable[..., subprocess.CompletedProcess]


def node_addr(name: str, run: Runner = subprocess.run) -> str | None:
    """The address Slurm uses for a node (NodeAddr from scontrol), since node names need not resolve."""
    try:
        proc = run(["scontrol", "show", "node", name], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\bNodeAddr=(\S+)", proc.stdout or "")
    return match.group(1) if proc.returncode == 0 and match else None


def job_port(job_id: int) -> int:
    """A rendezvous port every node of a job computes alike, from the job id."""
    return 20000 + job_id % 20000


def rendezvous_endpoint(facts: SlurmFacts, run: Runner = subprocess.run) -> str:
    """host:port of the first node of the allocation, resolved the way Slurm knows it."""
    first = parse_nodelist(facts.nodelist)[0] if facts.nodelist else None
    addr = node_addr(first, run) if first else None
    if addr is None:
        addr = facts.launch_node_ip or first or "127.0.0.1"
    return f"{addr}:{job_port(facts.job_id)}"


@dataclass(frozen=True)
class SbatchSpec:
    """What `fastlaunch slurm` renders into a job script."""

    nodes: int
    ranks_per_node: int
    use_gpus: bool
    time: str
    script: str
    script_args: tuple[str, ...]
    python: str
    workdir: str
    job_name: str
    partition: str | None = None
    cpus_per_rank: int = 4
    grace: int = 90
    launcher_flags: tuple[str, ...] = ()


def _template() -> Template:
    return Template(data_path("launch_configs", "slurm", "job.sbatch").read_text())


def check_spec(spec: SbatchSpec) -> None:
    """Every value the job script carries stays one value: no line breaks or NUL anywhere (a new line of a job
    script is a command), and directive values only of DIRECTIVE_SAFE's characters."""
    values = [("--job-name", spec.job_name), ("--partition", spec.partition or ""), ("--time", spec.time),
              ("the working directory (--chdir)", spec.workdir), ("the python interpreter's path", spec.python),
              ("the script path", spec.script), *(("a script argument", a) for a in spec.script_args),
              *(("a flag passed on to fastlaunch", f) for f in spec.launcher_flags)]
    for what, value in values:
        if any(c in value for c in "\n\r\0"):
            raise UsageError(f"{what} holds a line break or NUL, which would end its line of the job script",
                             shown(value), "give it on one line, without control characters")
    for flag, value in values[:3]:
        if value and not DIRECTIVE_SAFE.fullmatch(value):
            raise UsageError(f"{flag} holds a space or a character an #SBATCH line cannot carry", shown(value),
                             "use letters, digits and . , : @ % + = / - _ only")
    if "\\" in spec.workdir:
        raise UsageError("the working directory (--chdir) holds a backslash, which sbatch reads as an escape",
                         shown(spec.workdir), "render the job from a directory whose path has no backslash")


def render_sbatch(spec: SbatchSpec) -> str:
    """A ready-to-submit job script: a pure function of the spec (checked against golden files). Every path
    and argument is shell-quoted (sbatch reads quotes on #SBATCH lines as the shell does)."""
    check_spec(spec)
    quote = shlex.join
    directives = [f"--job-name={spec.job_name}", f"--nodes={spec.nodes}", "--ntasks-per-node=1",
                  f"--cpus-per-task={spec.ranks_per_node * spec.cpus_per_rank}", f"--time={spec.time}",
                  f"--signal=USR1@{spec.grace}", "--requeue", f"--chdir={shlex.quote(spec.workdir)}",
                  "--output=slurm-%j.out"]
    if spec.use_gpus:
        directives.insert(3, f"--gpus-per-node={spec.ranks_per_node}")
    if spec.partition:
        directives.insert(1, f"--partition={spec.partition}")
    ranks = f"--gpus {spec.ranks_per_node}" if spec.use_gpus else f"--cpu {spec.ranks_per_node}"
    # Every start of the job (the first and each requeue) uses one run directory and resumes from its newest
    # checkpoint (autoresume.py); the shell expands the job id.
    script = ["--"] if spec.script.startswith("-") else []  # a script named like a flag stays the script
    command = " ".join([quote([spec.python, "-m", "fastlaunch", *ranks.split(), *spec.launcher_flags]),
                        f'--run-dir "{JOB_RUN_DIR}" --auto-resume', quote([*script, spec.script, *spec.script_args])])
    return _template().substitute(
        directives="\n".join(f"#SBATCH {d}" for d in directives),
        command=command,
        nodes=spec.nodes,
        ranks=spec.ranks_per_node,
    )


def submit(text: str, run: Runner = subprocess.run, extra: Sequence[str] = ()) -> str:
    """Submit a rendered script with sbatch; return the job id."""
    proc = run(["sbatch", "--parsable", *extra], input=text, capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip() or f"sbatch exited {proc.returncode}")
    return proc.stdout.strip().split(";")[0]
