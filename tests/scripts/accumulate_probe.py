"""GradientAccumulation as users write it: n_acc=32 over batches of 16. Writes the final weights, the
recorded losses, and (under fastlaunch) the number of gradient all-reduces to $FL_PROBE_OUT/rank<R>.json."""
import json
import os
from functools import partial

import torch
from fastai.basics import SGD, DataLoaders, Learner
from fastai.callback.training import GradientAccumulation
from fastai.data.load import DataLoader
from torch import nn

OUT = os.environ["FL_PROBE_OUT"]
RANK = int(os.environ.get("RANK", 0))
allreduces = [0]
if "RANK" in os.environ:  # count the gradient all-reduces DDP makes through fastlaunch's comm hook
    from fastlaunch.rank.callbacks import placement

    original = placement.flag_bucket_hook  # one gradient all-reduce per bucket

    def counted(channel, bucket):
        allreduces[0] += 1
        return original(channel, bucket)

    placement.flag_bucket_hook = counted

g = torch.Generator().manual_seed(0)
x = torch.randn(256, 4, generator=g)
data = [(x[i], (x[i, 0] + x[i, 1] > 0).long()) for i in range(256)]
dls = DataLoaders(DataLoader(data, bs=16, shuffle=False, drop_last=True), DataLoader(data[:64], bs=16))
torch.manual_seed(0)
learn = Learner(dls, nn.Linear(4, 2), loss_func=nn.CrossEntropyLoss(), opt_func=partial(SGD, mom=0.9),
                cbs=GradientAccumulation(n_acc=32))
learn.fit(1, 0.1)
with open(os.path.join(OUT, f"rank{RANK}.json"), "w") as fh:
    json.dump({"weights": [p.detach().flatten().tolist() for p in learn.model.parameters()],
               "losses": [float(v) for v in learn.recorder.losses], "allreduces": allreduces[0]}, fh)
