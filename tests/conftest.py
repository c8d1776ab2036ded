"""Shared helpers: run fastlaunch as a user would, in a subprocess, and read what the ranks wrote."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"


def run_fastlaunch(args, cwd, env=None, timeout=180) -> subprocess.CompletedProcess:
    """`python -m fastlaunch ARGS` in cwd; stdout is the console (rank 0), stderr the launcher's lines."""
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_", "TORCHELASTIC", "FASTLAUNCH_"))}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "fastlaunch", *map(str, args)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_ranks(out_dir: Path, world: int) -> list[dict]:
    """rank<R>.json written by each rank of a test script."""
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(world)]


def only_run_dir(cwd: Path) -> Path:
    """The single run directory a launch created under cwd/runs."""
    runs = sorted((cwd / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture
def script(tmp_path) -> Path:
    """A one-line train.py for the launcher's own tests."""
    path = tmp_path / "train.py"
    path.write_text("print('hello')\n")
    return path


@pytest.fixture
def scripts() -> Path:
    return SCRIPTS


SHARED_SLURM = REPO.parent / "shared" / "slurm"


@pytest.fixture(scope="session")
def slurm_cluster():
    """A real local Slurm with two nodes (n1, n2), started for the session and stopped after it."""
    import shutil

    start = SHARED_SLURM / "start-local-slurm.sh"
    if not start.is_file():
        pytest.skip(f"needs the local Slurm scripts at {SHARED_SLURM} (CI provides them)")
    if os.geteuid() != 0:
        pytest.skip("starting the local Slurm cluster needs root")
    proc = subprocess.run(["bash", str(start), "--nodes", "2"], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not shutil.which("sbatch"):
        pytest.skip(f"the local Slurm cluster did not start: {proc.stderr.strip()[-500:]}")
    yield
    subprocess.run(["bash", str(SHARED_SLURM / "stop-local-slurm.sh")], capture_output=True, timeout=120)


class Payload:
    """What an attacker pickles: unpickling it would create the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """The resume probe's 4 epochs on 2 CPU ranks with --seed 11, never stopped: what every resumed run
    (test_resume.py, test_slurm.py) must end with. Rank 0's record."""
    cwd = tmp_path_factory.mktemp("whole")
    (cwd / "out").mkdir()
    proc = run_fastlaunch(["--cpu", "2", "--seed", "11", SCRIPTS / "resume_probe.py"], cwd,
                          env={"FL_PROBE_OUT": str(cwd / "out"), "FL_MODE": "plain"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads((cwd / "out" / "rank0.json").read_text())
