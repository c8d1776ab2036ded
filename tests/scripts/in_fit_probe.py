"""What users do inside a fit, each as its smallest script: `python in_fit_probe.py CASE[,CASE...]`.

Under `fastlaunch --cpu N` every rank writes $FL_OUT/<case>-rank<R>.json; as one plain process,
<case>-rank0.json with "world": 1. Where a figure needs one process's answer on the same weights (a
validation loss, predictions), the case computes that reference by hand in the same process, batch by
batch over the whole validation set in one process's order (`reference`), and writes both.
"""
from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import torch
from fastai.basics import (Callback, CancelBatchException, CancelStepException, CrossEntropyLossFlat, DataLoader,
                           DataLoaders, Learner, accuracy)
from fastai.callback.schedule import SuggestionMethod  # noqa: F401  (lr_find's suggestions)
from fastai.callback.tracker import ReduceLROnPlateau
from torch import nn

OUT = Path(os.environ.get("FL_OUT", "."))
RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
N_TRAIN, N_VALID, BS = 320, 100, 16  # 100 = 6 whole batches and one of 4: the ranks' shares differ


def items(n: int, seed: int, corrupt: int | None = None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = ((x[:, 0] + 0.5 * x[:, 1] - x[:, 2]) > 0).long()
    if corrupt is not None:
        x[corrupt] = float("nan")  # one bad record, as a corrupt file in a real dataset
    return list(zip(x, y))


def dls(corrupt: int | None = None) -> DataLoaders:
    return DataLoaders(DataLoader(items(N_TRAIN, 1, corrupt), bs=BS, shuffle=True, drop_last=True),
                       DataLoader(items(N_VALID, 2), bs=BS))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 2))


def reference(learn, per_batch) -> float:
    """One process's whole-set mean of per_batch(pred, y) over the validation set, batch by batch."""
    model = getattr(learn.model, "module", learn.model)
    xs, ys = map(torch.stack, zip(*items(N_VALID, 2)))
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.no_grad():
        for i in range(0, N_VALID, BS):
            x, y = xs[i:i + BS], ys[i:i + BS]
            total += float(per_batch(model(x), y)) * len(y)
    model.train(was_training)
    return total / N_VALID


def ce(out, y): return nn.functional.cross_entropy(out, y)


def digest(t: torch.Tensor) -> list[float]:
    t = t.detach().float()
    return [round(float(t.sum()), 4), round(float(t.abs().sum()), 4), len(t)]


def write(case: str, out: dict) -> None:
    (OUT / f"{case}-rank{RANK}.json").write_text(json.dumps({"world": WORLD, **out}))


# -- lr_find: its sweep and suggestions ------------------------------------------------------------------------
def lr_find() -> None:
    """A regression whose loss falls smoothly with the learning rate until it diverges: a well-defined
    valley. Its suggestions still move with the data order (about 2x): one process sweeps 5 orders and
    writes each one's suggestions (`valleys`, `minimums`), fastlaunch's ranks one."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2560, 8, generator=g)
    y = x @ torch.linspace(-2, 2, 8) + 0.1 * torch.randn(2560, generator=g)
    found_all = []
    for order in range(5 if WORLD == 1 else 1):
        if WORLD == 1:
            random.seed(order)  # fastai's DataLoader draws its shuffling seed from `random`
        data = DataLoaders(DataLoader(list(zip(x, y[:, None])), bs=64, shuffle=True, drop_last=True),
                           DataLoader(list(zip(x[:128], y[:128, None])), bs=64))  # 40 batches per epoch in one process
        torch.manual_seed(0)
        learn = Learner(data, nn.Linear(8, 1), loss_func=nn.MSELoss())
        found = learn.lr_find(show_plot=False, suggest_funcs=(SuggestionMethod.Valley, SuggestionMethod.Minimum))
        found_all.append((float(found.valley), float(found.minimum), len(learn.recorder.lrs),
                          float(learn.recorder.lrs[-1])))
    write("lr_find", {"steps": found_all[0][2], "last_lr": found_all[0][3], "valley": found_all[0][0],
                      "minimum": found_all[0][1], "valleys": [f[0] for f in found_all],
                      "minimums": [f[1] for f in found_all]})


# -- a callback that switches itself off during lr_find (ShowGraph, W&B, TensorBoard do) ------------------------
class OffDuringLRFind(Callback):
    def __init__(self): self.epochs = 0
    def before_fit(self): self.run = not hasattr(self.learn, "lr_finder")
    def after_epoch(self): self.epochs += 1


def run_flag() -> None:
    cb = OffDuringLRFind()
    learn = Learner(dls(), mlp(), loss_func=ce, cbs=cb)
    learn.lr_find(show_plot=False)
    learn.fit(2, 1e-2)
    write("run_flag", {"epochs_seen": cb.epochs})


# -- predictions and validation from a callback during the fit ------------------------------------------------
class ScoresEachEpoch(Callback):
    """A per-epoch score callback: get_preds on the validation loader (inner, as W&B's log_predictions),
    and a sanity validate() after the first epoch."""

    order = 70  # after the Recorder has logged the epoch

    def __init__(self): self.seen, self.busy = [], False

    def after_epoch(self):
        if self.busy:  # validate() fires after_epoch again
            return
        self.busy = True
        learn = self.learn
        preds, targs = learn.get_preds(dl=self.dls.valid, inner=True)
        inp, preds2, targs2, losses = learn.get_preds(dl=self.dls.valid, inner=True, with_input=True, with_loss=True)
        plain, _ = learn.get_preds(dl=self.dls.valid, reorder=False)  # not inner: fires the fit events again
        default, _ = learn.get_preds()  # ds_idx=1: a new loader made from the fit's validation loader
        want = reference(learn, lambda out, y: ce(out, y))
        row = {"n": len(preds), "targets": digest(targs), "preds": digest(preds[:, 1]),
               "inputs": digest(inp), "losses_mean": round(float(losses.mean()), 5), "reference_loss": round(want, 5),
               "same_as_first": all(bool(torch.allclose(preds, p)) for p in (preds2, plain, default))}
        if self.epoch == 0:
            row["validate"] = [round(float(v), 5) for v in learn.validate()]
        self.seen.append(row)
        self.busy = False


def preds_in_fit() -> None:
    cb = ScoresEachEpoch()
    learn = Learner(dls(), mlp(), loss_func=CrossEntropyLossFlat(), metrics=accuracy, cbs=cb)
    learn.fit(2, 1e-2)
    learn.remove_cb(cb)  # fastai's validate() holds the Learner's lock: a get_preds in its events would wait forever
    after = [round(float(v), 5) for v in learn.validate()]
    write("preds_in_fit", {"seen": cb.seen, "after_fit_validate": after,
                           "reference_after": round(reference(learn, lambda out, y: ce(out, y)), 5),
                           "valid_loader": [type(learn.dls.valid).__name__, len(learn.dls.valid)],
                           "recorded": [[round(float(v), 5) for v in row] for row in learn.recorder.values]})


# -- a loss changed in after_loss (an activation penalty, in training and validation) ---------------------------
class ActivationPenalty(Callback):
    def after_loss(self):
        penalty = 0.1 * self.learn.pred.pow(2).mean()
        self.learn.loss_grad = self.learn.loss_grad + penalty
        self.learn.loss = self.learn.loss + penalty.detach()


def changed_loss() -> None:
    learn = Learner(dls(), mlp(), loss_func=ce, cbs=ActivationPenalty())
    learn.fit(2, 1e-2)
    want = reference(learn, lambda out, y: ce(out, y) + 0.1 * out.pow(2).mean())
    write("changed_loss", {"valid_loss": round(float(learn.recorder.values[-1][1]), 5), "reference": round(want, 5)})


# -- a model returning (logits, aux_loss), its loss and metric indexing it, ReduceLROnPlateau --------------------
class WithAuxLoss(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = mlp()

    def forward(self, x):
        logits = self.net(x)
        return logits, 0.01 * logits.pow(2).mean()  # a scalar balance loss, as MoE layers return


def aux_loss(out, y): return ce(out[0], y) + out[1]
def aux_accuracy(out, y): return (out[0].argmax(-1) == y).float().mean()


def tuple_output() -> None:
    learn = Learner(dls(), WithAuxLoss(), loss_func=aux_loss, metrics=aux_accuracy,
                    cbs=ReduceLROnPlateau(patience=0, factor=5.0, min_delta=0.5))
    learn.fit(3, 1e-2)
    write("tuple_output", {"values": [[round(float(v), 5) for v in row] for row in learn.recorder.values],
                           "lr": learn.opt.hypers[-1]["lr"],
                           "reference": [round(reference(learn, aux_loss), 5), round(reference(learn, aux_accuracy), 5)]})


# -- a batch skipped when its loss is not finite (one corrupt record, in one rank's shard) -----------------------
class SkipNonFinite(Callback):
    def __init__(self): self.skipped = 0
    def after_loss(self):
        if not torch.isfinite(self.learn.loss):
            raise CancelBatchException()
    def after_cancel_batch(self): self.skipped += 1


def skip_batch() -> None:
    cb = SkipNonFinite()
    learn = Learner(dls(corrupt=5), mlp(), loss_func=ce, cbs=cb)
    learn.fit(2, 1e-2)
    params = torch.cat([p.detach().flatten() for p in learn.model.parameters()])
    write("skip_batch", {"skipped": cb.skipped, "finite": bool(torch.isfinite(params).all()),
                         "weights": digest(params), "values": [[round(float(v), 5) for v in row]
                                                               for row in learn.recorder.values]})


# -- a step skipped by one rank alone, after the gradients were reduced --------------------------------------
class SkipStepOnRankOne(Callback):
    def before_step(self):
        if RANK == 1 and self.iter == 2:
            raise CancelStepException()


def skip_step_alone() -> None:
    learn = Learner(dls(), mlp(), loss_func=ce, cbs=SkipStepOnRankOne())
    learn.fit(1, 1e-2)
    write("skip_step_alone", {"finished": True})


# -- schedules sized from the loaders: one-cycle, and a short epoch ------------------------------------------
def schedules() -> None:
    from fastai.callback.training import ShortEpochCallback

    learn = Learner(dls(), mlp(), loss_func=ce)
    learn.fit_one_cycle(2, 1e-2)
    lrs = [float(v) for v in learn.recorder.lrs]
    short = Learner(dls(), mlp(), loss_func=ce, cbs=ShortEpochCallback(pct=0.5))
    short.fit(1, 1e-2)
    write("schedules", {"lrs": lrs, "short_steps": len(short.recorder.lrs), "per_epoch": len(learn.dls.train)})


# -- a SentencePiece tokenizer trained while setting up (the fastai book's `subword(1000)`) ---------------------
def subword() -> None:
    import sentencepiece
    from fastai.text.core import SentencePieceTokenizer

    trained = []
    train = sentencepiece.SentencePieceTrainer.Train
    sentencepiece.SentencePieceTrainer.Train = lambda *a, **k: (trained.append(1), train(*a, **k))[1]
    words = ["the", "movie", "was", "great", "terrible", "acting", "plot", "and", "but", "really", "not", "very"]
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (12,), generator=g)) for _ in range(300)]
    tok = SentencePieceTokenizer(vocab_sz=40, cache_dir="tmp")
    tok.setup(texts)
    pieces = next(iter(tok(["the movie was really great"])))
    write("subword", {"trained": len(trained), "pieces": list(pieces)})


CASES = {f.__name__: f for f in (subword, schedules, lr_find, run_flag, preds_in_fit, changed_loss, tuple_output, skip_batch,
                                 skip_step_alone)}

if __name__ == "__main__":
    for name in sys.argv[1].split(","):
        CASES[name]()
