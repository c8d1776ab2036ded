"""What users do inside a fit gives one process's answers on 2 (and for lr_find 4) ranks: lr_find's sweep and
suggestions, a callback switching itself off during lr_find, get_preds and validate from a callback, a loss
changed in after_loss, a tuple-output model with ReduceLROnPlateau, a batch skipped on one rank, and a step
skipped by one rank alone (the job ends naming the rank, the callback and the line), and a SentencePiece
tokenizer trained while setting up (one writer per node, every rank reading its model).

Each case is its smallest script (tests/scripts/in_fit_probe.py), run under fastlaunch and as one plain
process; where a figure is one process's on the same weights, the case computes it by hand (`reference`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_fastlaunch

PROBE = Path(__file__).resolve().parent / "scripts" / "in_fit_probe.py"
CASES = "subword,schedules,lr_find,run_flag,preds_in_fit,changed_loss,tuple_output,skip_batch"


class Runs:
    def __init__(self, root: Path):
        self.root = root
        self.procs: dict[str, subprocess.CompletedProcess] = {}

    def _dir(self, name: str) -> Path:
        out = self.root / name
        out.mkdir(exist_ok=True)
        return out

    def single(self) -> Path:
        out = self._dir("one")
        if "one" not in self.procs:
            env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            self.procs["one"] = subprocess.run([sys.executable, str(PROBE), CASES], cwd=out, capture_output=True,
                                               text=True, timeout=600, env={**env, "FL_OUT": str(out), "MPLBACKEND": "Agg"})
        return out

    def one(self, case: str) -> dict:
        out = self.single()
        assert self.procs["one"].returncode == 0, self.procs["one"].stderr[-3000:]
        return json.loads((out / f"{case}-rank0.json").read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return Runs(tmp_path_factory.mktemp("in_fit"))


@pytest.fixture(scope="module")
def two_ranks(runs):
    out = runs._dir("two")
    proc = run_fastlaunch(["--cpu", "2", "--seed", "3", PROBE, CASES], out,
                          env={"FL_OUT": str(out), "MPLBACKEND": "Agg"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def read(case: str) -> list[dict]:
        ranks = [json.loads((out / f"{case}-rank{r}.json").read_text()) for r in range(2)]
        assert ranks[0]["world"] == 2
        return ranks
    return read


@pytest.fixture(scope="module")
def four_ranks_lr_find(runs):
    out = runs._dir("four")
    proc = run_fastlaunch(["--cpu", "4", "--seed", "3", PROBE, "lr_find"], out,
                          env={"FL_OUT": str(out), "MPLBACKEND": "Agg"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"lr_find-rank{r}.json").read_text()) for r in range(4)]


def _within(a: float, b: float, factor: float) -> bool:
    return b / factor <= a <= b * factor


@pytest.mark.parametrize("world", [2, 4])
def test_lr_find_sweeps_one_process_range_and_its_suggestions_fall_in_its_spread(runs, two_ranks, four_ranks_lr_find, world):
    ranks = two_ranks("lr_find") if world == 2 else four_ranks_lr_find
    one = runs.one("lr_find")
    for r in ranks[1:]:
        assert {k: r[k] for k in ("steps", "valley", "minimum")} == {k: ranks[0][k] for k in ("steps", "valley", "minimum")}
    got = ranks[0]
    # the sweep reaches one process's end of range (it stopped at a fraction of it: 56 of ~94 steps)
    assert got["steps"] >= one["steps"] - 5 and _within(got["last_lr"], one["last_lr"], 3), (got, one)
    for suggestion in ("valley", "minimum"):  # within one process's spread over 5 data orders, widened 2x
        spread = one[f"{suggestion}s"]
        assert min(spread) / 2 <= got[suggestion] <= max(spread) * 2, (suggestion, got[suggestion], spread)


def test_a_callback_that_switches_itself_off_during_lr_find_runs_in_the_next_fit(runs, two_ranks):
    assert runs.one("run_flag")["epochs_seen"] == 2
    assert [r["epochs_seen"] for r in two_ranks("run_flag")] == [2, 2]


def test_get_preds_and_validate_from_a_callback_give_the_whole_set_on_every_rank(runs, two_ranks):
    one = runs.one("preds_in_fit")
    r0, r1 = two_ranks("preds_in_fit")
    assert r0 == {**r1, "world": 2}
    for row in r0["seen"]:  # each epoch: the whole validation set, one process's answer on these weights
        assert row["n"] == 100 and row["same_as_first"]
        assert row["targets"] == one["seen"][0]["targets"] and row["inputs"] == one["seen"][0]["inputs"]
        assert abs(row["losses_mean"] - row["reference_loss"]) < 1e-4, row
    assert abs(r0["seen"][0]["validate"][0] - r0["seen"][0]["reference_loss"]) < 1e-4
    # after the fit, a plain validate() is one process's, and the loaders are one process's again
    assert abs(r0["after_fit_validate"][0] - r0["reference_after"]) < 1e-4
    assert r0["valid_loader"] == one["valid_loader"]
    assert len(r0["recorded"]) == len(one["recorded"])  # the recorder as fastai's validate() left it


def test_a_loss_changed_in_after_loss_is_reported_as_one_process_reports_it(runs, two_ranks):
    one = runs.one("changed_loss")
    assert abs(one["valid_loss"] - one["reference"]) < 1e-4  # the reference is fastai's own figure
    for r in two_ranks("changed_loss"):
        assert abs(r["valid_loss"] - r["reference"]) < 1e-4, r


def test_a_tuple_output_model_with_reduce_lr_on_plateau_records_alike_on_every_rank(runs, two_ranks):
    one = runs.one("tuple_output")
    assert [abs(a - b) < 1e-4 for a, b in zip(one["values"][-1][1:], one["reference"])] == [True, True]
    r0, r1 = two_ranks("tuple_output")
    assert r0["values"] == r1["values"] and r0["lr"] == r1["lr"]
    assert all(abs(a - b) < 1e-4 for a, b in zip(r0["values"][-1][1:], r0["reference"])), r0


def test_a_batch_cancelled_on_one_rank_is_skipped_by_every_rank(runs, two_ranks):
    one = runs.one("skip_batch")
    assert one["finite"] and one["skipped"] > 0
    r0, r1 = two_ranks("skip_batch")
    assert r0["finite"] and r1["finite"]
    assert r0["skipped"] == r1["skipped"] > 0  # the bad record is in one rank's shard; both skip that step
    assert r0["weights"] == r1["weights"]
    assert [row[1] for row in r0["values"]] == [row[1] for row in r1["values"]]


def test_a_step_skipped_by_one_rank_alone_ends_the_job_naming_rank_callback_and_line(tmp_path):
    proc = run_fastlaunch(["--cpu", "2", PROBE, "skip_step_alone"], tmp_path, env={"FL_OUT": str(tmp_path)},
                          timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if "failed" in x)
    assert line.startswith("fastlaunch: rank 1 failed (exit code 2)"), proc.stderr[-3000:]
    assert "CancelStepException raised by SkipStepOnRankOne.before_step" in line
    assert "in_fit_probe.py:" in line and "HINT:" in line
    assert "traceback" not in proc.stderr and "gloo" not in proc.stderr.split("consequence")[0].lower()
    assert not (tmp_path / "skip_step_alone-rank0.json").exists()


def test_a_tokenizer_trained_while_setting_up_is_trained_once_per_node_and_read_by_every_rank(runs, two_ranks):
    one = runs.one("subword")
    r0, r1 = two_ranks("subword")
    assert (r0["trained"], r1["trained"]) == (1, 0)  # local rank 0 trains; rank 1 loads the model it wrote
    assert r0["pieces"] == r1["pieces"] == one["pieces"]


def test_schedules_sized_from_the_loaders_give_one_process_rates_at_the_same_fraction_of_training(runs, two_ranks):
    one = runs.one("schedules")
    r0, r1 = two_ranks("schedules")
    assert r0["lrs"] == r1["lrs"]
    step = len(one["lrs"]) // len(r0["lrs"])  # one process takes 2 steps for each step of 2 ranks
    assert step == 2 and len(r0["lrs"]) * step == len(one["lrs"]) == 2 * one["per_epoch"]
    assert all(abs(a - b) <= 1e-9 + 1e-6 * b for a, b in zip(r0["lrs"], one["lrs"][::step])), (r0["lrs"], one["lrs"])
    # ShortEpochCallback: the same fraction of an epoch; its cancel, raised after a batch, is agreed with the
    # next batch's gradients, so the requesting batch is recorded too (one step of 2 ranks: 2 of one process)
    assert r0["short_steps"] * step - one["short_steps"] == step
