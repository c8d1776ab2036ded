"""An ordinary one-GPU fastai script with no distributed code. It also writes what its process saw
(split, items per epoch, batches, final weights, argv) to $FL_PROBE_OUT/rank<RANK>.json for the tests.

$FL_PROBE_MODE picks how it trains, as different users write it:
  fit (default)  fit_one_cycle(2)
  distrib_ctx    the same inside `with learn.distrib_ctx():`, as fastai's docs teach
  export         fit, learn.export(), load_learner, then fine_tune the loaded Learner
  raise          rank 1 raises ValueError at its third training batch
"""
import hashlib
import json
import os
import sys

import torch
from fastai.basics import Callback, Datasets, Learner, RandomSplitter, accuracy, load_learner
from fastai.callback.schedule import *  # noqa: F401,F403  (fit_one_cycle)
from fastai.distributed import *  # noqa: F401,F403  (Learner.distrib_ctx, imported as fastai's docs do)
from torch import nn

N_ITEMS, BS = 1280, 64
MODE = os.environ.get("FL_PROBE_MODE", "fit")
OUT = os.environ["FL_PROBE_OUT"]  # 1024 training items: a multiple of 64 x 2


def features(i):
    g = torch.Generator().manual_seed(int(i))
    return torch.cat([torch.tensor([float(i)]), torch.randn(2, generator=g)])


def label(i):
    x = features(i)
    return int(x[1] * x[2] > 0)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.body(x[:, 1:])  # column 0 carries the item id, for the probe only


class Probe(Callback):
    def before_fit(self):
        self.seen, self.lens, self.batches, self.model_types = [], [], [], set()

    def before_train(self):
        self.seen.append([])
        self.lens.append(len(self.dl))
        self.batches.append(0)

    def after_batch(self):
        self.model_types.add(type(self.learn.model).__name__)
        if self.training:
            if MODE == "raise" and os.environ.get("RANK") == "1" and self.batches[-1] == 2:
                raise ValueError("boom on rank 1")
            self.seen[-1] += [int(v) for v in self.xb[0][:, 0].tolist()]
            self.batches[-1] += 1


splits = RandomSplitter(valid_pct=0.2)(range(N_ITEMS))  # unseeded, as people write it
dsets = Datasets(range(N_ITEMS), tfms=[[features], [label]], splits=splits)
dls = dsets.dataloaders(bs=BS)
probe = Probe()
learn = Learner(dls, Net(), loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=probe)
if MODE == "distrib_ctx":
    with learn.distrib_ctx():
        learn.fit_one_cycle(2, 1e-2)
elif MODE == "export":
    learn.fit_one_cycle(1, 1e-2)
    learn.remove_cb(probe)
    learn.export(os.path.join(OUT, "export.pkl"))
    learn = load_learner(os.path.join(OUT, "export.pkl"))
    learn.dls = dls
    learn.add_cb(probe)
    learn.fine_tune(1, 1e-2)
else:
    learn.fit_one_cycle(2, 1e-2)

weights = b"".join(p.detach().cpu().numpy().tobytes() for p in learn.model.parameters())
out = {
    "rank": int(os.environ.get("RANK", 0)),
    "argv": sys.argv[1:],
    "train_split": sorted(int(i) for i in splits[0]),
    "valid_split": sorted(int(i) for i in splits[1]),
    "seen": probe.seen,
    "lens": probe.lens,
    "batches": probe.batches,
    "model_types": sorted(probe.model_types),
    "n_lrs": len(learn.recorder.lrs),
    "weights": hashlib.sha256(weights).hexdigest(),
    "model_after_fit": type(learn.model).__name__,
}
with open(os.path.join(OUT, f"rank{out['rank']}.json"), "w") as fh:
    json.dump(out, fh)
