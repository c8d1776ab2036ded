"""The option table: each launcher option declared once, and everything derived from it agrees with it."""
from __future__ import annotations

import ast
import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from fastlaunch.launcher import cli, resolve
from fastlaunch import option_table
from fastlaunch.tools.cluster.slurm_command import OPTIONS as SLURM_COMMAND_OPTIONS
from fastlaunch.tools.cluster.slurm_command import SLURM_HELP
from fastlaunch.config import LaunchConfig, Precision
from fastlaunch.device import GpuProbe
from fastlaunch.env import DistEnv
from fastlaunch.option_table import LAUNCHER_OPTIONS, RESOLVED_RANK_VARS, SLURM_OPTIONS
from fastlaunch.launcher.options import DEFAULTS, merged_options, options_of_run, parse_tokens
from fastlaunch.launcher.rundir import prepare_run_dir

PACKAGE = REPO / "fastlaunch"
RANK_VARS = [o.to_ranks for o in LAUNCHER_OPTIONS if o.to_ranks] + list(RESOLVED_RANK_VARS)



def test_every_option_is_declared_once_and_listed_in_help():
    names = [o.name for o in LAUNCHER_OPTIONS]
    assert len(names) == len(set(names)) and list(DEFAULTS) == names
    for option in LAUNCHER_OPTIONS:
        assert f"\n  {option.flag}" in cli.HELP, option.flag
        assert option.help.split("\n")[0] in cli.HELP
    for option in SLURM_COMMAND_OPTIONS:
        assert option.flag in SLURM_HELP, option.flag


def test_defaults_said_in_help_are_the_tables():
    for option in LAUNCHER_OPTIONS + SLURM_OPTIONS:
        if option.default is not None and not option.switch:
            assert f"default {option.default}" in option.help, option.name


def test_help_keeps_its_layout():
    lines = cli.HELP.splitlines()
    assert "  --gpus N|auto         ranks per node, one per GPU (default auto: every visible GPU;" in lines
    assert "                        with no usable GPU, 2 CPU ranks after saying why)" in lines
    assert lines[lines.index("  --checkpoint-every epoch|none") + 1].startswith(" " * 24 + "rank 0 checkpoints")
    machines = lines.index("several machines (run the same command on each; under srun, Slurm fills these in):")
    assert lines[machines + 1].startswith("  --nnodes N|MIN:MAX    machines in the job")
    assert "  --gpus G | --cpu C   ranks per node: GPUs per node, or CPU ranks per node" in SLURM_HELP


def test_tokens_become_typed_values():
    opts, given = parse_tokens(["--cpu", "2", "--seed=7", "--nnodes", "1:4", "--run-dir", "2024", "--verbose",
                                "--grace", "-1", "--resume", "-odd", "--gpus", "auto"])
    assert (opts["cpu"], opts["seed"], opts["nnodes"], opts["run_dir"]) == (2, 7, "1:4", "2024")
    assert (opts["verbose"], opts["grace"], opts["resume"], opts["gpus"]) == (True, -1, "-odd", "auto")
    assert opts["sync_bn"] is False and opts["hang_timeout"] == 600
    assert given == {"cpu", "seed", "nnodes", "run_dir", "verbose", "grace", "resume", "gpus"}
    assert parse_tokens(["--cpu", "two"])[0]["cpu"] == "two"  # resolve.py names the flag in its error


def _config(**changes) -> LaunchConfig:
    base = LaunchConfig(script=Path("t.py"), script_args=(), nproc_per_node=2, device="cpu", run_dir=None, seed=1)
    return dataclasses.replace(base, **changes)


def test_every_rank_variable_round_trips(tmp_path):
    cfg = _config(run_dir=tmp_path, seed=11, precision=Precision.BF16, device="cuda", cpus_per_rank=5, node_cores=10,
                  keep_global_batch=True, sync_bn=True, hang_timeout=7, checkpoint_every="epoch",
                  keep_checkpoints=3, resume_from=tmp_path / "c.pt", instrument=False)
    env = cfg.to_env(base={}, launcher_pid=1)
    assert {k for k in env if k.startswith("FASTLAUNCH_")} == {v.var for v in RANK_VARS} | {"FASTLAUNCH_LAUNCHER_PID"}
    dist = DistEnv.from_environ({**env, "RANK": "1", "WORLD_SIZE": "2"})
    for var in RANK_VARS:
        sent = getattr(cfg, var.field)
        assert getattr(dist, var.dist_name) == getattr(sent, "value", sent), var.name
    fresh = DistEnv()  # each variable differs from DistEnv's default above, so each one was read
    assert all(getattr(dist, v.dist_name) != getattr(fresh, v.dist_name) for v in RANK_VARS)


def test_rank_variables_cover_every_launcher_setting_of_distenv():
    torchelastic = {"rank", "local_rank", "world_size", "local_world_size", "node_rank", "agent_store", "master_addr",
                    "master_port", "source", "restart_count"}
    settings = {f.name for f in dataclasses.fields(DistEnv)} - torchelastic
    assert {v.dist_name for v in RANK_VARS} == settings


def test_unset_or_empty_rank_variables_leave_distenvs_defaults():
    assert DistEnv.from_environ({}) == DistEnv()
    assert DistEnv.from_environ({v.var: "" for v in RANK_VARS}) == DistEnv()
    off = _config(instrument=True, keep_global_batch=False).to_env(base={})
    dist = DistEnv.from_environ(off)
    assert dist.instrument and not dist.keep_global_batch and dist.resume_from is None


def test_launch_yaml_round_trip(tmp_path, script):
    tokens = ["--gpus", "4", "--precision", "bf16", "--seed", "5", "--max-restarts", "2", "--keep-global-batch",
              "--sync-bn", "--grace", "7", "--hang-timeout", "9", "--checkpoint-every", "epoch", "--keep-checkpoints",
              "4", "--nnodes", "2", "--node-rank", "1", "--rdzv-endpoint", "h:29400", "--rdzv-id", "job"]
    opts, given = merged_options(tokens)
    kwargs = dict(probe=lambda: GpuProbe(4), cores=8, bf16_probe=lambda: True, environ={})
    first = prepare_run_dir(resolve.build_config(opts, given, str(script), [], **kwargs), root=tmp_path / "runs")
    saved = yaml.safe_load((first.run_dir / "launch.yaml").read_text())
    assert list(saved) == [f.name for f in dataclasses.fields(LaunchConfig)]  # launch.yaml's keys
    restored = options_of_run(saved)
    assert set(restored) == {o.name for o in LAUNCHER_OPTIONS if o.from_run} - {"cpu"}
    again = resolve.build_config({**DEFAULTS, **restored}, set(restored), str(script), [], **kwargs)
    for field in ("nproc_per_node", "device", "precision", "seed", "max_restarts", "keep_global_batch", "sync_bn",
                  "grace", "hang_timeout", "checkpoint_every", "keep_checkpoints", "min_nodes", "max_nodes",
                  "node_rank", "rdzv_endpoint", "rdzv_id"):
        assert getattr(again, field) == getattr(first, field), field
    cpu_run = options_of_run({**saved, "device": "cpu", "min_nodes": 1, "max_nodes": 3})
    assert (cpu_run["cpu"], "gpus" in cpu_run, cpu_run["nnodes"]) == (4, False, "1:3")


def test_slurm_passes_on_the_marked_options_only(tmp_path, capsys, monkeypatch):
    # the rendering alone: what a running Slurm's partition offers is checked elsewhere (test_slurm)
    monkeypatch.setattr("fastlaunch.tools.cluster.slurm_command.probe_partition", lambda partition: None)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.py").write_text("")
    passed = [o for o in LAUNCHER_OPTIONS if o.slurm]
    assert [o.flag for o in passed] == ["--precision", "--max-restarts", "--seed", "--keep-global-batch", "--sync-bn",
                                        "--max-requeues"]
    flags = [t for o in passed for t in ([o.flag] if o.switch else [o.flag, "3"])]
    assert cli.main(["slurm", "--gpus", "2", "--time", "1:00:00", *flags, "train.py", "--lr", "1"]) == 0
    assert (f"-m fastlaunch --gpus 2 {' '.join(flags)} --run-dir \"runs/slurm-${{SLURM_JOB_ID}}\" --auto-resume "
            "train.py --lr 1") in capsys.readouterr().out
    assert cli.main(["slurm", "--gpus", "2", "--time", "1:00:00", "train.py"]) == 0
    assert "-m fastlaunch --gpus 2 --run-dir" in capsys.readouterr().out  # defaults are not passed on
    assert cli.main(["slurm", "--gpus", "2", "--time", "1:00:00", "--hang-timeout", "5", "train.py"]) == 2
    assert "unknown launcher flag before the script (got --hang-timeout)" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["fastlaunch.launcher.cli", "fastlaunch.tools.cluster.slurm_command"])
def test_each_entry_module_imports_alone(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _imports(path: Path) -> set[str]:
    """fastlaunch modules a file imports, at the top or inside functions."""
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = f"{base}.{node.module}" if base and node.module else (node.module or base)
            found.add(target)
            found.update(f"{target}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if (REPO / (name.replace(".", "/") + ".py")).is_file()}


def test_slurm_command_never_imports_the_cli():
    seen, todo = set(), ["fastlaunch.tools.cluster.slurm_command"]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo += _imports(REPO / (name.replace(".", "/") + ".py"))
    assert "fastlaunch.launcher.cli" not in seen and "fastlaunch.launcher.parsing" in seen


def test_launcher_modules_read_the_environment_through_env_py():
    files = [PACKAGE / "config.py", PACKAGE / "option_table.py", PACKAGE / "device.py",
             *sorted((PACKAGE / "launcher").rglob("*.py")), *sorted((PACKAGE / "tools").rglob("*.py"))]
    for path in files:
        assert "os.environ" not in path.read_text(), path
    assert "report_main" not in (PACKAGE / "launcher" / "engine.py").read_text()


def test_every_subcommand_answers_help(capsys):
    assert cli.SUBCOMMANDS == tuple(cli.COMMANDS) == ("slurm", "new", "doctor", "report")
    for name in cli.COMMANDS:
        assert cli.main([name, "--help"]) == 0
        assert capsys.readouterr().out.startswith(f"usage: fastlaunch {name}")


@pytest.mark.parametrize("argv, line", [
    (["new", "d", "--template"], "fastlaunch: error: --template needs a name (got nothing). HINT: use one of: "
                                 "minimal, vision, tabular, text"),
    (["new", "-t", "audio", "p"], "fastlaunch: error: unknown template (got audio). HINT: use one of: "
                                  "minimal, vision, tabular, text"),
    (["new", "a", "-x"], "fastlaunch: error: fastlaunch new takes one directory (got a -x). HINT: fastlaunch new "
                         "my_project --template vision"),
    (["report", "a", "b"], "fastlaunch: error: fastlaunch report takes one run directory (got a b). HINT: "
                           "fastlaunch report runs/<stamp>-<stem>"),
    (["doctor", "--bogus"], "fastlaunch: error: unknown doctor flag before the script (got --bogus). HINT: see "
                            "`fastlaunch doctor --help`; flags meant for the script go after the script path"),
])
def test_subcommand_input_errors_are_one_line_with_exit_2(argv, line, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == line + "\n"


def test_new_takes_its_flags_anywhere(tmp_path, capsys):
    assert cli.main(["new", "--template=tabular", "--force", str(tmp_path / "p")]) == 0
    assert "from the tabular template" in capsys.readouterr().err


def test_slurm_keys_of_a_launch_config():
    assert option_table.SLURM_KEYS == ("nodes", "time", "partition", "cpus_per_rank", "grace", "job_name")


def test_the_readme_flag_table_lists_every_launcher_option_and_no_other():
    import re

    from fastlaunch.option_table import LAUNCHER_OPTIONS

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| flag | meaning |"):]
    table = table[: table.index("\n\n")]
    written = set(re.findall(r"`(--[a-z-]+)", table))
    declared = {flag for option in LAUNCHER_OPTIONS for flag in option.flags}
    assert written == declared, f"README only: {sorted(written - declared)}; not in README: {sorted(declared - written)}"


def test_the_readme_states_the_grace_defaults_the_tables_hold():
    import re

    from fastlaunch.option_table import LAUNCHER_OPTIONS, SLURM_OPTIONS

    readme = (REPO / "README.md").read_text().replace("\n", " ")
    launcher = next(o.default for o in LAUNCHER_OPTIONS if o.name == "grace")
    slurm = next(o.default for o in SLURM_OPTIONS if o.name == "grace")
    assert re.search(r"`fastlaunch slurm --grace S`, default (\d+)", readme).group(1) == str(slurm)
    assert re.search(r"launcher's own `--grace`, (\d+) s by default", readme).group(1) == str(launcher)
    assert re.search(r"\| `--grace S` \|[^|]*\(default (\d+)\)", readme).group(1) == str(launcher)
