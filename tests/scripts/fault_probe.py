"""A fastai script for the fault tests. $FL_FAULT picks what goes wrong on rank 1 at its 3rd batch:
raise, kill (SIGKILL itself), segv (a real segmentation fault); or slow: a long run of slow batches for
signal tests. Each rank touches $FL_PROBE_OUT/ready-rank<R> once its DataLoader worker is running."""
import ctypes
import os
import signal
import time
from pathlib import Path

import torch
from fastai.basics import Callback, DataLoaders, Learner
from fastai.data.load import DataLoader
from torch import nn

FAULT = os.environ.get("FL_FAULT", "slow")
OUT = Path(os.environ["FL_PROBE_OUT"])
RANK = int(os.environ.get("RANK", 0))


class Fault(Callback):
    def after_batch(self):
        if not self.training:
            return
        (OUT / f"ready-rank{RANK}").touch()
        if FAULT == "slow":
            time.sleep(0.2)
        elif RANK == 1 and self.iter == 2:
            if FAULT == "raise":
                raise RuntimeError("rank 1 gives up")
            if FAULT == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if FAULT == "segv":
                ctypes.string_at(0)


data = [(torch.randn(4), torch.tensor(i % 2)) for i in range(512)]
train = DataLoader(data, bs=16, shuffle=True, drop_last=True, num_workers=1)
valid = DataLoader(data[:64], bs=16)
learn = Learner(DataLoaders(train, valid), nn.Linear(4, 2), loss_func=nn.CrossEntropyLoss(), cbs=Fault())
learn.fit(100 if FAULT == "slow" else 2)
