"""fastlaunch's event dispatch against fastai's own, side by side: every callback class fastai ships, every
event, every combination of `run`, `run_train`, `run_valid` and `training`, and exceptions raised by a
callback. Both dispatches drive the same callbacks; the calls made, the exceptions (type and message) and
every callback's `run` afterwards must be identical. Each class is wrapped by a spy subclass that defines
exactly the events the class defines (so what each dispatch may skip is the class's own), recording calls."""
from __future__ import annotations

import importlib
import itertools

import fastai.callback.all  # noqa: F401  (every callback module, so every class is found)
import pytest
from fastai.callback.core import Callback, CancelBatchException, CancelFitException, event
from fastai.learner import Learner
from fastcore.foundation import L

from fastlaunch.env import DistEnv
from fastlaunch.rank.context import RankContext
from fastlaunch.rank.integrate.dispatch import observed_call_one

for _module in ("fastai.vision.all", "fastai.text.all", "fastai.tabular.all", "fastai.collab", "fastai.callback.captum",
                "fastai.callback.comet", "fastai.callback.neptune", "fastai.callback.azureml"):
    try:
        importlib.import_module(_module)
    except Exception:  # an optional integration whose package is absent defines no callback here
        pass

EVENTS = [name for name in vars(event) if not name.startswith("_")]
FASTAI_CALL_ONE = Learner._call_one  # fastai's own (the module is not patched in this process)


def _all_subclasses(cls):
    for sub in cls.__subclasses__():
        yield sub
        yield from _all_subclasses(sub)


CLASSES = sorted({c for c in _all_subclasses(Callback) if c.__module__.startswith("fastai.")},
                 key=lambda c: (c.__module__, c.__qualname__))


class FakeLearner:
    """What the dispatches and Callback.__call__ read of a Learner."""

    def __init__(self, cbs, training=True):
        self.cbs, self.training, self.epoch, self.iter = L(cbs), training, 0, 0


class LearnerAnswering(FakeLearner):
    """A Learner (or its model) with an attribute named like an event: fastai's Callback finds it there."""

    def after_batch(self):
        self.log.append(("<learner>", "after_batch"))


def spy_of(cls, log, raises):
    """A subclass of cls whose event methods (exactly those cls defines) record their call, or raise."""
    def method(event_name):
        def call(self):
            log.append((cls.__qualname__, event_name))
            make = raises.get((cls, event_name))
            if make is not None:
                raise make()
        return call
    defined = {e: method(e) for e in EVENTS if callable(getattr(cls, e, None))}
    return type(cls.__name__, (cls,), {**defined, "__module__": cls.__module__})


def make_callbacks(log, raises, flags):
    cbs = []
    for i, cls in enumerate(CLASSES):
        cb = object.__new__(spy_of(cls, log, raises))
        run, run_train, run_valid = flags[i % len(flags)]
        for name, value in (("run", run), ("run_train", run_train), ("run_valid", run_valid), ("order", i)):
            object.__setattr__(cb, name, value)
        cbs.append(cb)
    return cbs


def drive(call_one, learner_cls, training, raises, events=EVENTS):
    """Every event once through one dispatch; what was called, raised, and each `run` after each event."""
    log: list = []
    flag_sets = list(itertools.product([True, False], repeat=3))
    cbs = make_callbacks(log, raises, flag_sets)
    learn = learner_cls(cbs, training)
    learn.log = log
    for cb in cbs:
        object.__setattr__(cb, "learn", learn)
    seen = []
    for name in events:
        try:
            call_one(learn, name)
            outcome = None
        except Exception as exc:  # noqa: BLE001  (compared between the two dispatches)
            outcome = (type(exc).__name__, str(exc))
        seen.append((name, list(log), outcome, [cb.run for cb in cbs]))
        log.clear()
    return seen


@pytest.fixture(scope="module")
def ours():
    return observed_call_one(RankContext(DistEnv.from_environ({})))


def test_every_fastai_callback_class_is_driven():
    names = {c.__qualname__ for c in CLASSES}
    assert {"Recorder", "TrainEvalCallback", "ParamScheduler", "LRFinder", "MixedPrecision", "GradientAccumulation",
            "SaveModelCallback", "ShowGraphCallback", "ProgressCallback", "MixUp", "RNNCallback"} <= names
    assert len(CLASSES) >= 30


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("learner_cls", [FakeLearner, LearnerAnswering])
def test_same_calls_and_state_as_fastais_dispatch(ours, training, learner_cls):
    got = drive(ours, learner_cls, training, {})
    assert got == drive(FASTAI_CALL_ONE, learner_cls, training, {})
    assert sum(len(calls) for _, calls, _, _ in got) > 30  # the callbacks were really called


@pytest.mark.parametrize("make", [lambda: ValueError("bad value"), CancelBatchException, CancelFitException])
def test_same_exceptions_as_fastais_dispatch_outside_a_distributed_fit(ours, make):
    raises = {(cls, "after_batch"): make for cls in CLASSES if callable(getattr(cls, "after_batch", None))}
    got = drive(ours, FakeLearner, True, raises)
    want = drive(FASTAI_CALL_ONE, FakeLearner, True, raises)
    assert got == want
    assert any(outcome is not None for _, _, outcome, _ in got)  # the exception did happen


def test_a_callback_switched_off_is_on_again_after_fit_even_where_it_has_no_after_fit(ours):
    class OffDuringLRFind(Callback):  # ShowGraph, W&B and TensorBoard do this in before_fit
        def before_fit(self): self.run = False

    for call_one in (ours, FASTAI_CALL_ONE):
        cb = OffDuringLRFind()
        learn = FakeLearner([cb])
        object.__setattr__(cb, "learn", learn)
        call_one(learn, "before_fit")
        assert cb.run is False
        call_one(learn, "after_fit")
        assert cb.run is True
