"""Bad input: refused in one line with a HINT and exit status 2 before anything starts, whichever way it comes
(a flag, a launch config, an accelerate config, the environment, a run's launch.yaml, a job script)."""
from __future__ import annotations

import os
import subprocess

import pytest

from fastlaunch.config import LaunchConfig
from fastlaunch.device import GpuProbe
from fastlaunch.env import DistEnv, SlurmFacts
from fastlaunch.errors import UsageError
from fastlaunch.launcher import resolve
from fastlaunch.launcher.autoresume import previous_start
from fastlaunch.launcher.cli import main
from fastlaunch.launcher.diagnose import diagnose
from fastlaunch.launcher.options import load_accelerate_config, merged_options
from fastlaunch.tools.cluster.slurm import SbatchSpec, render_sbatch

NO_GPU = GpuProbe(0, "none here")


@pytest.fixture
def launches(tmp_path, monkeypatch):
    """main() as a user runs it, in tmp_path, with the engine replaced: the configs it would have launched."""
    started: list[LaunchConfig] = []

    def launch(config, listener=None):
        started.append(config)
        return 0

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fastlaunch.launcher.engine.launch", launch)
    monkeypatch.setattr(resolve, "probe_gpus", lambda: NO_GPU)
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    return started


def _refused(argv, capsys, launches, tmp_path, *said):
    """main(argv) exits 2 with one line holding each of `said` and a HINT, and starts nothing."""
    assert main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fastlaunch: error: ") and "HINT: " in err[0], err
    for part in said:
        assert part in err[0], err[0]
    assert not launches and not (tmp_path / "runs").exists()
    return err[0]


def _config_file(tmp_path, text: str | bytes, name: str = "c.yaml"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def _build(tokens, script, **kw):
    opts, given = merged_options(tokens)
    return resolve.build_config(opts, given, str(script), [], environ={}, probe=lambda: NO_GPU, **kw)


@pytest.mark.parametrize("seed", ["4294967296", "-1", "99999999999999999999"])
def test_a_seed_outside_pythonhashseeds_range_is_refused(seed, script, tmp_path, capsys, launches):
    _refused(["--cpu", "1", "--seed", seed, script], capsys, launches, tmp_path, "--seed must be at", f"(got {seed})")
    assert _build(["--cpu", "1", "--seed", "4294967295"], script, cores=2).to_env(base={})["PYTHONHASHSEED"] == \
        "4294967295"


def test_absurd_rank_counts_are_refused_from_flags_and_files(script, tmp_path, capsys, launches):
    huge = "99999999999999999999999"
    _refused(["--cpu", huge, script], capsys, launches, tmp_path, "--cpu must be at most 1024", f"(got {huge})")
    cfg = _config_file(tmp_path, f"cpu: {huge}\n")
    _refused(["--config", cfg, script], capsys, launches, tmp_path, "--cpu must be at most 1024", f"(got {huge})")
    _refused(["--cpu", "1025", script], capsys, launches, tmp_path, "--cpu must be at most 1024")
    assert _build(["--cpu", "1024"], script, cores=2).nproc_per_node == 1024


@pytest.mark.parametrize("value, said", [("99999999999999999999", "--hang-timeout must be at most 604800"),
                                         ("604801", "--hang-timeout must be at most 604800"),
                                         ("1.0e+300", "hang_timeout in launch config"),
                                         (".nan", "hang_timeout in launch config"),
                                         (".inf", "hang_timeout in launch config"),
                                         ("-5", "--hang-timeout must be at least 0")])
def test_a_hang_timeout_out_of_range_is_refused(value, said, script, tmp_path, capsys, launches):
    cfg = _config_file(tmp_path, f"cpu: 1\nhang_timeout: {value}\n")
    _refused(["--config", cfg, script], capsys, launches, tmp_path, said)
    assert _build(["--cpu", "1", "--hang-timeout", "604800"], script, cores=2).hang_timeout == 604800


@pytest.mark.parametrize("flag", ["--config", "--accelerate-config"])
def test_a_config_file_that_is_not_utf8_is_named(flag, script, tmp_path, capsys, launches):
    cfg = _config_file(tmp_path, b"cpu: 2\n# caf\xe9\n", "latin1.yaml")
    _refused([flag, cfg, script], capsys, launches, tmp_path, "not UTF-8", str(cfg))


@pytest.mark.parametrize("written, meant", [("'false'", False), ("'No'", False), ("'off'", False), ("'0'", False),
                                            ("false", False), ("0", False), ("'TRUE'", True), ("'yes'", True),
                                            ("'On'", True), ("true", True), ("1", True)])
def test_switch_words_from_a_file_mean_what_they_say(written, meant, script, tmp_path):
    cfg = _config_file(tmp_path, f"cpu: 1\nkeep_global_batch: {written}\nverbose: {written}\n")
    config = _build(["--config", str(cfg)], script, cores=2)
    assert (config.keep_global_batch, config.verbose) == (meant, meant)


@pytest.mark.parametrize("line, said", [
    ("keep_global_batch: maybe", "keep_global_batch in launch config"),
    ("run_dir: {a: 1}", "run_dir in launch config"),
    ("run_dir: [x, y]", "run_dir in launch config"),
    ("rdzv_id: {a: 1}", "rdzv_id in launch config"),
    ("seed: [1]", "seed in launch config"),
    ("cpu: 2.5", "cpu in launch config"),
    ("precision: no", "precision in launch config"),
])
def test_a_value_of_the_wrong_kind_in_a_config_file_is_named(line, said, script, tmp_path, capsys, launches):
    cfg = _config_file(tmp_path, f"{line}\n")
    key = line.split(": ", 1)[0]
    err = _refused(["--cpu", "1", "--config", cfg, script], capsys, launches, tmp_path, said, " takes ")
    assert "(got " in err and key in err.split("HINT: ")[1]
    assert not list(tmp_path.glob("{*")) and not (tmp_path / "['x', 'y']").exists()  # no odd directory made


@pytest.mark.parametrize("text, said", [
    ("num_processes: abc\n", "num_processes: abc"),
    ("num_processes: 4\nnum_machines: [2]\n", "num_machines: [2]"),
    ("num_processes: 4\nnum_machines: 2\nmachine_rank: first\n", "machine_rank: first"),
    ("num_processes: 4\nnum_machines: 2\nmain_process_ip: h\nmain_process_port: http\n", "main_process_port: http"),
    ("num_processes: 2\nuse_cpu: perhaps\n", "use_cpu: perhaps"),
])
def test_non_numbers_in_an_accelerate_config_are_named(text, said, script, tmp_path, capsys, launches):
    acc = _config_file(tmp_path, text, "acc.yaml")
    _refused(["--accelerate-config", acc, script], capsys, launches, tmp_path, said, "accelerate config")


def test_an_accelerate_config_reads_quoted_switches(tmp_path):
    acc = _config_file(tmp_path, "num_processes: 2\nuse_cpu: 'false'\n", "acc.yaml")
    assert load_accelerate_config(str(acc)) == {"gpus": 2, "precision": "no"}


@pytest.mark.parametrize("variable, value", [("SLURM_JOB_ID", "abc"), ("SLURM_NNODES", "two"),
                                             ("SLURM_JOB_NUM_NODES", "x"), ("SLURM_NODEID", "-1"),
                                             ("SLURM_NTASKS", "1.5"), ("SLURM_GPUS_ON_NODE", "four")])
def test_non_numbers_in_slurm_variables_are_named(variable, value, script, tmp_path, capsys, launches, monkeypatch):
    environ = {"SLURM_JOB_ID": "7", variable: value}
    with pytest.raises(UsageError, match=f"{variable}={value}"):
        SlurmFacts.from_environ(environ)
    for key, set_to in environ.items():
        monkeypatch.setenv(key, set_to)
    _refused(["--cpu", "1", script], capsys, launches, tmp_path, f"{variable}={value}")


@pytest.mark.parametrize("variable, value", [("FASTLAUNCH_HANG_TIMEOUT", "abc"), ("FASTLAUNCH_SYNC_BN", "maybe")])
def test_rank_variables_that_cannot_be_read_are_named(variable, value):
    with pytest.raises(UsageError, match=variable):
        DistEnv.from_environ({variable: value})
    assert DistEnv.from_environ({"FASTLAUNCH_SYNC_BN": "true"}).sync_bn


@pytest.mark.parametrize("text", [b"start: abc\n", b"start: [1]\n", b"start: -3\n", b"start: true\n", b"- a\n",
                                  b"start: 1\n# \xff\n", b"start: [\n"])
def test_a_broken_start_in_an_auto_resumed_run_directory_is_one_line(text, script, tmp_path, capsys, launches):
    job = tmp_path / "job"
    job.mkdir()
    (job / "launch.yaml").write_bytes(text)
    with pytest.raises(UsageError):
        previous_start(job)
    assert main(["--cpu", "1", "--run-dir", str(job), "--auto-resume", str(script)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "launch.yaml" in err[0] and "HINT: " in err[0] and not launches
    (job / "launch.yaml").write_text("start: 2\n")
    assert previous_start(job) == 2


def _spec(**changes) -> SbatchSpec:
    base = dict(nodes=2, ranks_per_node=8, use_gpus=True, time="2:00:00", script="train.py", script_args=("--lr", "1"),
                python="/opt/venv/bin/python", workdir="/home/me/project", job_name="train", partition="gpu")
    return SbatchSpec(**{**base, **changes})


def _sbatch_words(line: str) -> list[str]:
    """The arguments sbatch reads from an #SBATCH line: quotes group, a backslash escapes, # starts a comment."""
    words: list[str] = []
    word: str | None = None
    quote, escaped = "", False
    for ch in line[len("#SBATCH"):]:
        if escaped:
            escaped, word = False, (word or "") + ch
        elif ch == "\\":
            escaped = True
        elif quote:
            word, quote = ((word or ""), "") if ch == quote else ((word or "") + ch, quote)
        elif ch in "'\"":
            quote, word = ch, word or ""
        elif ch == "#":
            break
        elif ch.isspace():
            if word is not None:
                words.append(word)
            word = None
        else:
            word = (word or "") + ch
    return words + ([word] if word is not None else [])


@pytest.mark.parametrize("changes, said", [
    (dict(job_name="x\ntouch P"), "--job-name holds a line break"),
    (dict(job_name="my job"), "--job-name holds a space"),
    (dict(partition="gpu --exclusive"), "--partition holds a space"),
    (dict(time="2:00:00\n"), "--time holds a line break"),
    (dict(workdir="/home/me\ntouch P"), "working directory (--chdir) holds a line break"),
    (dict(script_args=("--lr", "1\rx")), "a script argument holds a line break"),
    (dict(script="train\x00.py"), "the script path holds a line break or NUL"),
    (dict(launcher_flags=("--precision", "bf16\ntouch P")), "a flag passed on to fastlaunch holds a line break"),
])
def test_values_that_would_add_lines_or_directives_to_a_job_script_are_refused(changes, said):
    with pytest.raises(UsageError, match="HINT") as err:
        render_sbatch(_spec(**changes))
    assert said in str(err.value) and "\n" not in str(err.value)


def test_paths_and_arguments_of_a_job_script_are_quoted(tmp_path):
    text = render_sbatch(_spec(workdir="/home/me/my project", script="my train.py", script_args=("a b", "$(x)")))
    chdir = next(line for line in text.splitlines() if line.startswith("#SBATCH --chdir"))
    assert _sbatch_words(chdir) == ["--chdir=/home/me/my project"]
    assert "--auto-resume 'my train.py' --lr 1" not in text and "--auto-resume 'my train.py' 'a b' '$(x)'" in text
    job = tmp_path / "job.sbatch"
    job.write_text(text)
    assert subprocess.run(["bash", "-n", str(job)]).returncode == 0


def test_fastlaunch_slurm_refuses_injection_and_names_the_job_safely(tmp_path, capsys, launches, monkeypatch):
    monkeypatch.setattr("fastlaunch.tools.cluster.slurm_command.probe_partition", lambda partition: None)
    (tmp_path / "my train.py").write_text("")
    base = ["slurm", "--gpus", "1", "--time", "1:00:00"]
    for flags, said in ([["--job-name", "x\ntouch P"], "--job-name holds a line break"],
                        [["--partition", "gpu --exclusive"], "--partition holds a space"],
                        [["--seed", "4294967296"], "--seed must be at most 4294967295"]):
        _refused([*base, *flags, "my train.py"], capsys, launches, tmp_path, said)
    assert main([*base, "my train.py"]) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --job-name=my_train\n" in out and "--auto-resume 'my train.py'\n" in out
    cfg = _config_file(tmp_path, "time: 2:00:00\n")  # unquoted, YAML reads 7200 (seconds)
    _refused(["slurm", "--gpus", "1", "--config", cfg, "my train.py"], capsys, launches, tmp_path,
             "time in launch config", "quote it")


def _rec(rank, work_ms, **kw):
    return dict({"rank": rank, "epoch": 0, "data_wait_frac": 0.0, "syncs_per_step": 0.0, "work_time": work_ms / 1000,
                 "device": "cpu", "visible_gpus": None}, **kw)


def test_a_few_milliseconds_more_is_no_straggler():
    calm = diagnose([_rec(0, 3.0), _rec(1, 3.0), _rec(2, 3.7)])  # 23% slower, 0.7 ms
    assert not [d for d in calm if "slower than the median" in d]


def test_a_straggler_is_named_with_times_that_differ():
    found = [d for d in diagnose([_rec(0, 8.2), _rec(1, 8.4), _rec(2, 14.0)]) if "slower than the median" in d]
    assert len(found) == 1 and found[0].startswith("rank 2 steps 67% slower")
    assert "(14.0 ms of work per step against 8.4 ms)" in found[0]


def test_oversubscribed_cpu_ranks_are_said_instead_of_a_straggler():
    crowded = [_rec(r, 20.0 if r < 3 else 40.0, node_cores=2) for r in range(4)]
    text = " | ".join(diagnose(crowded))
    assert "oversubscribed: 4 ranks on 2 cores" in text and "slower than the median" not in text
    gpus = [dict(r, device="cuda") for r in crowded]  # GPU ranks need no core each
    assert "oversubscribed" not in " | ".join(diagnose(gpus))
    two_nodes = [dict(r, node=0) for r in crowded] + [_rec(4 + r, 20.0 if r else 90.0, node=1, node_cores=8)
                                                      for r in range(4)]
    text = " | ".join(diagnose(two_nodes))
    assert "node 0 oversubscribed: 4 ranks on 2 cores" in text and "node 1 oversubscribed" not in text
    assert "rank 4 steps" in text and "rank 3 steps" not in text


def test_the_machines_cores_reach_the_ranks(script):
    config = _build(["--cpu", "4"], script, cores=3)
    assert config.node_cores == 3
    assert DistEnv.from_environ(config.to_env(base={})).node_cores == 3
