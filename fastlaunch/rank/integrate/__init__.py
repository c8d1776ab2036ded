"""fastai integration: fastlaunch's callbacks on every Learner, and the one home of every fastai patch.

Each patch is a Patch object (patching.py) that fixes one named defect of fastai under data parallelism,
declares the names it replaces and the module it changes, and has a test. `install(ctx)` applies them for
one rank context, each when its module is loaded, and returns an Installation whose `uninstall()` leaves fastai exactly as it found it. core.py: the fit and
distributed path; dispatch.py: the observed event dispatch; side_effects.py: what a fit does besides
training; nosync.py: fastai's per-step host-device syncs; accumulate.py: gradient accumulation.
"""
from __future__ import annotations

from ...errors import UsageError
from ..patching import Installation, patch
from .accumulate import ACCUMULATE_PATCHES
from .core import CORE_PATCHES, fastlaunch_callbacks
from .in_fit import IN_FIT_PATCHES
from .nosync import NOSYNC_PATCHES
from .side_effects import SIDE_EFFECT_PATCHES

__all__ = ["install", "PATCHES", "fastlaunch_callbacks", "SUPPORTED_FASTAI", "check_fastai_version"]

# The fastai releases these patches were written against (pyproject.toml declares the same range).
SUPPORTED_FASTAI = ((2, 8), (2, 9))


def check_fastai_version(version: str) -> None:
    """Refuse a fastai these patches were not written for: they replace fastai's internals by name."""
    low, high = SUPPORTED_FASTAI
    try:
        parts = tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        parts = ()
    if not parts or not low <= parts < high:
        span = f">={'.'.join(map(str, low))},<{'.'.join(map(str, high))}"
        raise UsageError("this fastai version is not one fastlaunch supports", f"fastai {version}",
                         f"pip install 'fastai{span}'")


@patch(module="fastai")
def supported_fastai(ctx, p) -> None:
    """These patches replace fastai's internals by name: a fastai they were not written for is refused
    (one line with a HINT) as soon as the script imports it."""
    import fastai

    check_fastai_version(fastai.__version__)


@patch("types.SimpleNamespace().cpus", "types.SimpleNamespace().callbacks", module="fastai.learner")
def callbacks_and_cores(ctx, p) -> None:
    """fastlaunch's callbacks (bound to this rank context) on every Learner through fastai's default
    callbacks; DataLoader workers sized to the rank's share of the cores, not every core."""
    from fastcore.basics import defaults

    from ..callbacks import CALLBACKS
    from ..context import bind

    if ctx.env.cpus_per_rank:
        p.set(defaults, "cpus", ctx.env.cpus_per_rank)
    if getattr(defaults, "callbacks", None) is None:
        p.set(defaults, "callbacks", [])
    ctx.callback_classes = tuple(bind(cls, ctx) for cls in CALLBACKS)
    for cls in ctx.callback_classes:
        p.append(defaults.callbacks, cls)


@patch(module="fastai.learner")
def ddp_loaded_before_the_first_fit(ctx, p) -> None:
    """DDP's constructor imports torch._dynamo: seconds when cold, on a busy machine more than a short
    --hang-timeout. A script that imports fastai pays it at that import, not inside a fit the hang watch
    times (a plain PyTorch script pays it where it builds its DDP, as under torchrun)."""
    if ctx.env.world_size > 1:
        import torch._dynamo  # noqa: F401


PATCHES = ((supported_fastai,) + CORE_PATCHES + IN_FIT_PATCHES + SIDE_EFFECT_PATCHES + NOSYNC_PATCHES + ACCUMULATE_PATCHES
           + (callbacks_and_cores, ddp_loaded_before_the_first_fit))


def install(ctx) -> Installation:
    """Apply every patch for this rank context, each once its fastai module is loaded (at once for those
    loaded already, the others when the script imports them); the returned Installation undoes them.
    Nothing is imported here: a rank loads only the fastai modules its script uses."""
    def forget() -> None:
        ctx.callback_classes = ()
        if ctx.syncs is not None:  # the sync counter's torch.Tensor wrappers go with the patches
            ctx.syncs.uninstall()
            ctx.syncs = None

    return Installation(PATCHES, ctx, on_uninstall=forget)
