"""Conformance: fastai's callbacks, Learner APIs, applications and script shapes give one process's answers
on 2 ranks. Each group of cases (tests/conformance/) runs once under `fastlaunch --cpu 2 --seed S` and once
as a plain one-process check of the final weights; every case is then checked for:
  - whole-set validation loss and metrics equal (1e-4) to one process's `learn.validate()` of its weights;
  - the recorder (values, losses, lrs) identical on both ranks, and what must agree (splits, files, TTA,
    predictions) the same on both ranks and, for predictions, the same as one process;
  - its once-only line printed once on the console; no process of the job left running.
The README's conformance table is rendered from these outcomes (FL_WRITE_README=1 rewrites it)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import REPO, run_fastlaunch

CONF = Path(__file__).resolve().parent / "conformance"
SCRIPT = CONF / "cases.py"
sys.path.insert(0, str(CONF))
from table import render, replace_in_readme  # noqa: E402

GROUPS = {
    "callbacks": ["progress_and_logs", "trackers", "hooks_and_short", "schedules_and_lr_find", "save_load_export",
                  "interpretation", "tensorboard", "gradient_accumulation"],
    "vision": ["vision_mixup", "vision_cutmix_channels_last", "vision_fp16", "vision_bf16", "unet_segmentation"],
    "text": ["text_language_model", "text_awd_lstm", "text_awd_lstm_fp16", "text_transformer", "collab_dot",
             "collab_neural"],
    "shapes": ["tuple_model", "unused_parameters", "three_learners_resplit", "fit_in_function_twice",
               "distrib_ctx_in_script", "main_guard_workers"],
    "upstream": ["wandb_offline"],  # fastai's own defects: they must fail under 2 ranks as in one process, at once
}
GROUP_OF = {name: group for group, names in GROUPS.items() for name in names}
SCRIPT_CASES = {  # whole scripts in tests/conformance/scripts: the launcher's expected exit status, what they show
    "plain_torch_loop": (0, "a plain PyTorch loop without fastai"),
    "sys_exit": (3, "`sys.exit(N)` in the script (the launcher exits N)"),
}
NO_ONE_PROCESS_CHECK = {"three_learners_resplit"}  # an unseeded split: checked across ranks only
# fastai alone autocasts nothing on a CPU: these are checked against one process with the same autocast,
# i.e. one rank of fastlaunch (`--cpu 1`).
SAME_AUTOCAST = {"vision_fp16", "vision_bf16", "text_awd_lstm_fp16"}


def _leftovers(marker: str) -> list[str]:
    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(marker in a for a in proc.info["cmdline"] or []):
                found.append(" ".join(proc.info["cmdline"]))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


class GroupRun:
    """One group's 2-rank run and one-process check, done on first use and shared by its cases."""

    def __init__(self, root: Path, group: str):
        self.out = root / group
        self.out.mkdir(parents=True, exist_ok=True)
        names = ",".join(GROUPS[group])
        env = {"FL_CONF_OUT": str(self.out), "MPLBACKEND": "Agg"}
        self.proc = run_fastlaunch(["--cpu", "2", "--seed", "3", SCRIPT, names], self.out, env=env, timeout=900)
        self.leftovers = _leftovers(str(SCRIPT))
        self.single = None
        if group == "upstream":  # the same script as one plain process, which fails by fastai's own defect
            clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            self.single = subprocess.run([sys.executable, str(SCRIPT), names], cwd=self.out, capture_output=True,
                                         text=True, timeout=600, env={**clean, **env})
        elif self.proc.returncode == 0:
            clean = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
            self.single = subprocess.run([sys.executable, str(SCRIPT), names], cwd=self.out, capture_output=True,
                                         text=True, timeout=600, env={**clean, **env, "FL_CONF_MODE": "validate"})
            autocast = [n for n in GROUPS[group] if n in SAME_AUTOCAST]
            if autocast and self.single.returncode == 0:
                self.single = run_fastlaunch(["--cpu", "1", "--no-instrument", SCRIPT, ",".join(autocast)], self.out,
                                             env={**env, "FL_CONF_MODE": "validate"}, timeout=600)

    def read(self, name: str, suffix: str) -> dict:
        path = self.out / f"{name}-{suffix}.json"
        if suffix == "meta" and not path.exists():  # the run failed before this case began
            return {"covers": [name], "note": "", "upstream": ""}
        return json.loads(path.read_text())


def problems(run: GroupRun, name: str) -> list[str]:
    """What is wrong with one case's outcome (empty: it conforms)."""
    upstream = run.read(name, "meta")["upstream"]
    if upstream:
        found = [] if run.proc.returncode != 0 and upstream in run.proc.stderr and "fastlaunch: rank" in run.proc.stderr \
            else [f"the 2-rank run did not fail with fastai's own error ({run.proc.returncode}): {run.proc.stderr[-2000:]}"]
        if run.single.returncode == 0 or upstream not in run.single.stderr:
            found.append(f"one process no longer fails with {upstream!r}: the case can be checked in full now")
        return found + ([f"processes left running: {run.leftovers}"] if run.leftovers else [])
    if run.proc.returncode != 0:
        return [f"the 2-rank run failed ({run.proc.returncode}): {run.proc.stderr[-2500:]}"]
    found = []
    r0, r1 = run.read(name, "rank0"), run.read(name, "rank1")
    for key in ("values", "losses", "lrs", "metric_names", "same", "probes"):
        if r0.get(key) != r1.get(key):
            found.append(f"{key} differ between ranks: {r0.get(key)} / {r1.get(key)}")
    if run.proc.stdout.count(f"CONFORMANCE {name}: done") != 1:
        found.append(f"its once-only line reached the console {run.proc.stdout.count(f'CONFORMANCE {name}: done')} times")
    if run.leftovers:
        found.append(f"processes left running: {run.leftovers}")
    if name not in NO_ONE_PROCESS_CHECK:
        if run.single is None or run.single.returncode != 0:
            return found + [f"the one-process check failed: {run.single and run.single.stderr[-2500:]}"]
        one = run.read(name, "validate")
        expected = one["validate"]
        got = (r0["values"] or [[]])[-1][-len(expected):]  # the last row's valid_loss and metrics
        if len(got) != len(expected) or any(abs(a - b) > 1e-4 for a, b in zip(got, expected)):
            found.append(f"2-rank valid_loss/metrics {got} != one process's validate() {expected}")
        if r0.get("probes") != one.get("probes"):
            found.append(f"predictions differ from one process: {r0.get('probes')} / {one.get('probes')}")
    return found


def script_problems(root: Path, name: str) -> list[str]:
    """Run one whole script under 2 ranks: its exit status, its once-only line, no process left."""
    status, _ = SCRIPT_CASES[name]
    script = CONF / "scripts" / f"{name}.py"
    cwd = root / name
    cwd.mkdir()
    proc = run_fastlaunch(["--cpu", "2", script], cwd, timeout=300)
    found = [] if proc.returncode == status else [f"exit status {proc.returncode}, not {status}: {proc.stderr[-2000:]}"]
    if status and f"fastlaunch: the script exited with status {status} on every rank" not in proc.stderr:
        found.append(f"the script's own exit status is not said as such: {proc.stderr[-1000:]}")
    if " failed (exit code" in proc.stderr:
        found.append(f"a rank is blamed for the script's own exit: {proc.stderr[-1000:]}")
    if "missing from the report" in proc.stderr:
        found.append(f"a rank is reported missing: {proc.stderr[-1000:]}")
    if proc.stdout.count(f"CONFORMANCE {name}: done") != 1:
        found.append(f"its once-only line reached the console {proc.stdout.count(f'CONFORMANCE {name}: done')} times")
    return found + ([f"processes left running: {left}"] if (left := _leftovers(str(script))) else [])


@pytest.fixture(scope="module")
def group_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("conformance")
    cache: dict[str, object] = {}

    def get(group: str) -> GroupRun:
        if group not in cache:
            cache[group] = script_problems(root, group) if group in SCRIPT_CASES else GroupRun(root, group)
        return cache[group]
    return get


@pytest.mark.parametrize("name", list(GROUP_OF))
def test_case_gives_one_process_answers_on_two_ranks(group_runs, name):
    found = problems(group_runs(GROUP_OF[name]), name)
    assert not found, "\n".join(found)


@pytest.mark.parametrize("name", list(SCRIPT_CASES))
def test_whole_script_runs_as_in_one_process(group_runs, name):
    found = group_runs(name)
    assert not found, "\n".join(found)


def test_readme_table_is_the_suites_outcome(group_runs):
    outcomes = []
    for name in GROUP_OF:
        run = group_runs(GROUP_OF[name])
        meta = run.read(name, "meta")
        note = f"fails in one process too (fastai's own defect: {meta['upstream']})" if meta["upstream"] else meta["note"]
        outcomes.append((name, meta["covers"], note, problems(run, name)))
    outcomes += [(name, [covers], "", group_runs(name)) for name, (_, covers) in SCRIPT_CASES.items()]
    table = render(outcomes)
    readme = REPO / "README.md"
    if os.environ.get("FL_WRITE_README"):
        readme.write_text(replace_in_readme(readme.read_text(), table))
    assert table in readme.read_text(), "README's conformance table is stale: rerun with FL_WRITE_README=1\n" + table
