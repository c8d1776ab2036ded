"""An ordinary fastai script for the semantics tests; writes what its process saw to $FL_PROBE_OUT.

$FL_PROBE_MODE:
  metrics      fit 2 epochs with 203 validation rows and three kinds of metric; rank 0 saves weights
  validate     (one process, no launcher) load those weights and validate
  count        fit while counting Python-level collectives per training and validation batch
  cancel       rank 1 alone raises CancelFitException after its 5th training batch
  nan          rank 1 alone reports a NaN loss at its 5th batch, under TerminateOnNaNCallback
  lr_find      lr_find, then fine_tune
  fp16 / bf16  to_fp16() / to_bf16() in the script; autocast checked inside the step
  launcher     no precision call in the script (the launcher's --precision applies)
  side         CSVLogger and SaveModelCallback
  untar        untar_data of a local file URL ($FL_ARCHIVE) on every rank
"""
import hashlib
import json
import os

import torch
import torch.distributed as dist
from fastai.basics import (AccumMetric, Callback, CancelFitException, Datasets, IndexSplitter, Learner, Metric,
                           accuracy)
from fastai.callback.all import CSVLogger, SaveModelCallback, TerminateOnNaNCallback
from fastai.callback.schedule import *  # noqa: F401,F403
from torch import nn

MODE = os.environ.get("FL_PROBE_MODE", "metrics")
OUT = os.environ["FL_PROBE_OUT"]
RANK = int(os.environ.get("RANK", 0))
N_TRAIN, N_VALID, BS = 1024, 203, 64
calls = {"train_batch": 0, "valid_batch": 0, "outside": 0}
phase = ["outside"]

if MODE == "count":  # count every Python-level collective, by where the fit was when it happened
    for name in ("all_reduce", "all_gather", "all_gather_object", "gather_object", "broadcast",
                 "broadcast_object_list", "barrier", "reduce", "all_gather_into_tensor", "reduce_scatter"):
        original = getattr(dist, name)

        def counted(*args, _original=original, **kwargs):
            calls[phase[0]] += 1
            return _original(*args, **kwargs)

        setattr(dist, name, counted)


def features(i):
    g = torch.Generator().manual_seed(int(i))
    return torch.randn(2, generator=g)


def label(i):
    x = features(i)
    return int(x[0] * x[1] > 0)


class Correct(Metric):
    """A custom Metric subclass: the fraction of rows predicted right."""
    def reset(self): self.right, self.total = 0, 0
    def accumulate(self, learn):
        self.right += int((learn.pred.argmax(-1) == learn.yb[0]).sum())
        self.total += len(learn.yb[0])
    @property
    def value(self): return self.right / self.total if self.total else None


def _accum_error(pred, targ): return (pred != targ).float().mean()


class Watch(Callback):
    order = -100

    def before_fit(self):
        self.steps, self.autocast, self.first_draw = 0, set(), None

    def before_batch(self):
        phase[0] = "train_batch" if self.training else "valid_batch"
        if self.first_draw is None and self.training:
            self.first_draw = torch.rand(1).item()  # the augmentation stream of this rank

    def after_pred(self):
        if self.training:
            self.autocast.add(str(torch.get_autocast_dtype("cpu")) if torch.is_autocast_enabled("cpu") else "off")

    def after_loss(self):
        if MODE == "nan" and RANK == 1 and self.training and self.iter == 4:
            self.learn.loss = self.loss * float("nan")  # reported loss only; the gradients stay finite

    def after_step(self): self.steps += 1

    def after_batch(self):
        phase[0] = "outside"
        if MODE == "cancel" and RANK == 1 and self.training and self.iter == 4:
            raise CancelFitException()


def weights(model):
    return hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()


items = list(range(N_TRAIN + N_VALID))
dsets = Datasets(items, tfms=[[features], [label]], splits=IndexSplitter(list(range(N_TRAIN, len(items))))(items))
dls = dsets.dataloaders(bs=BS)
model = nn.Sequential(nn.Linear(2, 32), nn.ReLU(), nn.Linear(32, 2))
watch = Watch()
metrics = [accuracy, Correct(), AccumMetric(_accum_error, dim_argmax=-1)]
cbs = [watch]
if MODE == "nan":
    cbs.append(TerminateOnNaNCallback())
if MODE == "side":
    cbs += [CSVLogger(fname=os.path.join(OUT, "history.csv")), SaveModelCallback(fname="best")]
learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=metrics, cbs=cbs, path=OUT)
out = {"rank": RANK}

if MODE == "validate":
    learn.model.load_state_dict(torch.load(os.path.join(OUT, "final.pth")))
    out["validate"] = [float(v) for v in learn.validate()]
elif MODE == "untar":
    import fastdownload.core as fdc
    from fastai.data.external import untar_data

    original_untar = fdc.untar_dir

    def counting_untar(*args, **kwargs):
        with open(os.path.join(OUT, "extractions.log"), "a") as fh:
            fh.write(f"rank {RANK}\n")
        return original_untar(*args, **kwargs)

    fdc.untar_dir = counting_untar
    path = untar_data("file://" + os.environ["FL_ARCHIVE"], base=os.path.join(OUT, "fastai_home"))
    out["files"] = sorted(p.name for p in path.iterdir())
    import fastai.text.core as text_core

    original_tokenize = text_core.parallel_tokenize

    def counting_tokenize(*args, **kwargs):
        with open(os.path.join(OUT, "tokenizations.log"), "a") as fh:
            fh.write(f"rank {RANK}\n")
        return original_tokenize(*args, **kwargs)

    text_core.parallel_tokenize = counting_tokenize
    tok_dir = text_core.tokenize_folder(path, n_workers=0)
    out["tokenized"] = sorted(p.name for p in tok_dir.iterdir() if p.suffix == ".txt")
elif MODE == "lr_find":
    before = weights(learn.model)
    suggestion = learn.lr_find(show_plot=False)
    out.update(lr=float(suggestion.valley), restored=weights(learn.model) == before, n_losses=len(learn.recorder.losses))
    learn.fine_tune(1, 1e-2)
else:
    if MODE == "fp16":
        learn.to_fp16()
    if MODE == "bf16":
        learn.to_bf16()
    epochs = 3 if MODE in ("fp16", "bf16", "launcher") else 2
    learn.fit_one_cycle(epochs, 2e-2)
    if MODE == "metrics" and RANK == 0:
        torch.save(learn.model.state_dict(), os.path.join(OUT, "final.pth"))

rec = learn.recorder
out.update(
    values=[[float(v) for v in row] for row in getattr(rec, "values", [])],
    losses=[float(v) for v in getattr(rec, "losses", [])],
    lrs=[float(v) for v in getattr(rec, "lrs", [])],
    iters=list(getattr(rec, "iters", [])),
    metric_names=list(getattr(rec, "metric_names", [])),
    steps=watch.steps if hasattr(watch, "steps") else None,
    autocast=sorted(getattr(watch, "autocast", [])),
    first_draw=getattr(watch, "first_draw", None),
    weights=weights(learn.model),
    n_mixed_precision=sum(type(cb).__name__ in ("DevicePrecision", "MixedPrecision") for cb in learn.cbs),
    calls=calls,
    train_batches=len(learn.dls.train),
)
if MODE == "metrics" and RANK == 0:
    preds, _ = learn.get_preds()  # one rank alone (as WandbCallback's log_preds does): must not wait
    out["n_preds"] = len(preds)
with open(os.path.join(OUT, f"{MODE}-rank{RANK}.json"), "w") as fh:
    json.dump(out, fh)
