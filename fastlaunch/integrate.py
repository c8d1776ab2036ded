"""fastai integration: fastlaunch's callbacks on every Learner, and the one home of every fastai patch.

Each patch fixes one named defect of fastai's own distributed path and is installed once per worker.
"""
from __future__ import annotations

import contextlib
import functools
import sys
from typing import Any

from fastcore.basics import defaults

from .comm import barrier, current_env

__all__ = ["install", "PATCHES", "fastlaunch_callbacks"]

_installed = False


def _replace_everywhere(name: str, original: Any, replacement: Any) -> None:
    """Rebind a function in every loaded fastai module that star-imported it."""
    for mod_name, module in list(sys.modules.items()):
        if mod_name.split(".")[0] == "fastai" and getattr(module, name, None) is original:
            setattr(module, name, replacement)


def fastlaunch_callbacks(learn) -> list:
    """fastlaunch's callbacks present on a Learner."""
    from .callbacks import CALLBACKS

    return [cb for cb in learn.cbs if isinstance(cb, CALLBACKS)]


def _ensure_callbacks(learn) -> None:
    """Learners that skipped __init__ (load_learner) get fastlaunch's callbacks before their first fit."""
    from .callbacks import CALLBACKS

    for cls in CALLBACKS:
        if not any(isinstance(cb, cls) for cb in learn.cbs):
            cb = cls()
            learn.add_cb(cb)
            cb("after_create")


def patch_fit_marks_real_fits() -> None:
    """validate/get_preds/predict also fire before_fit: mark Learner.fit so callbacks tell them apart."""
    from fastai.learner import Learner

    original = Learner.fit

    @functools.wraps(original)
    def fit(self, *args, **kwargs):
        _ensure_callbacks(self)
        self._fastlaunch_fit_depth = getattr(self, "_fastlaunch_fit_depth", 0) + 1
        try:
            return original(self, *args, **kwargs)
        finally:
            self._fastlaunch_fit_depth -= 1

    Learner.fit = fit


def patch_export_without_fastlaunch() -> None:
    """learn.export would pickle fastlaunch's callbacks: an exported model must load without fastlaunch."""
    from fastai.learner import Learner

    original = Learner.export

    @functools.wraps(original)
    def export(self, *args, **kwargs):
        ours = fastlaunch_callbacks(self)
        self.remove_cbs(ours)
        try:
            return original(self, *args, **kwargs)
        finally:
            self.add_cbs(ours)

    Learner.export = export


def patch_distributed_ctx_noop() -> None:
    """to_distributed/distrib_ctx in a script would wrap a second time (and DistributedTrainer reads
    model.device, breaking on CPU): fastlaunch already owns the job, so they do nothing."""
    from fastai.learner import Learner

    def to_distributed(self, *args, **kwargs): return self
    def detach_distributed(self): return self

    @contextlib.contextmanager
    def distrib_ctx(self, *args, **kwargs):
        yield self

    Learner.to_distributed, Learner.detach_distributed, Learner.distrib_ctx = \
        to_distributed, detach_distributed, distrib_ctx


def patch_distributed_dl() -> None:
    """fastai's DistributedDL calls .cuda() and miscounts len(): a script naming it gets ShardedDL."""
    import fastai.distributed as fd

    from .sharding import ShardedDL

    _replace_everywhere("DistributedDL", fd.DistributedDL, ShardedDL)


def patch_maybe_gather_local() -> None:
    """maybe_gather all_gathers on every to_detach when WORLD_SIZE > 1 (a per-batch collective, and a
    deadlock when one rank alone calls get_preds): tensors stay local; fastlaunch gathers at its own points."""
    import fastai.torch_core as tc

    def maybe_gather(x, axis=0): return x

    _replace_everywhere("maybe_gather", tc.maybe_gather, maybe_gather)


def patch_barrier_starts_group() -> None:
    """distrib_barrier is skipped while no process group exists; fastlaunch starts one lazily, so
    rank0_first, load and load_learner would race: the barrier starts the group when needed."""
    import fastai.torch_core as tc

    def distrib_barrier(): barrier()

    _replace_everywhere("distrib_barrier", tc.distrib_barrier, distrib_barrier)


PATCHES = (patch_fit_marks_real_fits, patch_export_without_fastlaunch, patch_distributed_ctx_noop,
           patch_distributed_dl, patch_maybe_gather_local, patch_barrier_starts_group)


def install() -> None:
    """Register fastlaunch's callbacks on fastai's defaults and apply every patch (once)."""
    global _installed
    if _installed:
        return
    denv = current_env()
    if denv.cpus_per_rank:
        defaults.cpus = denv.cpus_per_rank  # DataLoader workers: the rank's share of cores, not every core
    import fastai.basics  # noqa: F401  (learner, data, callbacks: what the patches rebind)
    import fastai.distributed  # noqa: F401
    from fastai.learner import defaults as fastai_defaults

    from .callbacks import CALLBACKS

    for patch in PATCHES:
        patch()
    for cls in CALLBACKS:
        if cls not in fastai_defaults.callbacks:
            fastai_defaults.callbacks.append(cls)
    _installed = True
