"""fastlaunch's fastai callbacks, registered on every Learner through fastai.learner.defaults.callbacks."""
from .placement import DistributedFit, FastlaunchDDP
from .rank_zero import RankZeroOutput

__all__ = ["DistributedFit", "FastlaunchDDP", "RankZeroOutput", "CALLBACKS"]

CALLBACKS = (DistributedFit, RankZeroOutput)
