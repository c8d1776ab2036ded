"""A fastai script for the fault tests. $FL_FAULT picks what goes wrong on rank 1 at its 3rd batch:
raise, kill (SIGKILL itself), segv (a real segmentation fault), sleep (a long sleep in a callback: rank 0
waits in the gradient all-reduce), spin (a busy loop outside collectives); late: rank 1 sleeps before
building anything, so it never reaches the process group; extract: rank 0 spends long in an untar_data
while the others wait; or slow: a long run of slow batches for signal tests. Each rank touches
$FL_PROBE_OUT/ready-rank<R> once its DataLoader worker is running.

Failure points, each on rank 1 alone (the other rank goes on into its next collective): loss (the loss
function), worker (a DataLoader worker), transform (a batch transform), before_fit, validation (a callback
during validation), after_fit, stop (a callback failing on the agreed-stop path after a CancelFitException).
Leaving the fit: exit (sys.exit(3) on rank 1), caught (rank 1 raises, the script catches it and carries on
outside the fit), everywhere_caught (every rank raises the same error and the script catches it).
$FL_LINGER makes the failing process linger after its failure: atexit (a handler that waits, as upload
handlers do) or thread (a non-daemon thread that sleeps)."""
import atexit
import ctypes
import os
import signal
import threading
import time
from pathlib import Path

import torch
from fastai.basics import Callback, CancelFitException, DataLoaders, Learner
from fastai.data.load import DataLoader
from torch import nn

FAULT = os.environ.get("FL_FAULT", "slow")
OUT = Path(os.environ["FL_PROBE_OUT"])
RANK = int(os.environ.get("RANK", 0))


LINGER = os.environ.get("FL_LINGER", "")
if RANK == 1 and LINGER == "atexit":
    atexit.register(time.sleep, 3600)
if RANK == 1 and LINGER == "thread":
    threading.Thread(target=time.sleep, args=(3600,), name="uploader").start()  # non-daemon: blocks the exit


def failing_here(what: str) -> bool:
    return FAULT == what and RANK == 1


class Fault(Callback):
    def before_fit(self):
        if failing_here("before_fit"):
            raise RuntimeError("rank 1 fails in before_fit")

    def after_pred(self):
        if not self.training and failing_here("validation"):
            raise RuntimeError("rank 1 fails during validation")

    def after_fit(self):
        if failing_here("after_fit"):
            raise RuntimeError("rank 1 fails in after_fit")

    def after_cancel_fit(self):
        if failing_here("stop"):
            raise RuntimeError("rank 1 fails on the agreed stop")

    def after_batch(self):
        if not self.training:
            return
        (OUT / f"ready-rank{RANK}").touch()
        if FAULT == "slow":
            time.sleep(0.2)
        elif FAULT.startswith("everywhere") and self.iter == 2:
            raise RuntimeError(f"rank {RANK} gives up like every rank")
        elif RANK == 1 and self.iter == 2:
            if FAULT in ("raise", "caught"):
                raise RuntimeError("rank 1 gives up")
            if FAULT == "exit":
                raise SystemExit(3)
            if FAULT == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if FAULT == "segv":
                ctypes.string_at(0)
            if FAULT == "sleep":
                (OUT / "sleeping-rank1").touch()
                time.sleep(3600)
            if FAULT == "spin":
                while True:
                    pass
            if FAULT == "stop":
                raise CancelFitException()
            if FAULT == "sigstop":  # as a debugger attaching, or a job control stop
                os.kill(os.getpid(), signal.SIGSTOP)


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


class Items(list):
    def __getitem__(self, i):
        if failing_here("worker") and isinstance(i, int) and i % 2:  # in the DataLoader worker process
            raise RuntimeError("rank 1's DataLoader worker fails")
        return super().__getitem__(i)


def transform(batch):
    transform.calls += 1
    if failing_here("transform") and transform.calls == 3:
        raise RuntimeError("rank 1's batch transform fails")
    return batch


transform.calls = 0


def loss_func(pred, targ):
    loss_func.calls += 1
    if failing_here("loss") and loss_func.calls == 3:
        raise RuntimeError("rank 1's loss function fails")
    return nn.functional.cross_entropy(pred, targ)


loss_func.calls = 0
data = Items((torch.randn(4), torch.tensor(i % 2)) for i in range(512))
train = DataLoader(data, bs=16, shuffle=True, drop_last=True, num_workers=1, after_batch=transform)
valid = DataLoader(data[:64], bs=16)
learn = Learner(DataLoaders(train, valid), nn.Linear(4, 2), loss_func=loss_func, cbs=Fault())
try:
    learn.fit(100 if FAULT == "slow" else 2)
except RuntimeError as err:  # caught: rank 1 alone carries on outside the fit; everywhere_caught: every rank
    if FAULT not in ("caught", "everywhere_caught"):
        raise
    print(f"rank {RANK} caught: {err}", flush=True)
    if FAULT == "caught":
        time.sleep(3600)
