"""The fastai script every peer runs: a small CNN on 32x32 images, batch 64 per rank, one epoch.
Under fastlaunch it runs unchanged; under torchrun, $BENCH_WRAP=1 adds the minimal hand-written wrapper
a user writes without fastlaunch (init, DDP, the same fastai DataLoaders in DistributedDL: handwrap.py)."""
import os
import sys

from fastai.basics import Callback, DataLoader, DataLoaders, Learner
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from common import BS, StepClock, images, maybe_crash, small_cnn  # noqa: E402

clock = StepClock()


class Clock(Callback):
    order = 1000

    def after_batch(self):
        if self.training:
            clock.step()
            maybe_crash(clock.steps)


data, valid = images(), images(256, seed=1)
model = small_cnn()
dls = DataLoaders(DataLoader(data, bs=BS, shuffle=True, drop_last=True), DataLoader(valid, bs=BS))
learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=Clock())
if os.environ.get("BENCH_WRAP") == "1":  # what a user writes for torchrun
    from handwrap import hand_wrap

    hand_wrap(learn)
counting = os.environ.get("BENCH_COUNT") == "1"  # Python-level counts, and the dispatcher's
probing = counting or os.environ.get("BENCH_PROBE") == "1"  # the dispatcher's alone (shares nothing with fastlaunch)
if counting:
    from counting import Counts

    counts = Counts(learn)
if probing:
    from dispatch_probe import DispatchProbe

    probe = DispatchProbe(learn)
hooking = os.environ.get("BENCH_HOOKS") == "1"  # under fastlaunch only: what its instrumentation costs
if hooking:
    from hooks import HookCost

    hooks = HookCost(learn)
learn.fit(1, 1e-3)
extra = ({**(counts.per_step() if counting else {}), **(probe.per_step() if probing else {}),
          **(hooks.measure() if hooking else {})} if probing else hooks.measure() if hooking else None)
clock.write(os.environ.get("BENCH_TAG", "fastai"), extra)
