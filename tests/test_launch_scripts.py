"""Scripts as people write them, each under 2 real CPU ranks through the real engine."""
from __future__ import annotations

import subprocess
import sys

from conftest import REPO, only_run_dir, read_ranks, run_fastlaunch


def _probe(tmp_path, scripts, mode, *launcher):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_fastlaunch([*launcher, scripts / "fastai_probe.py"], tmp_path,
                          env={"FL_PROBE_OUT": str(out), "FL_PROBE_MODE": mode})
    return proc, out


def test_torchrun_style_script_runs_unchanged(tmp_path, scripts):
    out = tmp_path / "out"
    out.mkdir()
    proc = run_fastlaunch(["--cpu", "2", scripts / "plain_ddp.py"], tmp_path, env={"FL_PROBE_OUT": str(out)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0, r1 = read_ranks(out, 2)
    for rank, r in enumerate((r0, r1)):
        assert (r["RANK"], r["LOCAL_RANK"], r["WORLD_SIZE"], r["LOCAL_WORLD_SIZE"]) == (str(rank), str(rank), "2", "2")
        assert r["rank"] == rank and r["world"] == 2 and r["total"] == 3.0
        assert r["MASTER_ADDR"] and int(r["MASTER_PORT"]) > 0
    assert r0["MASTER_ADDR"] == r1["MASTER_ADDR"] and r0["MASTER_PORT"] == r1["MASTER_PORT"]


def test_script_with_its_own_distrib_ctx_trains_correctly(tmp_path, scripts):
    proc, out = _probe(tmp_path, scripts, "distrib_ctx", "--cpu", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0, r1 = read_ranks(out, 2)
    assert r0["weights"] == r1["weights"]
    assert r0["model_types"] == ["FastlaunchDDP"]  # wrapped once, by fastlaunch
    assert not set(r0["seen"][0]) & set(r1["seen"][0])
    assert r0["lens"] == r0["batches"] == [8, 8]


def test_a_rank_that_raises_fails_the_job_with_its_traceback(tmp_path, scripts):
    proc, _ = _probe(tmp_path, scripts, "raise", "--cpu", "2")
    assert proc.returncode != 0
    assert "rank 1 failed" in proc.stderr
    assert "ValueError: Exception occured in `Probe` when calling event `after_batch`: boom on rank 1" in proc.stderr
    assert "Traceback (most recent call last)" in proc.stderr  # the tail of rank 1's log
    assert "fastai_probe.py" in proc.stderr
    log = only_run_dir(tmp_path) / "logs" / "rank1.log"
    assert "boom on rank 1" in log.read_text()


def test_export_loads_without_fastlaunch_and_load_learner_gets_ddp(tmp_path, scripts):
    proc, out = _probe(tmp_path, scripts, "export", "--cpu", "2")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r0, r1 = read_ranks(out, 2)
    assert r0["model_types"] == r1["model_types"] == ["FastlaunchDDP"]  # the loaded Learner's fine_tune
    assert r0["weights"] == r1["weights"]
    check = (
        "import sys; sys.modules['fastlaunch'] = None\n"  # any import of fastlaunch now fails
        f"sys.path.insert(0, {str(scripts)!r})\n"
        "from fastai.learner import load_learner\n"
        f"learn = load_learner({str(out / 'export.pkl')!r})\n"
        "names = [type(cb).__module__ for cb in learn.cbs]\n"
        "assert not any(n.startswith('fastlaunch') for n in names), names\n"
        "print('loaded', len(learn.cbs))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert loaded.returncode == 0, loaded.stderr
    assert "loaded" in loaded.stdout


def test_no_gpu_falls_back_to_two_cpu_ranks_with_a_reason(tmp_path):
    """The README's demo: the minimal template with every default (--gpus auto)."""
    proc = run_fastlaunch([REPO / "templates" / "minimal" / "train.py", "--epochs", "1"], tmp_path,
                          env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no usable GPU (CUDA_VISIBLE_DEVICES='' hides every GPU); running 2 CPU ranks" in proc.stderr
    assert "HINT: --gpus N requires N GPUs" in proc.stderr
    assert proc.stdout.count("train_loss") == 1
    logs = only_run_dir(tmp_path) / "logs"
    assert sorted(p.name for p in logs.glob("*.log")) == ["rank0.log", "rank1.log"]
