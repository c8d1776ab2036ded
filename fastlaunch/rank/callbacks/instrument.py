"""Per-rank measurements of every real fit: memory, syncs per step, data wait, step and work time.

Nothing here syncs or collects per batch: step and backward times come from timing.py (host clock on CPU
ranks, CUDA events read once per epoch on GPU ranks), the data wait from the loader's own `next`, syncs
from the counters of syncs.py (and, on GPU ranks, CUDA's own audit of a few steps of the first epoch).
Once per epoch each rank appends one record to metrics/rank<R>.jsonl, waits at one barrier (how long
tells who arrived last), and sends its summary to rank 0 for the console table.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ...device import probe_gpus
from ...heartbeat import space_left
from ...lines import rank_warning
from ..instrument import memory, syncs
from ..instrument.audit import SyncAudit
from ..instrument.timing import Clock
from .base import LeanCallback

__all__ = ["Instrument", "TimedLoader"]


class TimedLoader:
    """Wraps a DataLoader; records how long each `next` waits (the data wait, measured at the loader)."""

    def __init__(self, dl, waits: list, counter: syncs.SyncCounter | None = None):
        self._dl, self._waits, self._counter = dl, waits, counter

    def __iter__(self):
        it = iter(self._dl)
        counter = self._counter
        while True:
            start = time.perf_counter()
            if counter is not None:
                counter.override = "DataLoader"  # what the audit sees now is the loader's (its copy to the GPU)
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                if counter is not None:
                    counter.override = None
            self._waits.append(time.perf_counter() - start)
            yield batch

    def __len__(self):
        return len(self._dl)

    def __getattr__(self, name):
        return getattr(self._dl, name)


class Instrument(LeanCallback):
    """Measures each real fit on every rank (off with --no-instrument)."""

    order = 220  # after the checkpoints of the epoch
    _on = False  # measuring this fit (set in before_fit)
    quiet = frozenset({"before_batch", "before_backward", "after_backward", "after_batch"})  # measured fits only

    def before_fit(self):
        ctx = self.ctx
        denv = ctx.env
        self._on = denv.instrument and ctx.fit_of(self.learn) is not None and denv.run_dir is not None
        self.listen(*self.quiet, on=self._on)
        if not self._on:
            return
        if ctx.syncs is None:
            ctx.syncs = syncs.SyncCounter(denv.device_type)
            ctx.syncs.install()
        self._counter = ctx.syncs
        self._path = denv.run_dir / "metrics" / f"rank{denv.rank}.jsonl"
        self._visible = probe_gpus().count if denv.device_type == "cpu" else None
        self._clock = Clock(denv.device_type)
        self._audit = SyncAudit(denv.device_type, source=lambda: self._counter.source)  # first epoch, GPU ranks
        self._audit_due = True
        self._nvml = memory.open_nvml() if denv.device_type == "cuda" else None

    def before_train(self):
        if not self._on:
            return
        self._waits, self._steps, self._started, self._audited = [], 0, False, {}
        self._clock.reset()
        self._counter.take()
        self.learn.dl = TimedLoader(self.learn.dl, self._waits, self._counter)

    def before_batch(self):
        if self._on and self.training and self._started:
            self._counter.counting = True  # steady state: the epoch's first step is left out

    def before_backward(self):
        if self._on and self._started:
            self._clock.begin("backward")

    def after_backward(self):
        if self._on and self._started:
            self._clock.end("backward")  # includes waiting for slower ranks at the gradient all-reduce

    def after_batch(self):
        if not self._on or not self.training:
            return
        self._counter.counting = False
        if not self._started:
            self._started = True
            self._clock.begin("window")
            if self._audit_due:
                self._audit_due = not self._audit.start()
            return
        self._steps += 1
        if self._audit.step_done():
            self._audited = self._audit.stop()

    def after_train(self):
        if not self._on:
            return
        self._counter.counting = False
        self._audited = self._audit.stop() or self._audited
        self._clock.end("window")
        times = self._clock.totals()
        window, backward = times.get("window", 0.0), times.get("backward", 0.0)
        self.learn.dl = self.learn.dl._dl if isinstance(self.learn.dl, TimedLoader) else self.learn.dl
        steps = max(self._steps, 1)
        counts = self._counter.take()
        self._train = {
            "steps": self._steps, "step_time": window / steps, "work_time": (window - backward) / steps,
            "clock": "cuda events" if self._clock.events else "host",
            "data_wait_frac": sum(self._waits[1:]) / window if window else 0.0,
            "syncs_per_step": sum(counts.values()) / steps,
            "by_design_syncs_per_step": sum(n for (_, how), n in counts.items() if syncs.by_design(how)) / steps,
            "sync_sources": {f"{src} ({how})": n / steps for (src, how), n in counts.most_common(5)},
            "num_workers": getattr(getattr(self.dl, "fake_l", None), "num_workers", 0), **self._audited,
        }

    def after_fit(self):
        if self._on:
            self._audit.stop()  # a fit cancelled inside the window leaves no debug mode behind

    def after_epoch(self):
        if not self._on or not hasattr(self, "_train"):
            return
        denv, comm = self.ctx.env, self.ctx.comm
        start = time.perf_counter()
        comm.barrier()  # how long each rank waits here tells who arrived last
        run = self.ctx.fit_of(self.learn)
        record = {"rank": denv.rank, "node": denv.node_rank, "attempt": denv.restart_count,
                  "fit": run.index if run is not None else 0, "epoch": self.epoch,
                  "time": time.time(),
                  "device": denv.device_type, "visible_gpus": self._visible, "cores": denv.cpus_per_rank,
                  "node_cores": denv.node_cores, "local_ranks": denv.local_world_size,
                  "epoch_end_wait": time.perf_counter() - start, **self._train,
                  **memory.sample(denv.device_type, denv.local_rank, nvml=self._nvml)}
        self._append(self._path, record)
        summaries = comm.gather_to_rank_zero(record)
        for other in summaries or []:  # rank 0's run directory holds the whole world's records
            if other.get("node", 0) != denv.node_rank:
                self._append(self._path.parent / f"rank{other['rank']}.jsonl", other)
        if summaries is not None and denv.is_distributed:
            cells = "  ".join(f"r{s['rank']}: {s['step_time'] * 1000:.0f} ms, wait {s['data_wait_frac']:.0%}, "
                              f"{s['syncs_per_step']:.1f} syncs, {s['rss_mb']:.0f} MB" for s in summaries)
            self.ctx.say(f"fastlaunch: epoch {self.epoch} per rank | {cells}")
        del self._train

    def _append(self, path: Path, record: dict) -> None:
        """One record onto a metrics file, whole or not at all: on a full disk the file is cut back to what
        it held, one line says so (once per file), and the run goes on without those figures."""
        data = (json.dumps(record) + "\n").encode()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o666)
            try:
                start = os.lseek(fd, 0, os.SEEK_END)
                try:
                    while data:
                        data = data[os.write(fd, data):]
                except OSError:
                    os.ftruncate(fd, start)
                    raise
            finally:
                os.close(fd)
        except OSError as err:
            said, line = self.ctx.said, f"fastlaunch: could not write metrics to {path}"
            if line not in said:
                said.add(line)
                rank_warning(f"{line}: {err.strerror or err} ({space_left(path.parent)}); training goes on, the "
                             "report will lack these epochs")
