"""Same answers as one process: whole-set metrics, recorder sync, agreed stops, lr_find, precision,
rank-zero side effects, downloads once, per-rank augmentation, global batch. 2 real CPU ranks each."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import SCRIPTS, run_fastlaunch

SCRIPT = SCRIPTS / "semantics_probe.py"


def _run(tmp_path, mode, *launcher, env=None):
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    proc = run_fastlaunch([*(launcher or ("--cpu", "2")), SCRIPT], tmp_path,
                          env={"FL_PROBE_OUT": str(out), "FL_PROBE_MODE": mode, **(env or {})}, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = [json.loads((out / f"{mode}-rank{r}.json").read_text()) for r in range(2)]
    return proc, ranks, out


def _assert_recorders_identical(r0, r1):
    for key in ("values", "losses", "lrs", "iters", "metric_names"):
        assert r0[key] == r1[key], key


def test_whole_set_metrics_equal_one_process_validate_and_recorders_agree(tmp_path):
    _, (r0, r1), out = _run(tmp_path, "metrics")
    _assert_recorders_identical(r0, r1)
    assert r0["metric_names"] == ["epoch", "train_loss", "valid_loss", "accuracy", "correct", "_accum_error", "time"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(FL_PROBE_OUT=str(out), FL_PROBE_MODE="validate")
    single = subprocess.run([sys.executable, str(SCRIPT)], env=env, cwd=out, capture_output=True, text=True,
                            timeout=120)
    assert single.returncode == 0, single.stderr
    expected = json.loads((out / "validate-rank0.json").read_text())["validate"]  # 203 rows, one process
    got = r0["values"][-1][1:]  # valid_loss, accuracy, Correct (Metric subclass), AccumMetric
    assert got == pytest.approx(expected, abs=1e-4)
    assert r0["n_preds"] == 203  # get_preds on rank 0 alone: the whole validation set, no hang


def test_no_collective_per_batch_from_fastlaunch_or_fastai(tmp_path):
    _, (r0, r1), _ = _run(tmp_path, "count")
    for r in (r0, r1):
        assert r["calls"]["train_batch"] == 0
        assert r["calls"]["valid_batch"] == 0
        # per epoch: the recorder's and the stops' all_reduce, the metrics' gather (two all_gathers: sizes, then
        # bytes), the instrumentation's barrier and its gather (two all_gathers); two epochs
        assert r["calls"]["outside"] == 7 * 2
    _assert_recorders_identical(r0, r1)


@pytest.mark.parametrize("mode", ["cancel", "nan"])
def test_a_stop_on_rank_one_alone_stops_both_ranks_at_the_same_batch(tmp_path, mode):
    _, (r0, r1), _ = _run(tmp_path, mode)
    assert r0["steps"] == r1["steps"] == 5  # the 5th batch's step is the last on both ranks
    assert len(r0["losses"]) == len(r1["losses"]) == 5
    assert r0["weights"] == r1["weights"]
    _assert_recorders_identical(r0, r1)


def test_lr_find_agrees_restores_weights_and_fine_tune_runs(tmp_path):
    _, (r0, r1), _ = _run(tmp_path, "lr_find")
    assert r0["lr"] == r1["lr"] > 0
    assert r0["restored"] and r1["restored"]
    assert r0["n_losses"] == r1["n_losses"] > 5
    assert r0["weights"] == r1["weights"]  # after fine_tune's frozen and unfrozen phases
    assert len(r0["values"]) == 1  # fine_tune(1): the unfrozen epoch's record


@pytest.mark.parametrize("mode, dtype", [("fp16", "torch.float16"), ("bf16", "torch.bfloat16")])
def test_script_precision_autocasts_on_cpu_and_converges(tmp_path, mode, dtype):
    _, (r0, r1), _ = _run(tmp_path, mode)
    for r in (r0, r1):
        assert r["autocast"] == [dtype]
        assert r["n_mixed_precision"] == 1
    assert r0["values"][-1][2] > 0.8  # accuracy on a problem a linear guess gets half right
    assert r0["losses"][-1] < r0["losses"][0]
    assert r0["weights"] == r1["weights"]


def test_launcher_precision_applies_and_script_choice_wins(tmp_path):
    _, (r0, _), _ = _run(tmp_path, "launcher", "--cpu", "2", "--precision", "bf16")
    assert r0["autocast"] == ["torch.bfloat16"] and r0["n_mixed_precision"] == 1
    second = tmp_path / "second"
    second.mkdir()
    proc, (f0, _), _ = _run(second, "fp16", "--cpu", "2", "--precision", "bf16")
    assert f0["autocast"] == ["torch.float16"] and f0["n_mixed_precision"] == 1
    assert proc.stdout.count("the script sets fp16 itself and --precision bf16 was given") == 1


def test_csv_history_and_best_model_written_once_by_rank_zero(tmp_path):
    _, (r0, r1), out = _run(tmp_path, "side")
    lines = (out / "history.csv").read_text().strip().splitlines()
    assert lines[0].startswith("epoch,train_loss,valid_loss,accuracy")
    assert [line.split(",")[0] for line in lines[1:]] == ["0", "1"]  # rank 0's full history
    assert float(lines[-1].split(",")[2]) == pytest.approx(r0["values"][-1][1], abs=1e-6)
    assert sorted(p.name for p in (out / "models").iterdir()) == ["best.pth"]
    assert r0["weights"] == r1["weights"]  # the best model, reloaded, is the same on both ranks


def test_untar_data_and_tokenizer_cache_made_once_for_two_ranks(tmp_path):
    src = tmp_path / "src" / "mydata"
    src.mkdir(parents=True)
    (src / "a.txt").write_text("a")
    (src / "b.txt").write_text("b")
    archive = tmp_path / "mydata.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src, arcname="mydata")
    _, (r0, r1), out = _run(tmp_path, "untar", env={"FL_ARCHIVE": str(archive)})
    assert (out / "extractions.log").read_text().splitlines() == ["rank 0"]
    assert r0["files"] == r1["files"] == ["a.txt", "b.txt"]
    assert (out / "tokenizations.log").read_text().splitlines() == ["rank 0"]  # the <path>_tok cache, once
    assert r0["tokenized"] == r1["tokenized"] == ["a.txt", "b.txt"]


def test_augmentation_differs_per_rank_and_global_batch_is_said(tmp_path):
    proc, (r0, r1), _ = _run(tmp_path, "metrics")
    assert r0["first_draw"] != r1["first_draw"]
    assert proc.stdout.count("fastlaunch: global batch 128 = 64 x 2 ranks") == 1


def test_keep_global_batch_divides_the_per_rank_batch(tmp_path):
    proc, (r0, r1), _ = _run(tmp_path, "count", "--cpu", "2", "--keep-global-batch")
    assert "fastlaunch: global batch 64 = 32 x 2 ranks (--keep-global-batch)" in proc.stdout
    assert len(r0["losses"]) == 2 * 16  # 1024 items / (32 x 2) per epoch, two epochs
    _assert_recorders_identical(r0, r1)


def test_gradient_accumulation_keeps_one_process_meaning_and_reduces_once_per_step(tmp_path, scripts):
    """n_acc=32 over a global batch of 16 (8 per rank): one optimizer step every 2 micro-steps, as in one
    process; the micro-steps that do not step skip the all-reduce, but for the fit's first, where DDP
    learns its static graph (16 micro-steps, 8 steps: 9 all-reduces, not 16)."""
    out = tmp_path / "out"
    out.mkdir()
    proc = run_fastlaunch(["--cpu", "2", "--seed", "1", "--keep-global-batch", scripts / "accumulate_probe.py"],
                          tmp_path, env={"FL_PROBE_OUT": str(out)}, timeout=240)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0["allreduces"] == r1["allreduces"] == 9
    single_out = tmp_path / "single"
    single_out.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    single = subprocess.run([sys.executable, str(scripts / "accumulate_probe.py")],
                            env={**env, "FL_PROBE_OUT": str(single_out)},
                            capture_output=True, text=True, timeout=120)
    assert single.returncode == 0, single.stderr
    one = json.loads((single_out / "rank0.json").read_text())
    for got in (r0, r1):
        for a, b in zip(got["weights"], one["weights"]):
            assert a == pytest.approx(b, abs=1e-5)
    assert r0["losses"] == pytest.approx(one["losses"], abs=1e-5)
