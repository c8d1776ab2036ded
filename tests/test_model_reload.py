"""SaveModelCallback's reload of the best model at a fit's end reads the model file with weights_only=True at
every world size, one rank included: a model file swapped for a pickle that runs code is refused in one line,
and an ordinary run still ends with the best epoch's weights."""
from __future__ import annotations

import fastai.callback.all  # noqa: F401  (every module a patch changes, loaded: every patch applies at install)
import pytest
import torch
from fastai.basics import Callback, Datasets, Learner
from fastai.callback.tracker import SaveModelCallback
from torch import nn

from conftest import Payload

from fastlaunch.env import DistEnv
from fastlaunch.rank import integrate
from fastlaunch.rank.context import RankContext


@pytest.fixture
def one_rank():
    """fastlaunch installed into fastai for a world of one rank (no run directory), taken out after."""
    ctx = RankContext(DistEnv())
    assert not ctx.env.is_distributed
    installation = integrate.install(ctx)
    yield ctx
    installation.uninstall()


def _x(i): return torch.tensor([float(i % 3), float(i % 5)])
def _y(i): return i % 2


def _learner(path, *cbs):
    dsets = Datasets(range(64), tfms=[[_x], [_y]], splits=[list(range(48)), list(range(48, 64))])
    return Learner(dsets.dataloaders(bs=16), nn.Linear(2, 2), loss_func=nn.CrossEntropyLoss(), cbs=list(cbs),
                   path=path)


class AfterTheSave(Callback):
    """Runs after SaveModelCallback's after_epoch: keeps each epoch's weights, then does `then` on the last."""

    order = SaveModelCallback.order + 1

    def __init__(self, then):
        self.then, self.weights = then, []

    def after_epoch(self):
        self.weights.append({k: v.detach().clone() for k, v in self.learn.model.state_dict().items()})
        if self.epoch == self.n_epoch - 1:
            self.then(self.learn)


def test_a_model_file_swapped_for_a_crafted_pickle_is_refused_at_one_rank_and_never_runs(one_rank, tmp_path,
                                                                                          capsys):
    marker = tmp_path / "pwned"
    model_file = tmp_path / "models" / "model.pth"

    def swap(learn):
        torch.save({"model": Payload(marker), "opt": {}}, model_file)

    learn = _learner(tmp_path, SaveModelCallback(), AfterTheSave(swap))
    learn.fit(2, 1e-2)  # the fit ends; before, fastai's reload unpickled the file (weights_only=False)
    assert not marker.exists()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastlaunch")]
    assert err == [f"fastlaunch: not reloading the best model from {model_file}: it holds more than tensors and "
                   "plain data (posix.system); the model keeps its last epoch's weights"], err


def test_a_plain_save_model_run_at_one_rank_still_ends_with_the_best_weights(one_rank, tmp_path, capsys):
    def spoil(learn):  # after the best model was saved: only a reload brings its weights back
        with torch.no_grad():
            for p in learn.model.parameters():
                p.add_(100.0)

    keep = AfterTheSave(spoil)
    learn = _learner(tmp_path, SaveModelCallback(), keep)
    learn.fit(3, 1e-2)
    losses = [row[1] for row in learn.recorder.values]  # valid_loss per epoch
    best = min(range(3), key=lambda e: losses[e])
    for name, value in learn.model.state_dict().items():
        assert torch.equal(value, keep.weights[best][name]), name
    assert not [line for line in capsys.readouterr().err.splitlines() if line.startswith("fastlaunch")]
