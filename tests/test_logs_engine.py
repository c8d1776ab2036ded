"""Per-rank log files, the console follower, the engine's config and the failure's root cause."""
from __future__ import annotations

import io
from dataclasses import replace
import time
import types
from pathlib import Path

from fastlaunch.config import LaunchConfig
from fastlaunch.launcher.engine import elastic_config, worker_args
from fastlaunch.launcher.outcome import root_cause
from fastlaunch.launcher.logs import ConsoleFollower, RankLogsSpecs, tail_lines


def test_logs_per_global_rank_and_attempt(tmp_path):
    followed = []
    specs = RankLogsSpecs(tmp_path / "logs", console_rank=0, on_console_log=followed.append)
    envs = {0: {"RANK": "2", "TORCHELASTIC_RESTART_COUNT": "0"}, 1: {"RANK": "0", "TORCHELASTIC_RESTART_COUNT": "0"}}
    dest = specs.reify(envs)
    assert dest.stdouts[0] == dest.stderrs[0] == str(tmp_path / "logs" / "rank2.log")
    assert envs[1]["TORCHELASTIC_ERROR_FILE"] == str(tmp_path / "logs" / "rank0.error.json")
    assert followed == [tmp_path / "logs" / "rank0.log"]
    again = specs.reify({0: {"RANK": "0", "TORCHELASTIC_RESTART_COUNT": "1"}})
    assert again.stdouts[0].endswith("rank0.attempt1.log")
    assert specs.log_path(0) == tmp_path / "logs" / "rank0.attempt1.log"
    assert followed[-1].name == "rank0.attempt1.log"


def test_console_follower_copies_bytes_as_written_and_switches_files(tmp_path):
    out = io.TextIOWrapper(io.BytesIO(), write_through=True)
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    with ConsoleFollower(out, interval=0.01) as follower:
        follower.follow(first)
        first.write_bytes(b"epoch 1\r50%\rdone\n")
        time.sleep(0.2)
        follower.follow(second)
        second.write_bytes(b"attempt 2\n")
        time.sleep(0.2)
    out.flush()
    assert out.buffer.getvalue() == b"done\nattempt 2\n"  # not a terminal: each bar's final state


def test_a_terminal_keeps_the_live_bar_and_a_log_keeps_each_bars_final_state(tmp_path):
    from fastlaunch.launcher.bars import tidy_log

    class Terminal(io.TextIOWrapper):
        def isatty(self):
            return True

    out = Terminal(io.BytesIO(), write_through=True)
    log = tmp_path / "rank0.log"
    raw = (b"\xe2\x96\x88\repoch  train_loss\n\xe2\x96\x88\rEpoch 1/2 : |--| 0% [0/8]\rEpoch 1/2 : |##| 100% [8/8 0.7]"
           b"\r            \r\n0  0.70  00:01\nfastlaunch: epoch 0\n")
    with ConsoleFollower(out, interval=0.01) as follower:
        follower.follow(log)
        log.write_bytes(raw)
        time.sleep(0.2)
    out.flush()
    assert out.buffer.getvalue() == raw  # live, as written
    tidy_log(log)
    assert log.read_bytes() == b"epoch  train_loss\nEpoch 1/2 : |##| 100% [8/8 0.7]\n0  0.70  00:01\nfastlaunch: epoch 0\n"


def test_tail_lines_folds_progress_bars(tmp_path):
    log = tmp_path / "r.log"
    log.write_text("a\nb\r10%\r100%\nc\n")
    assert tail_lines(log, 2) == ["100%", "c"]
    assert tail_lines(tmp_path / "missing", 3) == []


def _failure(exitcode, message, timestamp, precise=None):
    extra = {"py_callstack": "tb", "timestamp": str(timestamp)}
    if precise is not None:
        extra["fastlaunch_time"] = precise
    data = {"message": {"message": message, "extraInfo": extra}} if message else {}
    return types.SimpleNamespace(exitcode=exitcode, message=message, error_file_data=data, timestamp=timestamp)


def test_root_cause_ignores_peer_closed_echoes_even_when_earlier():
    failures = {0: _failure(1, "RuntimeError: [pair.cc:561] Connection closed by peer [127.0.0.1]:1", 100),
                1: _failure(1, "ValueError: boom", 100),
                2: _failure(-15, "", 99)}
    assert root_cause(failures) == 1
    # SIGTERM is how the engine stops the survivors: a SIGKILLed rank is the cause even if seen later.
    assert root_cause({2: _failure(-9, "", 5), 3: _failure(-15, "", 4)}) == 2
    # Two real errors in the same whole second: fastlaunch's sub-second record decides.
    assert root_cause({0: _failure(1, "KeyError: a", 7, 7.9), 1: _failure(1, "ValueError: b", 7, 7.2)}) == 1


def test_engine_config_one_node_loopback(tmp_path):
    cfg = LaunchConfig(script=Path("/s/train.py"), script_args=("--x", ""), nproc_per_node=3, device="cpu",
                       run_dir=tmp_path, seed=0, max_restarts=2)
    ec = elastic_config(cfg, RankLogsSpecs(tmp_path), port=29777)
    assert (ec.min_nodes, ec.max_nodes, ec.nproc_per_node, ec.max_restarts) == (1, 1, 3, 2)
    assert ec.rdzv_backend == "fastlaunch-loopback" and ec.rdzv_endpoint == "127.0.0.1:29777"
    assert "SIGUSR1" in ec.signals_to_handle and ec.shutdown_timeout == cfg.grace
    static = elastic_config(replace(cfg, min_nodes=2, max_nodes=2, node_rank=1, rdzv_endpoint="h:1"), RankLogsSpecs(tmp_path))
    assert (static.rdzv_backend, static.rdzv_configs["rank"], static.rdzv_endpoint) == ("static", 1, "h:1")
    elastic = elastic_config(replace(cfg, min_nodes=1, max_nodes=4, rdzv_endpoint="h:1", rdzv_id="x"),
                             RankLogsSpecs(tmp_path))
    assert (elastic.rdzv_backend, elastic.min_nodes, elastic.max_nodes, elastic.run_id) == ("c10d", 1, 4, "x")
    assert worker_args(cfg) == ["-m", "fastlaunch.rank.worker", "/s/train.py", "--x", ""]


def test_engine_chatter_is_quiet_down_to_torchs_module_loggers():
    import logging

    import torch.distributed.elastic.agent.server.api  # noqa: F401  (its logger sets its own WARNING level)

    from fastlaunch.launcher.engine import _quiet_engine

    _quiet_engine(False)
    for name in ("torch.distributed.elastic.agent.server.api", "torch.distributed.elastic.multiprocessing.api"):
        assert logging.getLogger(name).getEffectiveLevel() == logging.CRITICAL, name


def test_launcher_lines_after_rank_zero_start_on_a_fresh_line(tmp_path):
    import io

    from fastlaunch.launcher.logs import ConsoleFollower

    log = tmp_path / "rank0.log"
    log.write_bytes(b"epoch 0 done\nEpoch 1/1 : |\xe2\x96\x88\xe2\x96\x88------| 40.00% [2/5 00:01<00:01]")
    out = io.StringIO()
    with ConsoleFollower(out, interval=0.01) as follower:
        follower.follow(log)
    assert out.getvalue().endswith("[2/5 00:01<00:01]\n")  # the unfinished bar is ended before our lines


def test_a_rank_stopped_by_the_engine_or_a_signal_is_never_the_culprit_nor_its_status(tmp_path, capsys):
    from fastlaunch.launcher.outcome import summarize_failure

    # the peer the engine stopped left with 75 (its SIGTERM handler) and no record: the recorded rank is named
    failures = {0: _failure(75, "", 5), 1: _failure(1, "RuntimeError: same everywhere", 6, 6.1)}
    assert root_cause(failures) == 1
    err = types.SimpleNamespace(failures=failures)
    assert summarize_failure(err, RankLogsSpecs(tmp_path), console_rank=0, stopped=set()) == 1
    said = capsys.readouterr().err
    assert "rank 1 failed (exit code 1)" in said and "rank 0 stopped as a consequence" in said, said
    # no rank recorded anything: the job's status is never 75 (that asks Slurm to requeue a broken script)
    err = types.SimpleNamespace(failures={0: _failure(75, "", 5), 1: _failure(3, "", 6)})
    assert summarize_failure(err, RankLogsSpecs(tmp_path), console_rank=0, stopped=set()) == 3
    err = types.SimpleNamespace(failures={0: _failure(75, "", 5)})
    assert summarize_failure(err, RankLogsSpecs(tmp_path), console_rank=0, stopped=set()) == 1
    said = capsys.readouterr().err
    assert "To enable traceback" not in said and "stopped by a signal with status 75" in said, said
    assert "rank 1 failed (exit code 3): exited with status 3 without a Python error" in said, said
