"""--precision on every Learner: the launcher's choice, unless the script chose one itself.

fastai's fp16 module (and the progress bar it imports) is loaded only when a precision is asked for.
"""
from __future__ import annotations

import sys

from .base import LeanCallback

__all__ = ["LauncherPrecision"]


class LauncherPrecision(LeanCallback):
    """Gives every Learner the launcher's --precision, unless the script chose one itself."""

    def after_create(self):
        asked = self.ctx.env.precision
        fp16 = sys.modules.get("fastai.callback.fp16")  # not loaded: the script made no MixedPrecision
        if fp16 is not None and any(isinstance(c, fp16.MixedPrecision) for c in self.learn.cbs):
            return
        if asked != "no":
            from fastai.callback.fp16 import AMPMode

            from .precision import DevicePrecision

            self.learn.add_cb(DevicePrecision(amp_mode=AMPMode(asked)))
