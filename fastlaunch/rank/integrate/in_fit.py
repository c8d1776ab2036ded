"""What a callback asks of its Learner inside a distributed fit gives one process's answer.

Inside a fit each rank's loaders are its shards (ShardedDL), half as long with 2 ranks. fastai reads the
loaders in a few places where one process's answer needs the whole loader:
  - `validate()` and `get_preds(dl=self.dls.valid, ...)` called from a callback evaluate the loader they are
    given: each rank evaluates the whole validation set (one process's batches, in its order), so every rank
    returns one process's result and the fit's own sharded validation is left as it was;
  - `lr_find` sizes its fit as `num_it // len(dls.train) + 1` epochs before the fit, from one process's
    length, and then runs out of (shorter) epochs before its `num_it` steps: the sweep stopped at a fraction
    of its range. The epochs are counted again, by fastai's own rule, from the loader the fit iterates.
"""
from __future__ import annotations

import functools

from ..patching import patch

__all__ = ["IN_FIT_PATCHES", "whole_loader"]


def whole_loader(dl):
    """One process's loader for a rank's shard of it; any other loader as it is."""
    from ..sharding import ShardedDL

    return dl.original if isinstance(dl, ShardedDL) else dl


@patch("fastai.learner.Learner.get_preds", "fastai.learner.Learner.validate", module="fastai.learner",
       assumes=("fastai.learner.Learner.get_preds", "fastai.learner.Learner.validate"))
def evaluation_in_a_fit_sees_the_whole_set(ctx, p) -> None:
    """get_preds and validate given a rank's shard (a callback's `self.dls.valid` during a fit) evaluate
    one process's loader instead: every rank computes the whole set's answer with the same weights."""
    from fastai.learner import Learner

    get_preds, validate = Learner.get_preds, Learner.validate

    @functools.wraps(get_preds)
    def whole_get_preds(self, ds_idx=1, dl=None, *args, **kwargs):
        return get_preds(self, ds_idx, whole_loader(dl), *args, **kwargs)

    @functools.wraps(validate)
    def whole_validate(self, ds_idx=1, dl=None, *args, **kwargs):
        if dl is None and whole_loader(self.dls[ds_idx]) is not self.dls[ds_idx]:
            dl = self.dls[ds_idx]  # a rank's shard: one process's loader instead
        return validate(self, ds_idx, whole_loader(dl), *args, **kwargs)

    p.set(Learner, "get_preds", whole_get_preds)
    p.set(Learner, "validate", whole_validate)


def lr_find_epochs(learn, num_it: int) -> int:
    """fastai's own count of lr_find's epochs (Learner.lr_find), from the loader the fit iterates."""
    return num_it // len(learn.dls.train) + 1


IN_FIT_PATCHES = (evaluation_in_a_fit_sees_the_whole_set,)
