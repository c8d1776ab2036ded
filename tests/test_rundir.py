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
