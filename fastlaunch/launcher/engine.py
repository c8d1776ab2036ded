"""LaunchConfig -> torch elastic agent -> exit status, with rank 0 on the console and a failure summary."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import errno
import logging
import signal
import socket
import sys
import time
import uuid

from .. import heartbeat
from . import rendezvous
from ..config import STOPPED_BY_SIGNAL, LaunchConfig
from ..errors import UsageError
from ..env import environ_overlay, launcher_environ, stop_marker_request
from .autoresume import FINISHED
from .bars import tidy_log
from .failwatch import FailureWatch
from .hangwatch import HangWatch
from .logs import ConsoleFollower, RankLogsSpecs
from .outcome import consequences_of, root_cause, say_restart, script_exit_status, signal_status, summarize_failure, summarize_hang
from ..lines import launcher_line as say

__all__ = ["launch", "elastic_config", "worker_args"]

# SIGUSR1 is what Slurm sends before the time limit; the engine's default list omits it, and its
# default action would kill the launcher alone.
_HANDLED_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def worker_args(config: LaunchConfig) -> list[str]:
    """Arguments after the interpreter for every rank: the bootstrap, then the script's argv unchanged."""
    return ["-m", "fastlaunch.rank.worker", str(config.script), *config.script_args]


def elastic_config(config: LaunchConfig, logs_specs: RankLogsSpecs, port: int = 0):
    """The engine's own LaunchConfig.

    One node: fastlaunch's loopback rendezvous (rendezvous.py), its store on a socket bound to 127.0.0.1.
    Several nodes with --node-rank: the static rendezvous, which keeps node ranks (node 0 hosts the
    store and holds rank 0). Several nodes without it, or an elastic MIN:MAX range: the c10d
    rendezvous, which orders the nodes itself (node 0 need not hold rank 0).
    """
    from torch.distributed.launcher.api import LaunchConfig as ElasticConfig

    common: dict[str, Any] = dict(nproc_per_node=config.nproc_per_node, role="rank", max_restarts=config.max_restarts,
                  monitor_interval=0.1, logs_specs=logs_specs, shutdown_timeout=config.grace,
                  signals_to_handle=_HANDLED_SIGNALS)
    if not config.multi_node:
        return ElasticConfig(min_nodes=1, max_nodes=1, run_id=f"fastlaunch-{uuid.uuid4().hex[:12]}",
                             rdzv_backend=rendezvous.BACKEND, rdzv_endpoint=f"127.0.0.1:{port}",
                             local_addr="127.0.0.1", **common)
    if config.node_rank is not None:
        return ElasticConfig(min_nodes=config.min_nodes, max_nodes=config.max_nodes, run_id=config.rdzv_id,
                             rdzv_backend="static", rdzv_endpoint=config.rdzv_endpoint or "",
                             rdzv_configs={"rank": config.node_rank}, **common)
    return ElasticConfig(min_nodes=config.min_nodes, max_nodes=config.max_nodes, run_id=config.rdzv_id,
                         rdzv_backend="c10d", rdzv_endpoint=config.rdzv_endpoint or "", **common)


def _quiet_engine(verbose: bool) -> None:
    """The engine's own INFO/WARNING chatter stays off the console unless --verbose."""
    level = logging.INFO if verbose else logging.CRITICAL
    prefixes = ("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")
    # torch's module loggers set their own level (WARNING), so the parents' level alone does not hold them.
    names = [n for n in logging.root.manager.loggerDict if n.startswith(prefixes)]
    for name in set(prefixes) | set(names):
        logging.getLogger(name).setLevel(level)
    if verbose:
        logging.basicConfig(level=logging.INFO, format="fastlaunch(engine): %(message)s")


def _report_world(config: LaunchConfig) -> int:
    """The ranks the report accounts for: this node's on one node; on several, every rank where rank 0 ran
    (its run directory receives every rank's records) and a fixed number of nodes; else 0 (this node's view,
    naming no rank missing)."""
    if not config.multi_node:
        return config.nproc_per_node
    assert config.run_dir is not None
    holds_rank_zero = (config.run_dir / "logs" / "rank0.log").exists()
    return config.nproc_per_node * config.max_nodes if holds_rank_zero and config.min_nodes == config.max_nodes else 0


def _report(config: LaunchConfig, failed: list[int]) -> None:
    """report.json and report.png from the ranks' records; the diagnoses on the console."""
    from .report import build_report, render_text

    assert config.run_dir is not None  # the launcher made it before the ranks started
    try:
        report = build_report(config.run_dir, _report_world(config), failed,
                              ranks_per_node=config.nproc_per_node if config.multi_node else None)
    except Exception as err:  # a report must never hide the job's own outcome
        say(f"fastlaunch: no report ({type(err).__name__}: {err})")
        return
    if report["epochs"] or report["missing"]:
        say(render_text(report))


def _create_progress_file(progress: Path, local_ranks: int) -> None:
    """The ranks' heartbeat file, its bytes allocated: a full disk is a HINT error here, not a SIGBUS later."""
    try:
        heartbeat.create(progress, local_ranks)
    except OSError as err:
        progress.unlink(missing_ok=True)
        run_dir = progress.parent.parent
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            device, free = heartbeat.filesystem_of(run_dir)
            raise UsageError(f"no space left on {device} for the run directory", f"{run_dir}: {free} bytes free",
                             "free some space there, or pass --run-dir pointing elsewhere") from None
        raise UsageError("cannot write the run directory", f"{progress}: {err.strerror or err}",
                         "pass --run-dir pointing to a writable place") from None


def launch(config: LaunchConfig, listener: socket.socket | None = None) -> int:
    """Start the ranks through the elastic agent; return the job's exit status.

    On one node, `listener` is the socket fastlaunch bound on 127.0.0.1 for the rendezvous store.
    """
    assert config.run_dir is not None, "prepare_run_dir before launch"
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import elastic_launch

    progress = heartbeat.progress_file(config.run_dir)
    try:
        _create_progress_file(progress, config.nproc_per_node)
    except UsageError as err:  # before any rank starts
        print(err, file=sys.stderr)
        return err.exit_code
    for note in config.notes:
        say(note)
    nodes = "" if not config.multi_node else (
        f" x {config.max_nodes} nodes (this is node {config.node_rank}, rendezvous {config.rdzv_endpoint})"
        if config.node_rank is not None else
        f" x {config.min_nodes}:{config.max_nodes} nodes (rendezvous {config.rdzv_endpoint})")
    say(f"fastlaunch: {config.nproc_per_node} rank{'s' if config.nproc_per_node > 1 else ''} on "
          f"{config.device}{nodes}, run dir {config.run_dir}")
    _quiet_engine(config.verbose)
    follower = ConsoleFollower(sys.stdout)
    logs_specs = RankLogsSpecs(config.run_dir / "logs", console_rank=0, on_console_log=follower.follow)
    started = time.monotonic()
    status, failed = 0, []
    port = 0
    if not config.multi_node:
        listener = listener or rendezvous.bind_loopback(config.port)
        rendezvous.register()
        port = listener.getsockname()[1]
        rendezvous.hand_over(listener)
    watch = HangWatch(progress, config.hang_timeout)
    failwatch = FailureWatch(logs_specs.error_files, progress, on_failure=say_restart(config.max_restarts))
    environ = launcher_environ()
    try:
        with environ_overlay(config.to_env(environ)), follower, watch, failwatch:
            elastic_launch(elastic_config(config, logs_specs, port), sys.executable)(*worker_args(config))
    except ChildFailedError as err:
        own = script_exit_status(err) if not watch.verdict else None
        if own is not None:  # sys.exit(N) on every rank: the script's own status, no rank to blame
            say(f"fastlaunch: the script exited with status {own} on every rank")
            status = own
        else:
            stopped = consequences_of(err, failwatch.consequences())
            status = summarize_hang(watch.verdict, logs_specs, watch.stack_taken) if watch.verdict else \
                summarize_failure(err, logs_specs, console_rank=0, stopped=stopped)
            failed = [watch.verdict[0].rank] if watch.verdict else [root_cause(err.failures, stopped)]
    except KeyboardInterrupt:
        say("fastlaunch: interrupted; ranks stopped")
        status = 130
    except SignalException as caught:
        name = signal.Signals(caught.sigval).name
        say(f"fastlaunch: {name} received; ranks stopped")
        status = signal_status(caught.sigval, logs_specs.log_dir, sorted(logs_specs.error_files()))
    for log in logs_specs.log_dir.glob("rank*.log"):  # the ranks are gone: each bar in its final state
        tidy_log(log)
    # The ranks are gone: a late stop (srun ending the step on another node's exit) must not turn this
    # node's status into 143 while the report is written.
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    marker = stop_marker_request(environ)
    if status == STOPPED_BY_SIGNAL and marker is not None:
        # for a Slurm job script: srun may kill this task before its exit status is seen (several nodes)
        marker.touch()
    if config.instrument:
        _report(config, failed)
    for sig, handler in saved.items():
        if handler is not None:
            signal.signal(sig, handler)
    if status == 0:
        if config.auto_resume:  # a later start of this job must not resume it again
            (config.run_dir / FINISHED).write_text(f"start {config.start}\n")
        say(f"fastlaunch: done in {time.monotonic() - started:.1f}s; run dir {config.run_dir}")
    return status
