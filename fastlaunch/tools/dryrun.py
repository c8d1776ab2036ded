"""`fastlaunch doctor train.py`: the script in one process, stopped after its first training batch.

Reports where the model, the batch and the batch transforms live, the DataLoader's workers against the
cores, and whether the model exports with torch.export (naming the first module that does not).
Code before the first fit (downloads included) still runs.
"""
from __future__ import annotations

import os
import runpy
import sys
from typing import Any

import torch

from .doctor import Finding

__all__ = ["dry_run", "first_unexportable"]


class _Stop(BaseException):
    """Raised after the first training batch; a BaseException, so fastai does not wrap it."""


def _args_for(module: torch.nn.Module, inputs: tuple) -> tuple:
    return tuple(t for t in inputs if isinstance(t, torch.Tensor))


def first_unexportable(model: torch.nn.Module, inputs: tuple) -> tuple[bool, str | None, str | None]:
    """(exports, the first module that does not export, its error): modules tried in forward order,
    and among the failing ones the first with no failing module inside it."""
    model = model.eval()
    try:
        torch.export.export(model, inputs)
        return True, None, None
    except Exception as err:  # noqa: BLE001 - any export failure is a finding
        root_error = str(err).strip().splitlines()[0]
    seen: dict[str, tuple] = {}
    names = {m: n for n, m in model.named_modules()}

    def record(mod, inp, out):
        seen.setdefault(names[mod], inp)  # returns None: a forward hook's return value replaces the output

    hooks = [m.register_forward_hook(record) for m in model.modules() if m is not model]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    failing: list[tuple[str, str]] = []
    modules = dict(model.named_modules())
    for name, inp in list(seen.items())[:64]:
        try:
            torch.export.export(modules[name], _args_for(modules[name], inp))
        except Exception as err:  # noqa: BLE001
            failing.append((name, str(err).strip().splitlines()[0]))
    for name, error in failing:
        if not any(other != name and other.startswith(name + ".") for other, _ in failing):
            return False, f"{name} ({type(modules[name]).__name__})", error
    return False, None, root_error


def _device_of_tfms(dl: Any) -> str | None:
    for tfm in getattr(getattr(dl, "after_batch", None), "fs", []):
        for attr in ("mean", "std"):
            value = getattr(tfm, attr, None)
            if isinstance(value, torch.Tensor):
                return str(value.device)
    return None


def dry_run(script: str, args: list[str], cores: int) -> list[Finding]:
    """Run the script until its first training batch; report what it saw."""
    from ..quiet import quiet_dependency_warnings

    quiet_dependency_warnings()
    from fastai.callback.core import Callback
    from fastai.learner import defaults

    seen: dict[str, Any] = {}

    class DryRun(Callback):
        order = 1000

        def after_batch(self):
            if not self.training:
                return
            xb = tuple(x for x in self.learn.xb if isinstance(x, torch.Tensor))
            param = next(self.learn.model.parameters(), None)
            seen.update(model=str(param.device) if param is not None else "no parameters",
                        batch=str(xb[0].device) if xb else "no tensors", tfms=_device_of_tfms(self.dl),
                        workers=getattr(getattr(self.dl, "fake_l", None), "num_workers", 0))
            seen["export"] = first_unexportable(self.learn.model, xb)
            raise _Stop()

    defaults.callbacks.append(DryRun)
    argv, path = sys.argv, list(sys.path)
    sys.argv = [script, *args]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    try:
        runpy.run_path(script, run_name="__main__")
    except _Stop:
        pass
    except SystemExit:
        pass
    finally:
        sys.argv, sys.path[:] = argv, path
        defaults.callbacks.remove(DryRun)
    if not seen:
        return [Finding("warn", "dry run", f"{script} finished without a training batch",
                        "the dry run stops after the first batch of a fit: does the script call fit?")]
    out = [Finding("info", "dry run", "the code before the first fit ran (downloads included); stopped after one "
                   "training batch")]
    places = f"model on {seen['model']}, batch on {seen['batch']}" + \
        (f", batch transforms on {seen['tfms']}" if seen["tfms"] else "")
    apart = seen["tfms"] is not None and seen["tfms"] != seen["batch"] or seen["model"] != seen["batch"]
    out.append(Finding("error" if apart else "ok", "placement", places,
                       "put model, data and transforms on one device (fastlaunch does this per rank)" if apart else ""))
    workers = seen["workers"]
    if workers > cores:
        out.append(Finding("warn", "workers", f"num_workers={workers} with {cores} core(s)",
                           f"use num_workers={max(0, cores - 1)}"))
    exports, module, error = seen["export"]
    if exports:
        out.append(Finding("ok", "export", "the model exports with torch.export"))
    else:
        where = f"first module that does not export: {module}" if module else "the model does not export"
        out.append(Finding("warn", "export", f"{where}: {error}",
                           "rewrite its data-dependent Python control flow (e.g. torch.where) to export it"))
    return out
