"""What fastlaunch's patches assume of fastai's code, checked when each patch applies.

A patch that wraps or stands in for a fastai function relies on what that function does (the order of its
events, the names it reads, its arguments). Each Patch names those functions (`assumes`); FINGERPRINTS holds
a digest of each one's source as fastlaunch was written and tested against it. A fastai whose code differs,
even inside the supported version range, is refused when the patch would apply, naming the function, instead
of diverging silently. `python -m fastlaunch.rank.assumed` prints the table for the installed fastai (after a
review of each changed function).
"""
from __future__ import annotations

import hashlib
import importlib
import inspect
import textwrap
from typing import Any

from ..errors import UsageError

__all__ = ["FINGERPRINTS", "fingerprint", "resolve", "check_assumed"]

FINGERPRINTS: dict[str, str] = {  # fastai 2.8.12 (the same code in 2.8.8 to 2.8.11)
    "fastai.learner.Learner.fit": "a594e61eb61bcfa0",
    "fastai.learner.Learner._do_fit": "11ba62b5eebcca61",
    "fastai.learner.Learner.export": "1f9503f375bfca4c",
    "fastai.torch_core.maybe_gather": "f77d7656d1d53a4b",
    "fastai.torch_core.distrib_barrier": "84288d84c1bd29ea",
    "fastai.learner.Learner._call_one": "75a2a1ccad643e30",
    "fastai.callback.core.Callback.__call__": "a60294c3eb5a99b7",
    "fastai.learner.Learner._with_events": "b15928625a4cb136",
    "fastai.learner.Learner._do_one_batch": "c663b357a4b46f8a",
    "fastai.learner.Learner._do_grad_opt": "f4b996b11834a39f",
    "fastai.learner.Learner.get_preds": "6a617d4e61392fae",
    "fastai.learner.Learner.validate": "ce15a0733eca6b14",
    "fastai.callback.schedule.LRFinder.before_fit": "85d0a70f8cf3ca47",
    "fastai.callback.schedule.LRFinder.after_fit": "ca16bac8515c68fd",
    "fastai.learner.Learner.lr_find": "c19af8e095ae85c4",
    "fastai.callback.progress.CSVLogger.before_fit": "c98db7ea95a44570",
    "fastai.callback.progress.CSVLogger.after_fit": "91a6bd932f4cc267",
    "fastai.callback.progress.ShowGraphCallback.before_fit": "e47a445aedbf183c",
    "fastai.callback.tracker.SaveModelCallback.after_fit": "faf2b2063aaf63b8",
    "fastai.callback.fp16.MixedPrecision.before_fit": "1c73de35add7bced",
    "fastai.callback.fp16.MixedPrecision.after_fit": "d1ee4611321f49bf",
    "fastai.learner.AvgSmoothLoss.accumulate": "c250e5a579888843",
    "fastai.callback.progress.ProgressCallback.after_batch": "9c5175de332ceb11",
    "fastai.callback.training.GradientAccumulation.before_fit": "4591ba34825c169e",
    "fastai.callback.training.GradientAccumulation.after_loss": "271206a1c7522c95",
    "fastai.callback.training.GradientAccumulation.before_step": "849b7d8a69ef2c63",
    "fastai.text.core.SentencePieceTokenizer.setup": "e3554d5afde35186",
    "fastai.text.core.SentencePieceTokenizer.train": "448aa2bcf093ac4e",
}


def resolve(name: str) -> Any:
    """The object a dotted name points to: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = inspect.getattr_static(obj, attr) if isinstance(obj, type) else getattr(obj, attr)
        if isinstance(obj, (staticmethod, classmethod)):
            obj = obj.__func__
        return getattr(obj, "__wrapped__", obj)  # fastlaunch's own wrappers keep fastai's function here
    raise ImportError(name)


def fingerprint(obj: Any) -> str:
    """A digest of a function's source text (its indentation removed)."""
    source = textwrap.dedent(inspect.getsource(obj))
    return hashlib.sha256(source.encode()).hexdigest()[:16]


def check_assumed(patch_name: str, names: tuple[str, ...]) -> None:
    """Refuse a fastai whose code differs from what this patch was written against."""
    for name in names:
        try:
            found = fingerprint(resolve(name))
        except (ImportError, AttributeError, OSError, TypeError):
            found = "missing"
        if found != FINGERPRINTS.get(name):
            import fastai

            raise UsageError(f"fastai's {name} is not the code fastlaunch's patch {patch_name} was written for",
                             f"fastai {fastai.__version__}, fingerprint {found}, expected {FINGERPRINTS.get(name)}",
                             "install the fastai release fastlaunch was tested with (pip install 'fastai==2.8.*' "
                             "from a clean environment), or a fastlaunch release that supports this fastai")


if __name__ == "__main__":  # the table for the installed fastai
    from .integrate import PATCHES

    for item in PATCHES:
        for assumed in item.assumes:
            print(f'    "{assumed}": "{fingerprint(resolve(assumed))}",')
