"""What a checkpoint of a fit holds, taken from a Learner as plain data (tensors, numbers, strings, plain
containers: what torch's weights_only loader reads back) and the random states put back; the files
themselves are `fastlaunch/checkpoint.py`'s."""
from __future__ import annotations

import random
import time
from typing import Any

import numpy as np
import torch

from ..checkpoint import FORMAT

__all__ = ["plain", "snapshot", "set_rng", "rng_states"]


def plain(obj: Any) -> Any:
    """obj with numpy values and fastai's lists made plain, so that weights_only=True reads it back."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {plain(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, tuple):
        return tuple(plain(v) for v in obj)
    if isinstance(obj, (list, range)) or type(obj).__name__ == "L":
        return [plain(v) for v in obj]
    return obj


def rng_states() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state(legacy=True)
    keys = np.asarray(keys, dtype=np.int64)
    return {"python": plain(random.getstate()), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys), "pos": int(pos),
                      "has_gauss": int(has_gauss), "gauss": float(gauss)}}


def set_rng(saved: dict) -> None:
    """Put back the random states a snapshot took."""
    version, state, gauss = saved["python"]
    random.setstate((version, tuple(state), gauss))
    n = saved["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(saved["torch"])


def snapshot(learn, fit_index: int, epoch: int, batches_done: int, seed: int | None = None) -> dict:
    """Everything needed to continue this fit at (epoch, batches_done), as plain data."""
    model = getattr(learn.model, "module", learn.model)
    rec = learn.recorder
    return {
        "version": FORMAT, "time": time.time(), "fit_index": fit_index, "epoch": epoch, "iter": batches_done,
        "n_epoch": learn.n_epoch, "seed": seed,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "opt": plain(learn.opt.state_dict()),
        "recorder": {"values": [list(map(float, row)) for row in rec.values],
                     "losses": [float(v) for v in rec.losses], "lrs": [float(v) for v in rec.lrs],
                     "iters": list(rec.iters), "smooth_count": int(rec.smooth_loss.count),
                     "smooth_val": float(rec.smooth_loss.val)},
        "rng": rng_states(),
    }
