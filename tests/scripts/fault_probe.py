"""A fastai script for the fault tests. $FL_FAULT picks what goes wrong on rank 1 at its 3rd batch:
raise, kill (SIGKILL itself), segv (a real segmentation fault), sleep (a long sleep in a callback: rank 0
waits in the gradient all-reduce), spin (a busy loop outside collectives); late: rank 1 sleeps before
building anything, so it never reaches the process group; extract: rank 0 spends long in an untar_data
while the others wait; or slow: a long run of slow batches for signal tests. Each rank touches
$FL_PROBE_OUT/ready-rank<R> once its DataLoader worker is running."""
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
            if FAULT == "sleep":
                time.sleep(3600)
            if FAULT == "spin":
                while True:
                    pass


if FAULT == "late" and RANK == 1:
    time.sleep(3600)
if FAULT == "extract":  # every rank calls untar_data; rank 0 extracts slowly first, rank 1 waits for it
    import fastdownload.core as fdc
    from fastai.data.external import untar_data

    original_untar = fdc.untar_dir

    def slow_untar(*args, **kwargs):
        time.sleep(8)
        return original_untar(*args, **kwargs)

    fdc.untar_dir = slow_untar
    untar_data("file://" + os.environ["FL_ARCHIVE"], base=str(OUT / "home"))


data = [(torch.randn(4), torch.tensor(i % 2)) for i in range(512)]
train = DataLoader(data, bs=16, shuffle=True, drop_last=True, num_workers=1)
valid = DataLoader(data[:64], bs=16)
learn = Learner(DataLoaders(train, valid), nn.Linear(4, 2), loss_func=nn.CrossEntropyLoss(), cbs=Fault())
learn.fit(100 if FAULT == "slow" else 2)
