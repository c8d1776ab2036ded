"""fastlaunch's fastai callbacks, registered on every Learner through fastai.learner.defaults.callbacks."""
from .agreement import AgreedStop
from .checkpointing import EpochCheckpoints
from .instrument import Instrument
from .metrics import WholeSetMetrics
from .placement import DistributedFit, FastlaunchDDP
from .asked_precision import LauncherPrecision
from .rank_zero import RankZeroOutput
from .recorder import RecorderSync

__all__ = ["AgreedStop", "WholeSetMetrics", "DistributedFit", "FastlaunchDDP",
           "LauncherPrecision", "RankZeroOutput", "RecorderSync", "EpochCheckpoints", "Instrument", "CALLBACKS"]

CALLBACKS = (DistributedFit, RankZeroOutput, RecorderSync, WholeSetMetrics, AgreedStop, LauncherPrecision,
             EpochCheckpoints, Instrument)
