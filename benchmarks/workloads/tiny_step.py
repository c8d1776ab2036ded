"""The tiny step: an ordinary fastai script on a 1-layer model (nn.Linear(16, 2)) at batch 8 per rank, one
epoch of $BENCH_STEPS training steps per rank, so a step's time is nearly all the framework's own (the
training loop, its callbacks, the loader, DDP), not the model's. Under fastlaunch it runs unchanged; under
torchrun, $BENCH_WRAP=1 adds the minimal hand-written wrapper (handwrap.py: the same fastai loaders in
DistributedDL, the same callbacks). $BENCH_PROFILE=1: rank 0's measured steps under cProfile."""
import os
import sys

from fastai.basics import Callback, DataLoader, DataLoaders, Learner, nn

sys.path.insert(0, os.path.dirname(__file__))
from common import TINY_BS, TINY_WARMUP, StepClock, tiny_data, tiny_model  # noqa: E402

clock = StepClock(bs=TINY_BS, warmup=TINY_WARMUP)
profile = None
if os.environ.get("BENCH_PROFILE") == "1" and os.environ.get("RANK", "0") == "0":
    from stepprofile import StepProfile

    profile = StepProfile()


class Clock(Callback):
    order = 10_000  # the last at after_batch: every other callback's work (fastlaunch's too) is in the step

    def after_batch(self):
        if not self.training:
            return
        clock.step()
        if profile is not None and clock.steps == TINY_WARMUP:
            profile.start()
        elif profile is not None and clock.steps == self.n_iter:
            profile.stop(clock.steps - TINY_WARMUP)


data, valid = tiny_data()
model = tiny_model()
dls = DataLoaders(DataLoader(data, bs=TINY_BS, shuffle=True, drop_last=True), DataLoader(valid, bs=TINY_BS))
learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), cbs=Clock())
if os.environ.get("BENCH_WRAP") == "1":  # what a user writes for torchrun
    from handwrap import hand_wrap

    hand_wrap(learn)
# No progress bar in any peer (none is expected: fastai.basics has none, and hand_wrap imports fastai.distributed,
# whose progress import adds ProgressCallback to fastai's defaults, after the Learner is made).
learn.remove_cbs([cb for cb in learn.cbs if type(cb).__name__ == "ProgressCallback"])
learn.fit(1, 1e-3)
clock.write(os.environ.get("BENCH_TAG", "tiny"), {"profile": profile.summary()} if profile is not None else None)
