"""Run directories: unique per run, never overwritten, unwritable is a HINT error."""
from __future__ import annotations

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
