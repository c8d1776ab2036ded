"""Checkpoints of a fit in progress: written by rank 0 atomically, checked, read back to resume mid-epoch.

Trust model. A checkpoint is `<name>.pt` (the model, the optimizer, the recorder, rank 0's random states)
and `<name>.json`, its manifest: where the fit was (fit index, epoch, batches done), the run it belongs
to, versions, and the SHA-256 and size of the .pt file. The .pt file holds tensors, numbers, strings and
plain containers only and is read with `weights_only=True`: nothing in it can run code. The launcher
reads manifests, never unpickles; a checkpoint whose manifest is missing, names another run, or whose
file fails the hash (truncated, corrupted, half-written) is reported in one line and skipped for the
newest good one. Both files are written to temporary names and renamed, the manifest last.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from .lines import rank_warning

__all__ = ["write_atomic", "snapshot", "save", "latest", "load", "checkpoint_dir", "keep_last", "plain", "manifest_of",
           "set_rng", "BadCheckpoint", "remove_stale_temporaries"]

FORMAT = 2


class BadCheckpoint(Exception):
    """A checkpoint that must not be used: why, in a few words."""


def checkpoint_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_tmp(obj: Any, path: Path, dump: Callable[[Any, Any], None] | None = None) -> Path:
    """Write obj (torch.save, or `dump`) to a temporary name beside path, fsynced; return that name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            (dump or torch.save)(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def write_atomic(obj: Any, path: Path, dump: Callable[[Any, Any], None] | None = None) -> Path:
    """Write obj to a temporary file in the same folder, fsync, then rename over the final name."""
    os.replace(_write_tmp(obj, path, dump), path)
    return path


def _json_dump(obj: Any, fh) -> None:
    fh.write(json.dumps(obj).encode())


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


def _rng() -> dict:
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
        "rng": _rng(),
    }


def _fastai_version() -> str | None:
    fastai = sys.modules.get("fastai")
    return getattr(fastai, "__version__", None)


def manifest_of(path: Path) -> dict:
    """A checkpoint's manifest (where it was: fit, epoch, batch; its hash)."""
    return json.loads(_manifest_path(path).read_text())


def _manifest_path(path: Path) -> Path:
    return path.with_suffix(".json")


def remove_stale_temporaries(folder: Path) -> None:
    """Temporary files of writers that died (a kill during a write) are removed."""
    for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
        try:
            pid = int(tmp.name.rsplit(".", 2)[-2])
        except ValueError:
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            tmp.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def save(state: dict, run_dir: Path, name: str) -> Path | None:
    """Write checkpoints/<name>.pt and its manifest; on a write error (disk full, read-only), say so in one
    line, keep the previous checkpoint as it was, and return None. Both files are complete under their
    temporary names before either is renamed, the manifest last: a kill in between leaves a file whose
    hash its manifest does not match, which is skipped."""
    path = checkpoint_dir(run_dir) / f"{name}.pt"
    remove_stale_temporaries(path.parent)
    tmps: list[Path] = []
    try:
        tmps.append(_write_tmp(state, path))
        manifest = {"format": FORMAT, "run": Path(run_dir).resolve().name, "file": path.name,
                    "sha256": _sha256(tmps[0]), "size": tmps[0].stat().st_size,
                    **{k: state[k] for k in ("fit_index", "epoch", "iter", "n_epoch", "time")},
                    "seed": state.get("seed"), "torch": torch.__version__, "fastai": _fastai_version()}
        tmps.append(_write_tmp(manifest, _manifest_path(path), dump=_json_dump))
        os.replace(tmps[0], path)
        os.replace(tmps[1], _manifest_path(path))
    except OSError as err:
        need = sum(t.numel() * t.element_size() for t in state.get("model", {}).values()) / 1e6
        rank_warning(f"fastlaunch: could not write checkpoint {path}: {err.strerror or err} (about {need:.0f} MB "
                     f"needed); the previous checkpoint is kept")
        return None
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return path


def verify(path: Path, run_dir: Path, manifest: dict | None = None) -> dict:
    """The manifest of a checkpoint that can be used, or BadCheckpoint saying why not (`manifest`: its
    manifest when the caller has read it already)."""
    if manifest is None:
        try:
            manifest = json.loads(_manifest_path(path).read_text())
        except (OSError, ValueError):
            raise BadCheckpoint("its manifest is missing or unreadable") from None
    if manifest.get("format") != FORMAT or manifest.get("file") != path.name:
        raise BadCheckpoint("its manifest is not one of this version for this file")
    if manifest.get("run") != Path(run_dir).resolve().name:
        raise BadCheckpoint(f"its manifest names another run ({manifest.get('run')})")
    if not path.is_file() or path.stat().st_size != manifest.get("size") or _sha256(path) != manifest.get("sha256"):
        raise BadCheckpoint("it is truncated or corrupted (its hash differs from its manifest)")
    try:
        torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001  (the unpickler's refusal, or a broken archive)
        raise BadCheckpoint(f"it holds more than tensors and plain data ({type(err).__name__})") from None
    return manifest


def latest(run_dir: Path, say: Callable[[str], None] | None = None) -> Path | None:
    """The good checkpoint furthest into the run; each newer one that fails verify() is said in one line."""
    folder = checkpoint_dir(run_dir)
    remove_stale_temporaries(folder)
    candidates = []
    for path in (folder.glob("*.pt") if folder.is_dir() else []):
        if path.name.startswith("."):  # a temporary file of a write that never finished
            continue
        try:
            manifest = json.loads(_manifest_path(path).read_text())
            key = (manifest["fit_index"], manifest["epoch"], manifest["iter"], manifest["time"])
        except (OSError, ValueError, KeyError, TypeError):
            if say is not None:  # never used: without its manifest nothing says where it was or vouches for it
                say(f"fastlaunch: skipping checkpoint {path}: its manifest is missing or unreadable")
            continue
        candidates.append((key, path, manifest))
    for _, path, manifest in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            verify(path, run_dir, manifest)
        except BadCheckpoint as why:
            if say is not None:
                say(f"fastlaunch: skipping checkpoint {path}: {why}")
            continue
        return path
    return None


def load(path: Path) -> dict:
    """A checkpoint's content: tensors and plain data only (weights_only=True)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def keep_last(run_dir: Path, k: int, prefix: str = "epoch") -> None:
    """Delete all but the newest k per-epoch checkpoints (with their manifests)."""
    folder = checkpoint_dir(run_dir)
    epochs = sorted(folder.glob(f"{prefix}*.pt"), key=lambda p: p.stat().st_mtime)
    for old in epochs[:-k] if k > 0 else []:
        old.unlink(missing_ok=True)
        _manifest_path(old).unlink(missing_ok=True)
