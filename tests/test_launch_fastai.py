"""An unmodified fastai script under `fastlaunch --cpu 2`: two real ranks through the real engine."""
from __future__ import annotations

import pytest

from conftest import only_run_dir, read_ranks, run_fastlaunch

TRICKY_ARGS = ["--lr", "1e-3", "-x", "--help", "--", "a b", "", "--gpus", "8", "ünï"]


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory, ):
    from conftest import SCRIPTS

    cwd = tmp_path_factory.mktemp("probe")
    out = cwd / "out"
    out.mkdir()
    proc = run_fastlaunch(["--cpu", "2", SCRIPTS / "fastai_probe.py", *TRICKY_ARGS], cwd, env={"FL_PROBE_OUT": str(out)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, read_ranks(out, 2), only_run_dir(cwd)


def test_ranks_train_on_disjoint_halves_each_epoch(probe_run):
    _, (r0, r1), _ = probe_run
    train = set(r0["train_split"])
    for epoch in range(2):
        a, b = set(r0["seen"][epoch]), set(r1["seen"][epoch])
        assert len(a) == len(r0["seen"][epoch]) == len(train) // 2
        assert not a & b
        assert a | b == train


def test_unseeded_random_splitter_agrees_across_ranks(probe_run):
    _, (r0, r1), _ = probe_run
    assert r0["valid_split"] == r1["valid_split"]
    assert r0["train_split"] == r1["train_split"]
    assert not set(r0["valid_split"]) & set(r1["seen"][0])


def test_len_of_dl_equals_batches_yielded_and_one_cycle_completes(probe_run):
    _, (r0, r1), _ = probe_run
    for r in (r0, r1):
        assert r["lens"] == r["batches"] == [8, 8]
        assert r["n_lrs"] == 16


def test_model_is_ddp_during_fit_and_plain_after(probe_run):
    _, (r0, r1), _ = probe_run
    for r in (r0, r1):
        assert r["model_types"] == ["FastlaunchDDP"]
        assert r["model_after_fit"] == "Net"


def test_parameters_identical_after_fit(probe_run):
    _, (r0, r1), _ = probe_run
    assert r0["weights"] == r1["weights"]


def test_script_arguments_arrive_byte_for_byte(probe_run):
    _, (r0, r1), _ = probe_run
    assert r0["argv"] == r1["argv"] == TRICKY_ARGS


def test_epoch_table_once_on_console_and_logs_per_rank(probe_run):
    proc, _, run_dir = probe_run
    assert proc.stdout.count("train_loss") == 1, proc.stdout
    assert "[default" not in proc.stdout  # no engine prefixes
    logs = run_dir / "logs"
    assert (logs / "rank0.log").is_file() and (logs / "rank1.log").is_file()
    assert "train_loss" in (logs / "rank0.log").read_text()
    assert "train_loss" not in (logs / "rank1.log").read_text()  # rank 1 prints no table or bar
    assert (run_dir / "launch.yaml").is_file()
    assert "nproc_per_node: 2" in (run_dir / "launch.yaml").read_text()
