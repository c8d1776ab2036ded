"""Console output on rank 0 only: other ranks keep no progress bar and print no epoch table."""
from __future__ import annotations

import sys

from fastcore.basics import noop

from .base import LeanCallback

__all__ = ["RankZeroOutput"]


class RankZeroOutput(LeanCallback):
    """On ranks other than 0, silences the Learner's logger and removes its progress bar."""

    order = 59  # before fastai's ProgressCallback (60)

    def after_create(self):
        # Not `self.run`: fastai resets run to True after every fit.
        if not self.ctx.is_rank_zero:
            self.learn.logger = noop
            progress = sys.modules.get("fastai.callback.progress")  # not loaded: the Learner has no bar
            if progress is not None:
                self.learn.remove_cbs(progress.ProgressCallback)
