"""Per-rank measurements of every real fit: memory, syncs per step, data wait, step and work time.

Nothing here syncs or collects per batch: times are host clocks (perf_counter) on CPU ranks, syncs are
counted by wrappers, and once per epoch each rank appends one record to metrics/rank<R>.jsonl, waits at
one barrier (how long tells who arrived last), and sends its summary to rank 0 for the console table.
"""
from __future__ import annotations

import json
import time

from fastai.callback.core import Callback

from .. import comm
from ..device import probe_gpus
from ..instrument import memory, syncs
from .placement import in_real_fit

__all__ = ["Instrument", "TimedLoader"]


class TimedLoader:
    """Wraps a DataLoader; records how long each `next` waits (the data wait, measured at the loader)."""

    def __init__(self, dl, waits: list):
        self._dl, self._waits = dl, waits

    def __iter__(self):
        it = iter(self._dl)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            self._waits.append(time.perf_counter() - start)
            yield batch

    def __len__(self):
        return len(self._dl)

    def __getattr__(self, name):
        return getattr(self._dl, name)


class Instrument(Callback):
    """Measures each real fit on every rank (off with --no-instrument)."""

    order = 220  # after the checkpoints of the epoch

    def before_fit(self):
        denv = comm.current_env()
        self._on = denv.instrument and in_real_fit(self.learn) and denv.run_dir is not None
        if not self._on:
            return
        if syncs.counter is None:
            syncs.counter = syncs.SyncCounter(denv.device_type)
            syncs.counter.install()
        self._path = denv.run_dir / "metrics" / f"rank{denv.rank}.jsonl"
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._visible = probe_gpus().count if denv.device_type == "cpu" else None

    def before_train(self):
        if not getattr(self, "_on", False):
            return
        self._waits, self._backward_time, self._steps, self._started = [], 0.0, 0, None
        syncs.counter.take()
        self.learn.dl = TimedLoader(self.learn.dl, self._waits)

    def before_batch(self):
        if getattr(self, "_on", False) and self.training and self._started is not None:
            syncs.counter.counting = True  # steady state: the epoch's first step is left out

    def before_backward(self):
        if getattr(self, "_on", False) and self._started is not None:
            self._t_backward = time.perf_counter()

    def after_backward(self):
        if getattr(self, "_on", False) and self._started is not None:
            self._backward_time += time.perf_counter() - self._t_backward  # includes waiting for slower ranks

    def after_batch(self):
        if not getattr(self, "_on", False) or not self.training:
            return
        syncs.counter.counting = False
        if self._started is None:
            self._started = time.perf_counter()
        else:
            self._steps += 1

    def after_train(self):
        if not getattr(self, "_on", False):
            return
        syncs.counter.counting = False
        window = time.perf_counter() - self._started if self._started else 0.0
        self.learn.dl = self.learn.dl._dl if isinstance(self.learn.dl, TimedLoader) else self.learn.dl
        steps = max(self._steps, 1)
        counts = syncs.counter.take()
        self._train = {
            "steps": self._steps, "step_time": window / steps,
            "work_time": (window - self._backward_time) / steps,
            "data_wait_frac": sum(self._waits[1:]) / window if window else 0.0,
            "syncs_per_step": sum(counts.values()) / steps,
            "sync_sources": {f"{src} ({how})": n / steps for (src, how), n in counts.most_common(5)},
            "num_workers": getattr(getattr(self.dl, "fake_l", None), "num_workers", 0),
        }

    def after_epoch(self):
        if not getattr(self, "_on", False) or not hasattr(self, "_train"):
            return
        denv = comm.current_env()
        start = time.perf_counter()
        comm.barrier()  # how long each rank waits here tells who arrived last
        record = {"rank": denv.rank, "attempt": denv.restart_count, "epoch": self.epoch, "time": time.time(),
                  "device": denv.device_type, "visible_gpus": self._visible, "cores": denv.cpus_per_rank,
                  "epoch_end_wait": time.perf_counter() - start, **self._train,
                  **memory.sample(denv.device_type, denv.local_rank)}
        with open(self._path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
        summaries = comm.gather_to_rank_zero(record)
        if summaries is not None and denv.is_distributed:
            cells = "  ".join(f"r{s['rank']}: {s['step_time'] * 1000:.0f} ms, wait {s['data_wait_frac']:.0%}, "
                              f"{s['syncs_per_step']:.1f} syncs, {s['rss_mb']:.0f} MB" for s in summaries)
            print(f"fastlaunch: epoch {self.epoch} per rank | {cells}", flush=True)
        del self._train
