"""Checkpoints of a fit in progress: written by rank 0 atomically, read back to resume mid-epoch.

A checkpoint holds the model, the optimizer, where the fit was (which fit of the script, epoch, batches
done), the recorder, and rank 0's random states. It is written to a temporary name and renamed, so a
kill during the write never leaves a file that loads half-written.
"""
from __future__ import annotations

import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["write_atomic", "snapshot", "save", "latest", "load", "checkpoint_dir", "keep_last"]


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def write_atomic(obj: Any, path: Path) -> Path:
    """torch.save to a temporary file in the same folder, fsync, then rename over the final name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def snapshot(learn, fit_index: int, epoch: int, batches_done: int) -> dict:
    """Everything needed to continue this fit at (epoch, batches_done)."""
    model = getattr(learn.model, "module", learn.model)
    rec = learn.recorder
    return {
        "version": 1, "time": time.time(), "fit_index": fit_index, "epoch": epoch, "iter": batches_done,
        "n_epoch": learn.n_epoch,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "opt": learn.opt.state_dict(),
        "recorder": {"values": [list(map(float, row)) for row in rec.values],
                     "losses": [float(v) for v in rec.losses], "lrs": [float(v) for v in rec.lrs],
                     "iters": list(rec.iters), "smooth_count": rec.smooth_loss.count,
                     "smooth_val": float(rec.smooth_loss.val)},
        "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
    }


def save(state: dict, run_dir: Path, name: str) -> Path:
    """Write a snapshot as checkpoints/<name>.pt."""
    return write_atomic(state, checkpoint_dir(run_dir) / f"{name}.pt")


def _position(path: Path) -> tuple:
    state = torch.load(path, map_location="cpu", weights_only=False, mmap=True)  # no full read of the weights
    return state["fit_index"], state["epoch"], state["iter"], state["time"]


def latest(run_dir: Path) -> Path | None:
    """The checkpoint furthest into the run (temporary files are never candidates)."""
    folder = checkpoint_dir(run_dir)
    found = [p for p in folder.glob("*.pt") if not p.name.startswith(".")] if folder.is_dir() else []
    return max(found, key=_position, default=None)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=False)


def keep_last(run_dir: Path, k: int, prefix: str = "epoch") -> None:
    """Delete all but the newest k per-epoch checkpoints."""
    folder = checkpoint_dir(run_dir)
    epochs = sorted(folder.glob(f"{prefix}*.pt"), key=lambda p: p.stat().st_mtime)
    for old in epochs[:-k] if k > 0 else []:
        old.unlink(missing_ok=True)
