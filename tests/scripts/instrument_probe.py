"""An ordinary fastai script for the instrumentation tests. $FL_MODE:
  plain   nothing special
  item    a callback calls .item() on the loss after every batch (one sync per step)
  sleepy  the data loader sleeps 20 ms per batch (num_workers=0) and records its sleep and the time
          each batch took to come out of it (the truths the data wait is checked against)
  slow1   rank 1 sleeps 40 ms in a callback after every batch (a straggler)
  die1    rank 1 kills itself during epoch 2
"""
import json
import os
import signal
import time
from pathlib import Path

import torch
from fastai.basics import Callback, DataLoader, DataLoaders, Learner, accuracy
from fastai.callback.progress import ProgressCallback  # noqa: F401  (the bar and results table fastai.*.all bring)
from torch import nn

MODE = os.environ.get("FL_MODE", "plain")
OUT = Path(os.environ["FL_PROBE_OUT"])
RANK = int(os.environ.get("RANK", 0))
slept = {}
fetched = {}


def _note(book, seconds):
    epochs = book.setdefault("epochs", [])
    epochs[-1].append(seconds) if epochs else epochs.append([seconds])


class SleepyLoader(DataLoader):
    """Sleeps 20 ms for every batch it makes; keeps count of its sleep and of each batch's whole fetch time."""

    def create_batch(self, b):
        if MODE == "sleepy" and getattr(self, "is_train", False):
            time.sleep(0.02)
            _note(slept, 0.02)
        return super().create_batch(b)

    def create_batches(self, samps):  # where batches come from, wrapped by fastlaunch's shard or not
        it = super().create_batches(samps)
        while True:
            start = time.perf_counter()
            try:
                batch = next(it)
            except StopIteration:
                return
            if MODE == "sleepy" and getattr(self, "is_train", False):
                _note(fetched, time.perf_counter() - start)
            yield batch


class Probe(Callback):
    def before_train(self):
        slept.setdefault("epochs", []).append([])
        fetched.setdefault("epochs", []).append([])

    def after_batch(self):
        if not self.training:
            return
        if MODE == "item":
            self.loss.item()
        if MODE == "slow1" and RANK == 1:
            time.sleep(0.04)
        if MODE == "die1" and RANK == 1 and self.epoch == 1 and self.iter == 3:
            os.kill(os.getpid(), signal.SIGKILL)


data = [(torch.randn(8), torch.tensor(i % 2)) for i in range(2048)]
train = SleepyLoader(data, bs=16, shuffle=True, drop_last=True, num_workers=0)
train.is_train = True
valid = DataLoader(data[:256], bs=16)
learn = Learner(DataLoaders(train, valid), nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2)),
                loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=Probe())
learn.fit(3, 1e-3)
(OUT / f"slept-rank{RANK}.json").write_text(json.dumps(slept.get("epochs", [])))
(OUT / f"fetched-rank{RANK}.json").write_text(json.dumps(fetched.get("epochs", [])))
