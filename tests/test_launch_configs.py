"""YAML launch configs and accelerate configs."""
from __future__ import annotations

import os

import pytest

from conftest import REPO
from fastlaunch.launcher.cli import main
from fastlaunch.device import GpuProbe
from fastlaunch.errors import UsageError
from fastlaunch.launcher.options import SLURM_KEYS, load_accelerate_config, load_launch_file, merged_options
from fastlaunch.launcher.resolve import build_config

CONFIGS = sorted((REPO / "launch_configs").glob("*.yaml"))


def test_there_are_examples_for_one_node_two_nodes_and_slurm():
    names = {p.name for p in CONFIGS}
    assert {"local_4gpu.yaml", "two_nodes.yaml", "slurm_2nodes.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_launch_config_loads(path):
    data = load_launch_file(str(path), extra_keys=SLURM_KEYS if path.name.startswith("slurm") else ())
    assert data


def test_cli_flags_override_the_file(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cpu: 3\nprecision: bf16\nseed: 5\n")
    opts, given = merged_options(["--config", str(cfg), "--cpu", "2"])
    assert (opts["cpu"], opts["precision"], opts["seed"]) == (2, "bf16", 5)
    assert {"cpu", "precision", "seed"} <= given


def test_two_node_example_resolves(tmp_path):
    script = tmp_path / "train.py"
    script.write_text("")
    opts, given = merged_options(["--config", str(REPO / "launch_configs" / "two_nodes.yaml"), "--node-rank", "1"])
    cfg = build_config(opts, given, str(script), [], probe=lambda: GpuProbe(8),
                       cores=16, environ={}, bf16_probe=lambda: True)
    assert (cfg.max_nodes, cfg.node_rank, cfg.rdzv_endpoint, cfg.nproc_per_node) == (2, 1, "10.0.0.1:29400", 8)


def test_unknown_key_lists_the_valid_ones(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cpus: 2\n")
    with pytest.raises(UsageError) as err:
        load_launch_file(str(cfg))
    assert "unknown key" in str(err.value) and "(got cpus)" in str(err.value) and "valid keys: gpus, cpu" in str(err.value)
    cfg.write_text("nodes: 2\n")
    with pytest.raises(UsageError, match="a `fastlaunch slurm` key"):
        load_launch_file(str(cfg))


@pytest.mark.parametrize("text, what", [("cpu: 0\n", "--cpu must be at least 1 (got 0)"),
                                        ("precision: fp8\n", "unknown --precision (got fp8)"),
                                        ("cpuz: 2\n", "unknown key in launch config"),
                                        ("- a\n- b\n", "must hold key: value pairs"),
                                        ("cpu: [\n", "is not valid YAML")])
def test_bad_config_is_a_hint_error_with_exit_2(tmp_path, capsys, text, what):
    cfg, script = tmp_path / "c.yaml", tmp_path / "train.py"
    cfg.write_text(text)
    script.write_text("")
    assert main(["--config", str(cfg), str(script)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and what in err[0] and "HINT:" in err[0]


def test_accelerate_config_counts_ranks_per_machine(tmp_path):
    acc = tmp_path / "acc.yaml"
    acc.write_text("distributed_type: MULTI_GPU\nnum_processes: 8\nnum_machines: 2\nmachine_rank: 1\n"
                   "main_process_ip: 10.0.0.5\nmain_process_port: 29511\nmixed_precision: fp16\n")
    opts = load_accelerate_config(str(acc))
    assert opts == {"gpus": 4, "nnodes": "2", "node_rank": 1, "rdzv_endpoint": "10.0.0.5:29511",
                    "precision": "fp16"}
    acc.write_text("num_processes: 2\nuse_cpu: true\nmixed_precision: 'no'\n")
    assert load_accelerate_config(str(acc)) == {"cpu": 2, "precision": "no"}
    acc.write_text("num_processes: 2\nmixed_precision: fp8\n")
    with pytest.raises(UsageError, match="fp8.*HINT"):
        load_accelerate_config(str(acc))


@pytest.mark.parametrize("argv, what", [
    (["--nnodes", "2"], "--nnodes above 1 needs the first node's address"),
    (["--nnodes", "two"], "--nnodes takes N or MIN:MAX"),
    (["--nnodes", "3:2", "--rdzv-endpoint", "h:1"], "--nnodes range is empty"),
    (["--nnodes", "1:4", "--node-rank", "0", "--rdzv-endpoint", "h:29400"], "--node-rank needs a fixed --nnodes"),
    (["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "h:29400"], "--node-rank must be below --nnodes"),
    (["--nnodes", "2", "--rdzv-endpoint", "nohost"], "--rdzv-endpoint takes host:port"),
])
def test_bad_multi_node_flags(tmp_path, capsys, monkeypatch, argv, what):
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    script = tmp_path / "train.py"
    script.write_text("")
    assert main([*argv, "--cpu", "1", str(script)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and what in err[0] and "HINT:" in err[0]
