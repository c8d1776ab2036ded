"""A fastai script that trains 4 epochs; for the checkpoint and resume tests it also writes what it saw.

$FL_MODE: slow (a pause per batch, and $FL_PROBE_OUT/ready-rank<R> at epoch 1's 3rd batch, so a signal lands
mid-epoch), fail_once (rank 1 raises at epoch 2's 4th batch on the first attempt only), signal:<E>:<where>
(rank 0 sends SIGTERM to the launcher once, at epoch E's training batch <where>, or in its validation
when <where> is "valid"), or plain. With $FL_HOLD_FOR_SIGNAL in slow mode, each rank holds at the batch after
its ready marker until its own process has received SIGTERM/SIGUSR1 (a scheduler may deliver a signal
seconds after it was sent; the stop must still land mid-fit). With $FL_SLOW_EXIT_RANK0, rank 0 lingers after its script (a teardown
that ignores SIGTERM) on a Slurm job's first start, so that on several nodes another node's launcher exits first and srun ends the step."""
import atexit
import signal
import json
import os
import time
from pathlib import Path

import torch
from fastai.basics import Callback, Datasets, IndexSplitter, Learner, accuracy
from fastai.callback.schedule import *  # noqa: F401,F403
from torch import nn

MODE = os.environ.get("FL_MODE", "plain")
OUT = Path(os.environ["FL_PROBE_OUT"])
RANK = int(os.environ.get("RANK", 0))
ATTEMPT = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
if os.environ.get("FL_SLOW_EXIT_RANK0") and RANK == 0 and os.environ.get("SLURM_RESTART_COUNT", "0") == "0":
    def slow_teardown():
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        time.sleep(60)

    atexit.register(slow_teardown)


SIGNALLED = []
if os.environ.get("FL_HOLD_FOR_SIGNAL"):
    for _sig in (signal.SIGTERM, signal.SIGUSR1):  # chained before fastlaunch's own handler, which still runs
        def _seen(signum, frame, previous=signal.getsignal(_sig)):
            SIGNALLED.append(signum)
            if callable(previous):
                previous(signum, frame)
        signal.signal(_sig, _seen)


def hold_for_signal(limit_s: float = 180.0) -> None:
    deadline = time.monotonic() + limit_s
    while not SIGNALLED and time.monotonic() < deadline:
        time.sleep(0.1)


def features(i):
    g = torch.Generator().manual_seed(int(i))
    return torch.randn(2, generator=g)


def label(i):
    x = features(i)
    return int(x[0] * x[1] > 0)


def signal_here(epoch: int, where: str) -> None:
    """Rank 0 asks the launcher to stop the job (as Slurm would), once per test."""
    if not MODE.startswith("signal:") or RANK != 0 or MODE.split(":")[1:] != [str(epoch), where]:
        return
    once = OUT / "signalled"
    if not once.exists():
        once.touch()
        os.kill(int(os.environ["FASTLAUNCH_LAUNCHER_PID"]), signal.SIGTERM)


class Pace(Callback):
    def before_fit(self): self.seen = []

    def after_batch(self):
        if not self.training:
            if self.iter == 0:
                signal_here(self.epoch, "valid")
            return
        signal_here(self.epoch, f"batch{self.iter}")
        self.seen.append((self.epoch, self.train_iter))
        if MODE == "slow":
            time.sleep(0.4)
            if self.epoch == 1 and self.iter == 2:
                (OUT / f"ready-rank{RANK}").touch()
            held = OUT / f"held-rank{RANK}"
            if self.epoch == 1 and self.iter == 3 and os.environ.get("FL_HOLD_FOR_SIGNAL") and not held.exists():
                held.touch()  # once: a resumed start numbers the rest of the epoch's batches from 0 again
                hold_for_signal()
        if MODE == "fail_once" and ATTEMPT == 0 and RANK == 1 and self.epoch == 2 and self.iter == 3:
            raise RuntimeError("rank 1 fails once")


items = list(range(1024 + 256))
dsets = Datasets(items, tfms=[[features], [label]], splits=IndexSplitter(list(range(1024, 1280)))(items))
pace = Pace()
learn = Learner(dsets.dataloaders(bs=64), nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2)),
                loss_func=nn.CrossEntropyLoss(), metrics=accuracy, cbs=pace)
learn.fit_one_cycle(4, 1e-2)
rec = learn.recorder
out = {"values": [[float(v) for v in row] for row in rec.values], "n_losses": len(rec.losses),
       "losses": [float(v) for v in rec.losses],
       "lrs": [float(v) for v in rec.lrs], "seen": pace.seen, "attempt": ATTEMPT,
       "weights": sum(float(p.double().sum()) for p in learn.model.parameters())}
(OUT / f"rank{RANK}.json").write_text(json.dumps(out))
