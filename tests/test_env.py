"""DistEnv detection from environment dicts, and the launcher -> worker contract."""
from __future__ import annotations

from pathlib import Path

from fastlaunch.config import LaunchConfig
from fastlaunch.env import DistEnv


def test_single_process():
    d = DistEnv.from_environ({})
    assert (d.rank, d.world_size, d.source, d.is_distributed, d.under_fastlaunch) == (0, 1, "single", False, False)


def test_torchelastic():
    d = DistEnv.from_environ({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2",
                              "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500", "TORCHELASTIC_RUN_ID": "x",
                              "TORCHELASTIC_RESTART_COUNT": "2"})
    assert (d.rank, d.local_rank, d.world_size, d.local_world_size) == (3, 1, 4, 2)
    assert (d.master_addr, d.master_port, d.source, d.restart_count) == ("10.0.0.1", 29500, "torchelastic", 2)
    assert d.is_distributed and d.backend == "gloo"


def test_plain_env_launcher():
    assert DistEnv.from_environ({"RANK": "0", "WORLD_SIZE": "2"}).source == "env"


def test_round_trip_of_launcher_contract(tmp_path):
    cfg = LaunchConfig(script=Path("t.py"), script_args=(), nproc_per_node=2, device="cuda", run_dir=tmp_path,
                       seed=11, cpus_per_rank=3)
    env = {**cfg.to_env(base={}), "RANK": "1", "WORLD_SIZE": "2"}
    d = DistEnv.from_environ(env)
    assert (d.device_type, d.backend, d.seed, d.cpus_per_rank, d.run_dir) == ("cuda", "nccl", 11, 3, tmp_path)
    assert d.under_fastlaunch and env["PYTHONHASHSEED"] == "11"
