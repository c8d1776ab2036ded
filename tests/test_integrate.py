"""fastai integration in one process: callbacks on every Learner, and each patch doing what it claims."""
from __future__ import annotations

import zipfile

import pytest
import torch
from fastai.basics import Callback, Datasets, Learner
from torch import nn

from fastlaunch import integrate
from fastlaunch.callbacks import CALLBACKS, DistributedFit, RankZeroOutput
from fastlaunch.callbacks.placement import in_real_fit


@pytest.fixture(scope="module", autouse=True)
def installed():
    integrate.install()


def _x(i): return torch.tensor([float(i % 3), float(i % 5)])
def _y(i): return i % 2


def _learner(*cbs):
    dsets = Datasets(range(64), tfms=[[_x], [_y]], splits=[list(range(48)), list(range(48, 64))])
    return Learner(dsets.dataloaders(bs=16), nn.Linear(2, 2), loss_func=nn.CrossEntropyLoss(), cbs=list(cbs))


class FitKinds(Callback):
    def __init__(self): self.kinds = []
    def before_fit(self): self.kinds.append(in_real_fit(self.learn))


def test_every_learner_gets_fastlaunch_callbacks_once():
    learn = _learner()
    assert sum(isinstance(cb, DistributedFit) for cb in learn.cbs) == 1
    assert sum(isinstance(cb, RankZeroOutput) for cb in learn.cbs) == 1
    integrate.install()  # idempotent
    assert sum(isinstance(cb, DistributedFit) for cb in _learner().cbs) == 1


def test_real_fits_are_told_apart_from_validate_and_get_preds():
    probe = FitKinds()
    learn = _learner(probe)
    learn.fit(1)
    learn.validate()
    learn.get_preds()
    assert probe.kinds == [True, False, False]


def test_maybe_gather_keeps_tensors_local(monkeypatch):
    import fastai.torch_core as tc

    monkeypatch.setenv("WORLD_SIZE", "2")  # fastai's own version would all_gather here
    x = torch.arange(4)
    assert tc.maybe_gather(x) is x
    assert torch.equal(tc.to_detach(x), x)


def test_to_distributed_and_distrib_ctx_do_not_wrap_twice():
    learn = _learner()
    n = len(learn.cbs)
    assert learn.to_distributed() is learn and len(learn.cbs) == n
    with learn.distrib_ctx() as same:
        assert same is learn and len(learn.cbs) == n
    assert learn.detach_distributed() is learn


def test_distributed_dl_name_gives_sharded_dl():
    import fastai.distributed as fd

    from fastlaunch.sharding import ShardedDL

    assert fd.DistributedDL is ShardedDL


def test_export_leaves_fastlaunch_out_and_load_learner_gets_it_back(tmp_path):
    learn = _learner()
    learn.path = tmp_path
    learn.export("model.pkl")
    assert sum(isinstance(cb, CALLBACKS) for cb in learn.cbs) == len(CALLBACKS)  # restored
    with zipfile.ZipFile(tmp_path / "model.pkl") as zf:
        pickled = b"".join(zf.read(n) for n in zf.namelist() if n.endswith(".pkl"))
    assert b"Learner" in pickled and b"cfastlaunch" not in pickled and b"DistributedFit" not in pickled
    from fastai.learner import load_learner

    loaded = load_learner(tmp_path / "model.pkl")  # fastai's own loader (an export is a pickle by design)
    assert not any(isinstance(cb, CALLBACKS) for cb in loaded.cbs)
    loaded.dls = learn.dls
    loaded.fit(1)  # the fit patch adds fastlaunch's callbacks to a Learner that skipped __init__
    assert sum(isinstance(cb, CALLBACKS) for cb in loaded.cbs) == len(CALLBACKS)


def test_fastlaunch_callbacks_skip_the_events_they_do_not_handle_and_run_the_rest():
    import types

    from fastlaunch.callbacks import CALLBACKS, Instrument
    from fastlaunch.callbacks.base import LeanCallback

    assert all(issubclass(cls, LeanCallback) for cls in CALLBACKS)
    assert Instrument._handles >= {"before_batch", "after_batch", "after_train", "after_fit"}
    assert "after_pred" not in Instrument._handles

    class Probe(LeanCallback):
        def after_batch(self):
            self.seen = getattr(self, "seen", 0) + 1

    probe = Probe()
    probe.learn = types.SimpleNamespace(training=True)
    probe("after_pred")  # not handled: returns at once
    probe("after_batch")
    assert probe.seen == 1
    probe.run = False
    probe("after_batch")  # fastai's rules still apply to handled events: run=False skips them
    probe("after_fit")  # and the end of a fit sets run back, handled or not
    assert probe.seen == 1 and probe.run


def test_sync_bn_swaps_batchnorm_for_the_fit_and_puts_it_back():
    from torch import nn

    from fastlaunch.callbacks.placement import restore_modules, to_sync_batchnorm

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    bn2d, bn1d = model[1], model[2][1]
    swapped = to_sync_batchnorm(model)
    assert [type(m).__name__ for m in (model[1], model[2][1])] == ["SyncBatchNorm", "SyncBatchNorm"]
    assert model[1].weight is bn2d.weight and model[1].running_mean is bn2d.running_mean  # shared, not copied
    restore_modules(swapped)
    assert model[1] is bn2d and model[2][1] is bn1d
