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


def images(n: int = N_ITEMS, seed: int = 0):
    """n synthetic 3x32x32 images in 10 classes (a pattern per class, plus noise)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=g)
    base = torch.randn(10, 3, 32, 32, generator=g)
    x = base[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    return [(x[i], y[i]) for i in range(n)]


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


class StepClock:
    """Host-clock timings of the training steps of one rank."""

    def __init__(self):
        self.first = None
        self.steps = 0
        self.t_warm = None
        self.t_last = None

    def step(self):
        now = time.time()
        if self.first is None:
            self.first = now
            folder = Path(os.environ["BENCH_OUT"])
            (folder / f"started-rank{os.environ.get('RANK', 0)}").touch()
        self.steps += 1
        if self.steps == WARMUP:
            self.t_warm = now
        self.t_last = now

    def write(self, tag: str, extra: dict | None = None):
        rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        measured = self.steps - WARMUP
        out = {"first_step": self.first, "steps": self.steps, "world": world,
               "samples_per_s": measured * BS * world / (self.t_last - self.t_warm) if measured > 0 else None,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **(extra or {})}
        folder = Path(os.environ["BENCH_OUT"])
        (folder / f"{tag}-rank{rank}.json").write_text(json.dumps(out))


def maybe_crash(step: int):
    """BENCH_CRASH=1: rank 1 raises at its 5th step, after writing when it did."""
    if os.environ.get("BENCH_CRASH") == "1" and os.environ.get("RANK") == "1" and step == 5:
        (Path(os.environ["BENCH_OUT"]) / "crash_time").write_text(str(time.time()))
        raise RuntimeError("benchmark crash on rank 1")
