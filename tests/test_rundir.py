"""Run directories: unique per run, never overwritten, unwritable is a HINT error."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from fastlaunch.config import LaunchConfig
from fastlaunch.errors import UsageError
from fastlaunch.launcher.rundir import prepare_run_dir


def _cfg(run_dir=None):
    return LaunchConfig(script=Path("/x/train.py"), script_args=("--a",), nproc_per_node=2, device="cpu",
                        run_dir=run_dir, seed=1)


def test_two_runs_in_one_second_get_distinct_directories(tmp_path):
    a = prepare_run_dir(_cfg(), root=tmp_path, now=0)
    b = prepare_run_dir(_cfg(), root=tmp_path, now=0)
    assert a.run_dir != b.run_dir
    assert b.run_dir.name == a.run_dir.name + "-2"
    assert a.run_dir.name.endswith("-train")
    saved = yaml.safe_load((a.run_dir / "launch.yaml").read_text())
    assert saved["nproc_per_node"] == 2 and saved["script_args"] == ["--a"] and saved["run_dir"] == str(a.run_dir)
    assert (a.run_dir / "logs").is_dir()


def test_explicit_run_dir_holding_a_run_is_refused(tmp_path):
    prepare_run_dir(_cfg(tmp_path / "mine"))
    with pytest.raises(UsageError, match="already holds another run"):
        prepare_run_dir(_cfg(tmp_path / "mine"))


def test_run_dir_under_a_file_is_a_hint_error(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(UsageError) as err:
        prepare_run_dir(_cfg(tmp_path / "afile" / "run"))
    assert "cannot write the run directory" in str(err.value) and "HINT: pass --run-dir" in str(err.value)


def test_auto_resume_numbers_the_starts_of_one_directory_and_stops_after_max_requeues(tmp_path):
    import dataclasses

    job = tmp_path / "job"
    cfg = dataclasses.replace(_cfg(job), auto_resume=True, max_requeues=2)
    starts = []
    for _ in range(3):
        done = prepare_run_dir(cfg)
        (done.run_dir / "logs" / "rank0.log").write_text(f"start {done.start}\n")
        starts.append(done.start)
    assert starts == [0, 1, 2] and (job / "logs" / "start1" / "rank0.log").read_text() == "start 1\n"
    with pytest.raises(UsageError, match=r"started 3 times already .*--max-requeues 2.*HINT"):
        prepare_run_dir(cfg)
    with pytest.raises(UsageError, match="already holds another run"):  # without --auto-resume: never reused
        prepare_run_dir(_cfg(job))
    two = dataclasses.replace(cfg, run_dir=tmp_path / "multi", min_nodes=2, max_nodes=2, node_rank=1)
    assert prepare_run_dir(two).run_dir == tmp_path / "multi" / "node1"  # each machine its own, under the job's


# -- another local user: a real other uid (nobody) plants things where a run directory goes ----------------
_NOBODY = "nobody"


def _as_nobody(code: str) -> None:
    """Run Python code as the user nobody (this test process must be root)."""
    import subprocess

    subprocess.run(["setpriv", "--reuid", _NOBODY, "--regid", "nogroup", "--clear-groups", "/usr/bin/python3", "-c",
                    code], check=True, timeout=60)


@pytest.fixture
def shared_place():
    """A world-writable folder both users reach (like /tmp or a shared scratch), removed afterwards."""
    import os
    import shutil
    import tempfile

    if os.geteuid() != 0 or not Path("/usr/bin/python3").exists() or not shutil.which("setpriv"):
        pytest.skip("acting as another user needs root, setpriv and /usr/bin/python3")
    place = Path(tempfile.mkdtemp(prefix="fl-shared-"))
    place.chmod(0o1777)
    yield place
    shutil.rmtree(place, ignore_errors=True)


def test_a_run_dir_another_user_prepared_is_refused_and_their_links_are_never_followed(shared_place, tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    planted = shared_place / "job"
    # another user makes the job's directory (world-writable) and plants a log link and a checkpoint
    _as_nobody(f"import os; os.makedirs('{planted}/logs'); os.makedirs('{planted}/checkpoints');"
               f"os.chmod('{planted}', 0o777); os.chmod('{planted}/logs', 0o777);"
               f"os.symlink('{victim}', '{planted}/logs/rank1.log');"
               f"open('{planted}/checkpoints/epoch1.pt', 'w').write('their weights')")
    for auto_resume in (False, True):
        with pytest.raises(UsageError) as err:
            prepare_run_dir(dataclasses.replace(_cfg(planted), auto_resume=auto_resume))
        assert "another user" in str(err.value) and "HINT" in str(err.value), str(err.value)
    assert victim.read_text() == "precious"
    # the same folder made ours but left world-writable, or ours with a link in it: refused too
    import shutil

    mine = tmp_path / "mine"
    shutil.copytree(planted, mine, symlinks=True)
    mine.chmod(0o777)
    with pytest.raises(UsageError, match="can be written by other users"):
        prepare_run_dir(_cfg(mine))
    mine.chmod(0o755)
    (mine / "logs").chmod(0o755)
    with pytest.raises(UsageError, match="symbolic link") as err:
        prepare_run_dir(_cfg(mine))
    assert "rank1.log" in str(err.value)
    (mine / "logs" / "rank1.log").unlink()
    (mine / "launch.yaml").symlink_to(victim)
    with pytest.raises(UsageError, match="symbolic link"):
        prepare_run_dir(_cfg(mine))
    (mine / "launch.yaml").unlink()
    (mine / "checkpoints").chmod(0o777)
    with pytest.raises(UsageError, match="can be written by other users"):
        prepare_run_dir(_cfg(mine))
    (mine / "checkpoints").chmod(0o755)
    assert prepare_run_dir(_cfg(mine)).run_dir == mine  # clean and private: used
    assert victim.read_text() == "precious"
