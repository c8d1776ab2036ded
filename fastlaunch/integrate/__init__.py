"""fastai integration: fastlaunch's callbacks on every Learner, and the one home of every fastai patch.

Each patch fixes one named defect of fastai (2.8) under data parallelism, is installed once per worker,
and has a test. core.py: the fit and distributed path; side_effects.py: what a fit does besides training;
nosync.py: fastai's per-step host-device syncs; accumulate.py: gradient accumulation.
"""
from __future__ import annotations

from fastcore.basics import defaults

from ..comm import current_env
from .accumulate import ACCUMULATE_PATCHES
from .core import CORE_PATCHES, fastlaunch_callbacks
from .nosync import NOSYNC_PATCHES
from .side_effects import SIDE_EFFECT_PATCHES

__all__ = ["install", "PATCHES", "fastlaunch_callbacks"]

PATCHES = CORE_PATCHES + SIDE_EFFECT_PATCHES + NOSYNC_PATCHES + ACCUMULATE_PATCHES
_installed = False


def install() -> None:
    """Register fastlaunch's callbacks on fastai's defaults and apply every patch (once)."""
    global _installed
    if _installed:
        return
    denv = current_env()
    if denv.cpus_per_rank:
        defaults.cpus = denv.cpus_per_rank  # DataLoader workers: the rank's share of cores, not every core
    import fastai.basics  # noqa: F401  (learner, data, callbacks: what the patches rebind)
    import fastai.callback.all  # noqa: F401
    import fastai.distributed  # noqa: F401
    from fastai.learner import defaults as fastai_defaults

    from ..callbacks import CALLBACKS

    for patch in PATCHES:
        patch()
    for cls in CALLBACKS:
        if cls not in fastai_defaults.callbacks:
            fastai_defaults.callbacks.append(cls)
    _installed = True
