"""The command line: argv split at the script, launcher flags validated before anything runs."""
from __future__ import annotations

import pytest

from conftest import run_fastlaunch
from fastlaunch.launcher import resolve
from fastlaunch.launcher.cli import main, split_argv
from fastlaunch.config import Precision
from fastlaunch.device import GpuProbe
from fastlaunch.errors import UsageError
from fastlaunch.launcher.options import merged_options


def build_config(tokens, script, script_args, **kwargs):
    """The command line's path: tokens -> options -> LaunchConfig (no Slurm in these tests)."""
    opts, given = merged_options(tokens)
    return resolve.build_config(opts, given, script, script_args, environ={}, **kwargs)



def test_split_at_script_keeps_script_args_verbatim():
    tokens, script, rest = split_argv(["--cpu", "2", "--precision=bf16", "train.py", "--cpu", "9", "--", "-x", ""])
    assert tokens == ["--cpu", "2", "--precision=bf16"]
    assert script == "train.py"
    assert rest == ["--cpu", "9", "--", "-x", ""]


def test_double_dash_ends_launcher_flags():
    assert split_argv(["--cpu", "1", "--", "-weird.py", "a"]) == (["--cpu", "1"], "-weird.py", ["a"])


def test_value_flag_without_value_is_an_error():
    with pytest.raises(UsageError, match="needs a value"):
        split_argv(["--cpu"])


def test_config_from_flags(script):
    cfg = build_config(["--cpu", "2", "--precision", "bf16", "--seed", "7", "--max-restarts", "1", "--port", "29511"],
                       str(script), ["--lr", "1e-3"], cores=4)
    assert (cfg.nproc_per_node, cfg.device, cfg.precision, cfg.seed) == (2, "cpu", Precision.BF16, 7)
    assert (cfg.max_restarts, cfg.port, cfg.cpus_per_rank, cfg.script_args) == (1, 29511, 2, ("--lr", "1e-3"))
    env = cfg.to_env(base={}, launcher_pid=123)
    assert env["OMP_NUM_THREADS"] == "2" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert env["FASTLAUNCH_SEED"] == "7" and env["FASTLAUNCH_LAUNCHER_PID"] == "123"
    assert "OMP_NUM_THREADS" not in cfg.to_env(base={"OMP_NUM_THREADS": "3"})  # the user's choice stands


def test_gpus_auto_uses_every_visible_gpu(script):
    cfg = build_config([], str(script), [], probe=lambda: GpuProbe(4), cores=16)
    assert (cfg.nproc_per_node, cfg.device, cfg.notes) == (4, "cuda", ())
    assert "CUDA_VISIBLE_DEVICES" not in cfg.to_env(base={})


def test_gpus_auto_without_gpu_runs_cpu_ranks_and_says_why(script):
    cfg = build_config([], str(script), [], probe=lambda: GpuProbe(0, "this torch (2.x) is a CPU-only build"), cores=8)
    assert (cfg.nproc_per_node, cfg.device) == (2, "cpu")
    assert "CPU-only build" in cfg.notes[0] and "HINT" in cfg.notes[0]
    one_core = build_config([], str(script), [], probe=lambda: GpuProbe(0, "x"), cores=1)
    assert one_core.nproc_per_node == 1


def test_explicit_gpus_never_fall_back(script):
    with pytest.raises(UsageError) as err:
        build_config(["--gpus", "4"], str(script), [], probe=lambda: GpuProbe(2), cores=8)
    assert "--gpus 4, 2 visible" in str(err.value) and "HINT: use --gpus 2" in str(err.value)
    with pytest.raises(UsageError) as err:
        build_config(["--gpus", "1"], str(script), [], probe=lambda: GpuProbe(0, "no NVIDIA driver found"), cores=8)
    assert "no NVIDIA driver found" in str(err.value) and "--cpu N" in str(err.value)
    cfg = build_config(["--gpus", "2"], str(script), [], probe=lambda: GpuProbe(2), cores=8)
    assert (cfg.nproc_per_node, cfg.device, cfg.cpus_per_rank) == (2, "cuda", 4)


def test_cpu_hides_gpus_even_when_present(script):
    cfg = build_config(["--cpu", "3"], str(script), [], probe=lambda: GpuProbe(8), cores=6)
    assert cfg.device == "cpu" and cfg.to_env(base={})["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize("argv, what, got", [
    (["missing.py"], "script not found", "missing.py"),
    (["--cpu", "0", "{script}"], "--cpu must be at least 1", "0"),
    (["--gpus", "0", "{script}"], "--gpus must be at least 1", "0"),
    (["--gpus", "-2", "{script}"], "--gpus must be at least 1", "-2"),
    (["--cpu", "two", "{script}"], "--cpu takes a whole number", "two"),
    (["--gpus", "2", "--cpu", "2", "{script}"], "--gpus and --cpu both given", "--gpus 2 --cpu 2"),
    (["--precision", "fp8", "{script}"], "unknown --precision", "fp8"),
    (["--max-restarts", "-1", "{script}"], "--max-restarts must be at least 0", "-1"),
    (["--port", "70000", "{script}"], "--port is out of range", "70000"),
    (["--nodes", "2", "{script}"], "unknown launcher flag before the script", "--nodes"),
    (["--cpu", "2"], "no script given", "--cpu 2"),
    (["--cpu", "2", "--sync-bn", "{script}"], "--sync-bn needs GPUs: gloo cannot synchronise BatchNorm across CPU ranks",
     "--sync-bn with 2 CPU rank(s)"),
    (["{dir}"], "script is not a file", "{dir}"),
])
def test_bad_input_is_one_line_with_hint_and_exit_2(argv, what, got, script, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(resolve, "probe_gpus", lambda: GpuProbe(0, "none here"))
    fill = {"{script}": str(script), "{dir}": str(tmp_path)}
    argv = [fill.get(a, a) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0] == f"fastlaunch: error: {what} (got {fill.get(got, got)}). HINT: " + err[0].split("HINT: ", 1)[1]
    assert not (tmp_path / "runs").exists()  # nothing started, no run directory


def test_bad_input_from_the_real_command_has_no_traceback(tmp_path):
    proc = run_fastlaunch(["--gpus", "64", "--bogus"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fastlaunch: error: unknown launcher flag before the script (got --bogus). HINT:")
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    proc = run_fastlaunch(["--gpus", "64", "nope.py"], tmp_path)
    assert proc.returncode == 2 and "script not found (got nope.py)" in proc.stderr
    proc = run_fastlaunch(["--gpus", "64", __file__], tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert "--gpus asks for more GPUs than torch can see (got --gpus 64, 0 visible: " in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


def test_help_shows_examples(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "fastlaunch --gpus 4 train.py" in out and "--cpu N" in out
    assert main([]) == 0


def test_bf16_on_gpus_without_support_stops_before_launch(script):
    with pytest.raises(UsageError) as err:
        build_config(["--precision", "bf16"], str(script), [], probe=lambda: GpuProbe(2), cores=8,
                     bf16_probe=lambda: False)
    assert "bf16" in str(err.value) and "HINT: use --precision fp16" in str(err.value)
    ok = build_config(["--precision", "bf16"], str(script), [], probe=lambda: GpuProbe(2), cores=8,
                      bf16_probe=lambda: True)
    assert ok.precision is Precision.BF16
    cpu = build_config(["--cpu", "2", "--precision", "bf16"], str(script), [], cores=8, bf16_probe=lambda: False)
    assert cpu.precision is Precision.BF16  # CPU autocast supports bf16


def test_keep_global_batch_reaches_the_ranks(script):
    cfg = build_config(["--cpu", "2", "--keep-global-batch"], str(script), [], cores=2)
    assert cfg.keep_global_batch and cfg.to_env(base={})["FASTLAUNCH_KEEP_GLOBAL_BATCH"] == "1"


@pytest.mark.parametrize("env, what", [({"TORCHELASTIC_RUN_ID": "x", "RANK": "1"}, "inside a rank of another launch"),
                                       ({"LOCAL_RANK": "0"}, "inside a rank of another launch")])
def test_nested_launch_is_refused(script, tmp_path, capsys, monkeypatch, env, what):
    monkeypatch.chdir(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["--cpu", "2", str(script)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and what in err[0] and "HINT:" in err[0]


def test_a_slurm_task_is_not_a_nested_launch(script):
    cfg = resolve.build_config(merged_options(["--cpu", "1"])[0], {"cpu"}, str(script), [],
                               environ={"SLURM_JOB_ID": "5", "SLURM_PROCID": "0", "SLURM_STEP_ID": "0"})
    assert cfg.nproc_per_node == 1


@pytest.mark.parametrize("content, what", [(b"\x7fELF\x02\x01\x00\x00", "the script is not valid Python"),
                                           (b"def broken(:\n", "the script is not valid Python")])
def test_a_script_that_is_not_python(tmp_path, capsys, monkeypatch, content, what):
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "train.py"
    bad.write_bytes(content)
    assert main(["--cpu", "2", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and what in err[0] and "HINT:" in err[0]


def test_negative_grace_and_stale_pet_variables(script, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--cpu", "2", "--grace", "-1", str(script)]) == 2
    assert "--grace must be at least 0 (got -1)" in capsys.readouterr().err
    cfg = resolve.build_config(merged_options(["--cpu", "1"])[0], {"cpu"}, str(script), [],
                               environ={"PET_NPROC_PER_NODE": "8"})
    assert any("ignoring PET_NPROC_PER_NODE" in note for note in cfg.notes)
