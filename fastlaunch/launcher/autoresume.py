"""--auto-resume: every start of the same job uses one directory (--run-dir, e.g. runs/slurm-<job id>), and a
start that finds a good checkpoint there resumes from the newest one, mid-epoch, as --resume would; a first
start trains from scratch. Each start is numbered in its launch.yaml ("start"); --max-requeues bounds how
many starts follow the first, so a job that stops at the same point again and again ends.

On several machines each node keeps its own directory under the job's (node<N>/; under a rendezvous that
orders the machines itself, the host's name, fresh at every start, so starts are counted only with
--node-rank, which Slurm jobs have); rank 0's node writes the checkpoints, and every node finds the same newest one
because it looks in all of them (the job's directory is on a filesystem every node sees, as Slurm's submit
directory is).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import yaml

from ..errors import UsageError, shown

__all__ = ["resume_source", "newest_checkpoint", "node_dir", "previous_start", "check_requeues", "archive_logs",
           "FINISHED"]

FINISHED = "finished"  # written into a node's run directory when an --auto-resume run ends with status 0


def resume_source(opts: dict, say: Callable[[str], None]) -> Path | None:
    """With --auto-resume: the run directory holding the job's newest good checkpoint, or None for a first
    start (or a start that finds none); a UsageError for a job that cannot auto-resume."""
    if opts["resume"] is not None:
        raise UsageError("--auto-resume and --resume both ask to resume", f"--resume {opts['resume']}",
                         "keep --auto-resume (it finds the newest checkpoint itself), or pass --resume alone")
    if opts["run_dir"] is None:
        raise UsageError("--auto-resume needs the job's --run-dir", "--auto-resume",
                         "give every start of the job the same --run-dir, e.g. runs/slurm-$SLURM_JOB_ID "
                         "(fastlaunch slurm writes it)")
    job = Path(str(opts["run_dir"])).resolve()
    done = sorted(job.glob(FINISHED)) + sorted(job.glob(f"*/{FINISHED}"))
    if done:
        raise UsageError("this job has finished already", f"{done[0]}",
                         "start a new run with another --run-dir (or remove the run directory)")
    found = newest_checkpoint(job, say)
    if found is None:
        return None
    say(f"fastlaunch: --auto-resume: resuming the job from {found}")
    return found.parent.parent  # <run dir>/checkpoints/<file>


def newest_checkpoint(job_dir: Path, say: Callable[[str], None] | None = None) -> Path | None:
    """The good checkpoint furthest into the job, in its directory or any node's under it."""
    from ..checkpoint import latest, manifest_of

    job_dir = Path(job_dir)
    if not job_dir.is_dir():
        return None
    best: tuple | None = None
    for folder in [job_dir, *sorted(p for p in job_dir.iterdir() if p.is_dir())]:
        if not (folder / "checkpoints").is_dir():
            continue
        found = latest(folder, say=say)
        if found is not None:
            manifest = manifest_of(found)
            key = (manifest["fit_index"], manifest["epoch"], manifest["iter"], manifest["time"])
            if best is None or key > best[0]:
                best = (key, found)
    return best[1] if best else None


def node_dir(job_dir: Path, multi_node: bool, node_rank: int | None) -> Path:
    """This node's run directory under the job's: the job's own on one machine, node<N>/ on several (a
    rendezvous that orders the machines itself gets a fresh directory per machine and start: rundir.py)."""
    return job_dir / f"node{node_rank}" if multi_node else job_dir


def previous_start(folder: Path) -> int | None:
    """The number of the last start that used this directory (0 for the first), or None if none did; a
    UsageError when its launch.yaml cannot say (every requeue of the job would fail alike)."""
    path = folder / "launch.yaml"
    try:
        saved = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError:
        return None
    except UnicodeDecodeError as err:
        raise _broken(path, f"not UTF-8 text (byte {err.start})") from None
    except (yaml.YAMLError, ValueError, RecursionError):
        raise _broken(path, "not valid YAML") from None
    if not isinstance(saved, dict):
        raise _broken(path, f"not key: value pairs ({type(saved).__name__})")
    start = saved.get("start", 0)
    if isinstance(start, bool) or not isinstance(start, int) or start < 0:
        raise _broken(path, f"start: {shown(start)}, not a whole number of at least 0")
    return start


def _broken(path: Path, why: str) -> UsageError:
    return UsageError("the run directory's launch.yaml cannot say which start of the job this is", f"{path}: {why}",
                      f"fix its start: line, or remove {path} to count this start as the first (or start the job "
                      "afresh with another --run-dir)")


def check_requeues(folder: Path, start: int, max_requeues: int) -> None:
    if start > max_requeues:
        raise UsageError(f"this job has started {start} times already in {folder}", f"--max-requeues {max_requeues}",
                         f"see why it stops in {folder}/logs/start{start - 1}/; raise --max-requeues, or start it "
                         "afresh with another --run-dir")


def archive_logs(folder: Path, start: int) -> None:
    """Keep the previous start's logs in logs/start<N>/ (the new start writes logs/rank<R>.log afresh)."""
    logs = folder / "logs"
    if not logs.is_dir():
        return
    keep = logs / f"start{start}"
    keep.mkdir(exist_ok=True)
    for item in list(logs.iterdir()):
        if item.name.startswith("start") and item.is_dir():
            continue
        shutil.move(str(item), str(keep / item.name))
