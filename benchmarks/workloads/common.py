"""What every benchmark workload shares: the data, the model, and how a rank reports its timings."""
import json
import os
import resource
import time
from pathlib import Path

import torch
from torch import nn

N_ITEMS = int(os.environ.get("BENCH_ITEMS", 2048))
BS = 64
WARMUP = 3  # steps left out: DDP rebuilds its buckets after the first one
TINY_BS, TINY_WARMUP = 8, 20  # the tiny step: batch 8 per rank, more steps left out (each is short)
TINY_STEPS = int(os.environ.get("BENCH_STEPS", 1500))  # training steps per rank in the tiny step's one epoch


def images(n: int = N_ITEMS, seed: int = 0):
    """n synthetic 3x32x32 images in 10 classes (a pattern per class, plus noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    base = torch.randn(10, 3, 32, 32, generator=g)
    x = base[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    return [(x[i], y[i]) for i in range(n)]


def tiny_data(steps: int = TINY_STEPS, valid: int = 64, seed: int = 0):
    """Training and validation items of 16 features in 2 classes: `steps` batches of TINY_BS per rank."""
    g = torch.Generator().manual_seed(seed)
    n = steps * TINY_BS * int(os.environ.get("WORLD_SIZE", 1))
    x = torch.randn(n + valid, 16, generator=g)
    y = (x[:, 0] > 0).long()
    items = [(x[i], y[i]) for i in range(n + valid)]
    return items[:n], items[n:]


def tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(16, 2)


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class StepClock:
    """Host-clock and CPU-time timings of the training steps of one rank, the first `warmup` left out."""

    def __init__(self, bs: int = BS, warmup: int = WARMUP):
        self.bs, self.warmup = bs, warmup
        self.first = None
        self.steps = 0
        self.t_warm = self.t_last = 0.0
        self.cpu_warm = self.cpu_last = self.proc_warm = self.proc_last = 0.0

    def step(self):
        now, cpu, proc = time.time(), time.thread_time(), time.process_time()  # cpu: this (the main) thread's
        if self.first is None:
            self.first = now
            folder = Path(os.environ["BENCH_OUT"])
            (folder / f"started-rank{os.environ.get('RANK', 0)}").touch()
        self.steps += 1
        if self.steps == self.warmup:
            self.t_warm, self.cpu_warm, self.proc_warm = now, cpu, proc
        self.t_last, self.cpu_last, self.proc_last = now, cpu, proc

    def write(self, tag: str, extra: dict | None = None):
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        measured = self.steps - self.warmup
        wall = self.t_last - self.t_warm
        timed = measured > 0 and wall > 0
        out = {"first_step": self.first, "steps": self.steps, "world": world,
               "samples_per_s": measured * self.bs * world / wall if timed else None,
               "steps_per_s": measured / wall if timed else None,
               "cpu_ms_per_step": (self.cpu_last - self.cpu_warm) * 1000 / measured if measured > 0 else None,
               "process_cpu_ms_per_step": (self.proc_last - self.proc_warm) * 1000 / measured if measured > 0 else None,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **(extra or {})}
        folder = Path(os.environ["BENCH_OUT"])
        (folder / f"{tag}-rank{rank}.json").write_text(json.dumps(out))


def maybe_crash(step: int):
    """BENCH_CRASH=1: rank 1 raises at its 5th step, after writing when it did."""
    if os.environ.get("BENCH_CRASH") == "1" and os.environ.get("RANK") == "1" and step == 5:
        (Path(os.environ["BENCH_OUT"]) / "crash_time").write_text(str(time.time()))
        raise RuntimeError("benchmark crash on rank 1")
