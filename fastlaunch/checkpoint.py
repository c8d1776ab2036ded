"""Checkpoints of a fit in progress: written by rank 0 atomically, checked, read back to resume mid-epoch.

Trust model. A checkpoint is `<name>.pt` (the model, the optimizer, the recorder, rank 0's random states:
tensors, numbers, strings and plain containers) and `<name>.json`, its manifest (where the fit was, the run
it belongs to, versions, the SHA-256 and size of the .pt file), JSON whose fields are checked for type. No
one unpickles a .pt file but torch's `weights_only=True` loader, which builds tensors and plain data and
refuses anything else: nothing in it can run code. Every reader (the launcher choosing a checkpoint, each
rank loading it) reads the file's bytes once, checks their size and hash against the manifest, and loads
those same bytes: a file swapped after the launcher checked it is refused where it is loaded. A checkpoint
whose manifest is missing, malformed or names another run, whose file fails the hash or holds more than
plain data, or that is (or lies in) a symbolic link, is said in one line and skipped for the newest good
one. Both files are written to fresh temporary names and renamed, the manifest last; a failed write (a
full disk) is one line and leaves the previous checkpoint as it was.
"""
from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
import stat
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from .heartbeat import space_left
from .lines import rank_warning

__all__ = ["write_atomic", "save", "latest", "load", "checkpoint_dir", "keep_last", "manifest_of", "BadCheckpoint",
           "remove_stale_temporaries", "FORMAT"]

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


def _read(path: Path, what: str, limit: int | None = None) -> bytes:
    """The bytes of the file path itself (never through a symbolic link), at most limit + 1 of them."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise BadCheckpoint(f"{what} is not a file")
            return fh.read() if limit is None else fh.read(limit + 1)
    except OSError as err:
        raise BadCheckpoint(f"{what} is a symbolic link" if err.errno == errno.ELOOP else
                            f"{what} is missing or unreadable ({err.strerror or err})") from None


def _check_folder(folder: Path) -> None:
    """checkpoints/ itself, never a symbolic link to a folder elsewhere."""
    if folder.is_symlink():
        raise BadCheckpoint(f"{folder} is a symbolic link")


def _write_tmp(obj: Any, path: Path, dump: Callable[[Any, Any], None] | None = None) -> Path:
    """Write obj (torch.save, or `dump`) to a temporary name beside path, fsynced; return that name. The
    temporary file is created anew (never through a symbolic link) and removed if the write fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666)
        with os.fdopen(fd, "wb") as fh:
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


# The manifest's fields that are read, with their types (a bool is no number here).
_FIELDS: dict[str, tuple[type, ...]] = {
    "format": (int,), "run": (str,), "file": (str,), "sha256": (str,), "size": (int,), "fit_index": (int,),
    "epoch": (int,), "iter": (int,), "n_epoch": (int,), "time": (int, float)}
_MANIFEST_LIMIT = 1 << 16  # a manifest is a few hundred bytes


def manifest_of(path: Path) -> dict:
    """A checkpoint's manifest (where it was: fit, epoch, batch; its hash), its fields checked; a missing,
    malformed or linked one is BadCheckpoint."""
    data = _read(_manifest_path(path), "its manifest", _MANIFEST_LIMIT)
    try:
        if len(data) > _MANIFEST_LIMIT:
            raise ValueError("too large")
        manifest = json.loads(data)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to read
        raise BadCheckpoint("its manifest is missing or unreadable") from None
    if not isinstance(manifest, dict):
        raise BadCheckpoint(f"its manifest is malformed (a {type(manifest).__name__}, not an object)")
    for key, kinds in _FIELDS.items():
        value = manifest.get(key)
        if isinstance(value, bool) or not isinstance(value, kinds) or (isinstance(value, int) and value < 0) or \
                (isinstance(value, float) and not math.isfinite(value)):
            raise BadCheckpoint(f"its manifest is malformed ({key} is {value!r:.30})")
    if len(manifest["sha256"]) != 64 or manifest["sha256"].strip("0123456789abcdef"):
        raise BadCheckpoint("its manifest is malformed (sha256: not a SHA-256 in hex)")
    return manifest


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
        pass
    return True


def _write_failure(err: BaseException) -> str | None:
    """What a failed write says (a disk full, a read-only filesystem), or None for an error that is not a
    write's: torch.save reports a failed write as a RuntimeError, with the OSError behind it if any."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen)
        seen = seen.__cause__ or seen.__context__
    text = str(err).strip()
    return text.splitlines()[0] if "writ" in text.lower() else None


def save(state: dict, run_dir: Path, name: str) -> Path | None:
    """Write checkpoints/<name>.pt and its manifest; on a write error (disk full, read-only) or a linked
    checkpoints/ folder, say so in one line, keep the previous checkpoint as it was, and return None. Both
    files are complete under their temporary names before either is renamed, the manifest last: a kill in
    between leaves a file whose hash its manifest does not match, which is skipped."""
    path = checkpoint_dir(run_dir) / f"{name}.pt"
    tmps: list[Path] = []
    failed, need = "", ""
    try:
        _check_folder(path.parent)
        remove_stale_temporaries(path.parent)
        tmps.append(_write_tmp(state, path))
        manifest = {"format": FORMAT, "run": Path(run_dir).resolve().name, "file": path.name,
                    "sha256": _sha256(tmps[0]), "size": tmps[0].stat().st_size,
                    **{k: state[k] for k in ("fit_index", "epoch", "iter", "n_epoch", "time")},
                    "seed": state.get("seed"), "torch": torch.__version__,
                    "fastai": getattr(sys.modules.get("fastai"), "__version__", None)}
        tmps.append(_write_tmp(manifest, _manifest_path(path), dump=lambda obj, fh: fh.write(json.dumps(obj).encode())))
        _check_folder(path.parent)
        os.replace(tmps[0], path)
        os.replace(tmps[1], _manifest_path(path))
    except BadCheckpoint as why:
        failed = str(why)
    except (OSError, RuntimeError) as err:
        failed = _write_failure(err) or ""
        if not failed:
            raise
        need = f"about {sum(t.numel() * t.element_size() for t in state.get('model', {}).values()) / 1e6:.0f} MB"
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    if failed:  # the free space once its temporary files are gone
        room = f" ({space_left(path.parent)}, {need} needed)" if need else ""
        rank_warning(f"fastlaunch: could not write checkpoint {path}: {failed}{room}; the previous checkpoint is kept")
        return None
    return path


def _content(path: Path, run_dir: Path, manifest: dict) -> dict:
    """The checkpoint's content, from its bytes read once: the size and hash its manifest gives are checked
    on those bytes, and the same bytes are loaded (weights_only=True); else BadCheckpoint."""
    if manifest["format"] != FORMAT or manifest["file"] != path.name:
        raise BadCheckpoint("its manifest is not one of this version for this file")
    if manifest["run"] != Path(run_dir).resolve().name:
        raise BadCheckpoint(f"its manifest names another run ({manifest['run']:.60})")
    data = _read(path, "it")
    if len(data) != manifest["size"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise BadCheckpoint("it is truncated or corrupted (its hash differs from its manifest)")
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001  (the unpickler's refusal, or a broken archive)
        raise BadCheckpoint(f"it holds more than tensors and plain data ({type(err).__name__})") from None


def verify(path: Path, run_dir: Path, manifest: dict | None = None) -> dict:
    """The manifest of a checkpoint that can be used, or BadCheckpoint saying why not (`manifest`: its
    manifest when the caller has read it already)."""
    _check_folder(path.parent)
    manifest = manifest_of(path) if manifest is None else manifest
    _content(path, run_dir, manifest)
    return manifest


def latest(run_dir: Path, say: Callable[[str], None] | None = None) -> Path | None:
    """The good checkpoint furthest into the run; each newer one that fails verify() is said in one line (one
    without a good manifest is never used: nothing else says where it was or vouches for it)."""
    say, folder = say or (lambda line: None), checkpoint_dir(run_dir)
    if folder.is_symlink():
        say(f"fastlaunch: skipping the checkpoints in {folder}: it is a symbolic link")
        return None
    remove_stale_temporaries(folder)
    candidates = []
    for path in (folder.glob("*.pt") if folder.is_dir() else []):
        try:
            if not path.name.startswith("."):  # else a temporary file of a write that never finished
                manifest = manifest_of(path)
                candidates.append(((manifest["fit_index"], manifest["epoch"], manifest["iter"], manifest["time"]),
                                   path, manifest))
        except BadCheckpoint as why:
            say(f"fastlaunch: skipping checkpoint {path}: {why}")
    for _, path, manifest in sorted(candidates, key=lambda c: c[0], reverse=True):
        try:
            verify(path, run_dir, manifest)
            return path
        except BadCheckpoint as why:
            say(f"fastlaunch: skipping checkpoint {path}: {why}")
    return None


def load(path: Path) -> dict:
    """A checkpoint's content, checked again where it is loaded (the file may have changed since the launcher
    verified it): read once, its hash checked on the bytes loaded, tensors and plain data only; else
    BadCheckpoint."""
    path = Path(path)
    _check_folder(path.parent)
    return _content(path, path.parent.parent, manifest_of(path))


def keep_last(run_dir: Path, k: int, prefix: str = "epoch") -> None:
    """Delete all but the newest k per-epoch checkpoints (with their manifests)."""
    folder = checkpoint_dir(run_dir)
    epochs = sorted(folder.glob(f"{prefix}*.pt"), key=lambda p: p.lstat().st_mtime)
    for old in epochs[:-k] if k > 0 else []:
        old.unlink(missing_ok=True)
        _manifest_path(old).unlink(missing_ok=True)
