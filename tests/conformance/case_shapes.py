"""Cases for script shapes: several Learners, a fit in a function called twice, a second unseeded split
after a fit, a script that calls fastai's distributed helpers itself, custom models (a tuple output,
unused parameters), DataLoader workers."""
from __future__ import annotations

import os
from pathlib import Path

import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.distributed import *  # noqa: F401,F403  (distrib_ctx, to_distributed, as fastai's docs show)
from fastai.tabular.all import Categorify, CategoryBlock, Normalize, RandomSplitter, TabularPandas, range_of, tabular_learner
from fastai.vision.all import Learner, accuracy
from torch import nn

from data import N_VALID, tabular_df, tensor_items
from registry import case, digest

OUT = Path(os.environ.get("FL_CONF_OUT", "."))


def _tensor_dls(num_workers: int = 0):
    items = tensor_items()
    return DataLoaders(DataLoader(items[:-N_VALID], bs=16, shuffle=True, drop_last=True, num_workers=num_workers),
                       DataLoader(items[-N_VALID:], bs=16, num_workers=num_workers))


class TupleModel(nn.Module):
    """Returns (logits, features), as many research models do; the loss reads the first."""

    def __init__(self):
        super().__init__()
        self.body, self.head = nn.Sequential(nn.Linear(4, 16), nn.ReLU()), nn.Linear(16, 2)

    def forward(self, x):
        feats = self.body(x)
        return self.head(feats), feats


def tuple_loss(out, y): return nn.functional.cross_entropy(out[0], y)
def tuple_accuracy(out, y): return (out[0].argmax(-1) == y).float().mean()


def tuple_learner():
    return Learner(_tensor_dls(), TupleModel(), loss_func=tuple_loss, metrics=tuple_accuracy, path=OUT)


@case("tuple_model", ["plain Learner on a custom model returning a tuple"], final=tuple_learner)
def tuple_model():
    learn = tuple_learner()
    learn.fit(1, 1e-2)
    return learn


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.used, self.unused = nn.Linear(4, 2), nn.Linear(4, 2)

    def forward(self, x): return self.used(x)


def unused_learner():
    return Learner(_tensor_dls(), WithUnused(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=OUT)


@case("unused_parameters", ["a model with unused parameters"], final=unused_learner,
      note="found in the first step (DDP's static graph): the set of parameters a step uses must not change")
def unused_parameters():
    learn = unused_learner()
    learn.fit(1, 1e-2)
    return learn


def _tab_learner(splitter):
    df = tabular_df()
    to = TabularPandas(df, procs=[Categorify, Normalize], cat_names=["colour", "size"], cont_names=["x1", "x2"],
                       y_names="target", y_block=CategoryBlock(), splits=splitter(range_of(df)))
    return tabular_learner(to.dataloaders(bs=32), layers=[16], metrics=accuracy, path=OUT)


def _fixed():
    return _tab_learner(lambda items: (list(items[:-N_VALID]), list(items[-N_VALID:])))


@case("three_learners_resplit", ["two and three Learners in one script", "an unseeded RandomSplitter after a fit"],
      final=None)
def three_learners_resplit():
    first = _fixed()
    first.fit(1, 1e-2)
    split = RandomSplitter()(range(200))  # unseeded, after a fit: must agree across ranks
    second = _tab_learner(RandomSplitter())
    second.fit(1, 1e-2)
    third = _tab_learner(RandomSplitter())
    third.fit(1, 1e-2)
    third.conformance = {"same": {"split": digest(torch.tensor(split[1])),
                                  "second_valid": digest(torch.tensor(list(second.dls.valid_ds.items.index))),
                                  "third_valid": digest(torch.tensor(list(third.dls.valid_ds.items.index))),
                                  "init": digest(next(_tab_learner(RandomSplitter()).model.parameters()))}}
    return third


def train_once(lr: float):
    learn = _fixed()
    learn.fit_one_cycle(1, lr)
    return learn


@case("fit_in_function_twice", ["a fit inside a function called twice"], final=_fixed)
def fit_in_function_twice():
    train_once(1e-2)
    return train_once(5e-3)


@case("distrib_ctx_in_script", ["distrib_ctx / to_distributed in the script"], final=_fixed,
      note="fastai's own helpers are accepted and do nothing: fastlaunch already runs the job")
def distrib_ctx_in_script():
    learn = _fixed()
    with learn.distrib_ctx():
        learn.fit(1, 1e-2)
    learn.to_distributed(0)
    learn.fit(1, 1e-3)
    learn.detach_distributed()
    return learn


def workers_learner():
    return Learner(_tensor_dls(num_workers=2), nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2)),
                   loss_func=nn.CrossEntropyLoss(), metrics=accuracy, path=OUT)


@case("main_guard_workers", ["an `if __name__ == \"__main__\":` guard with num_workers=2"], final=workers_learner)
def main_guard_workers():
    learn = workers_learner()
    learn.fit(1, 1e-2)
    return learn
