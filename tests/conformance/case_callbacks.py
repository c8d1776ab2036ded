"""Cases for fastai's callbacks and Learner APIs, on a tabular Learner (the cheapest real application)."""
from __future__ import annotations

import os
from pathlib import Path

from fastai.callback.all import (ActivationStats, CollectDataCallback, CSVLogger, EarlyStoppingCallback,
                                 GradientClip, ReduceLROnPlateau, SaveModelCallback, ShortEpochCallback,
                                 ShowGraphCallback, TerminateOnNaNCallback)
from fastai.interpret import ClassificationInterpretation
from fastai.learner import load_learner
from fastai.tabular.all import tabular_learner
from fastai.callback.schedule import minimum, slide, steep, valley
from fastai.vision.all import accuracy

from data import tabular_dls
from registry import ReadsLearner, case, digest

OUT = Path(os.environ.get("FL_CONF_OUT", "."))


def tab(cbs=(), **kwargs):
    return tabular_learner(tabular_dls(), layers=[32, 16], metrics=accuracy, cbs=list(cbs), path=OUT, **kwargs)


def preds_probes(learn) -> dict:
    """What one process gets from these weights: predictions over the validation set, one prediction."""
    preds, targs = learn.get_preds()
    inp, p2, t2, losses = learn.get_preds(with_input=True, with_loss=True)
    raw, _ = learn.get_preds(act=lambda x: x)
    row = learn.dls.valid_ds.items.iloc[0]
    return {"preds": digest(preds), "n": len(preds), "targs": digest(targs), "inp": digest(inp),
            "losses": digest(losses), "raw": digest(raw), "predict": digest(learn.predict(row)[2])}


@case("progress_and_logs", ["ShowGraphCallback", "CSVLogger", "ProgressCallback (default)", "fit_one_cycle",
                            "Timer-style user callback"], final=tab, probes=preds_probes)
def progress_and_logs():
    learn = tab([ShowGraphCallback(), CSVLogger(fname=str(OUT / "history.csv")), ReadsLearner()])
    learn.fit_one_cycle(1, 1e-2)
    lines = (OUT / "history.csv").read_text().splitlines()
    learn.conformance = {"same": {"csv_rows": len(lines), "csv_header": lines[0]}}
    return learn


@case("trackers", ["SaveModelCallback", "EarlyStoppingCallback", "ReduceLROnPlateau", "TerminateOnNaNCallback",
                   "GradientClip", "fit"], final=tab)
def trackers():
    learn = tab([SaveModelCallback(fname="best"), EarlyStoppingCallback(patience=3), ReduceLROnPlateau(patience=1),
                 TerminateOnNaNCallback(), GradientClip(0.5)])
    learn.fit(2, 1e-2)
    learn.conformance = {"same": {"best_saved": (OUT / "models" / "best.pth").exists()}}
    return learn


@case("hooks_and_short", ["ActivationStats / HookCallback", "ShortEpochCallback", "CollectDataCallback",
                          "fit_flat_cos"], final=tab)
def hooks_and_short():
    learn = tab([ActivationStats(with_hist=False, every=2), CollectDataCallback()])
    learn.fit_flat_cos(1, 1e-2)
    stats = learn.activation_stats.stats
    learn.conformance = {"same": {"stat_rows": len(stats)}}
    learn.fit(1, 1e-3, cbs=ShortEpochCallback(pct=0.5))
    return learn


@case("schedules_and_lr_find", ["fit_sgdr", "lr_find (minimum, steep, valley, slide)", "freeze / unfreeze"],
      final=tab)
def schedules_and_lr_find():
    learn = tab()
    found = learn.lr_find(suggest_funcs=(minimum, steep, valley, slide), show_plot=False)
    learn.freeze()
    learn.fit_sgdr(1, 1, lr_max=1e-2)
    learn.unfreeze()
    learn.fit(1, 1e-3)
    learn.conformance = {"same": {"suggestions": [round(float(v), 8) for v in found]}}
    return learn


@case("save_load_export", ["save / load", "export + load_learner", "get_preds (with_input, with_loss, act)",
                           "predict", "validate"], final=tab, probes=preds_probes)
def save_load_export():
    learn = tab()
    learn.fit_one_cycle(1, 1e-2)
    learn.save("stage1")
    learn.load("stage1")
    learn.export(OUT / "export.pkl")
    loaded = load_learner(OUT / "export.pkl")
    row = learn.dls.valid_ds.items.iloc[0]
    learn.conformance = {"same": {"loaded_predict": digest(loaded.predict(row)[2]),
                                  "validate": [round(float(v), 6) for v in learn.validate()]}}
    return learn


@case("interpretation", ["show_results", "ClassificationInterpretation", "plot_top_losses"], final=tab)
def interpretation():
    learn = tab()
    learn.fit_one_cycle(1, 1e-2)
    learn.show_results(max_n=3)
    interp = ClassificationInterpretation.from_learner(learn)
    interp.plot_top_losses(3)
    learn.conformance = {"same": {"confusion": interp.confusion_matrix().tolist()}}
    return learn


@case("tensorboard", ["TensorBoardCallback"], final=tab)
def tensorboard():
    from fastai.callback.tensorboard import TensorBoardCallback

    learn = tab([TensorBoardCallback(log_dir=str(OUT / "tb"), trace_model=False, log_preds=False)])
    learn.fit(1, 1e-2)
    events = sorted(p.name for p in (OUT / "tb").glob("events.out.tfevents.*"))
    learn.conformance = {"same": {"event_files": len(events)}}
    return learn


@case("wandb_offline", ["WandbCallback"], final=tab, note="WANDB_MODE=offline; ranks other than 0 log nothing",
      upstream="vars() argument must have __dict__ attribute")
def wandb_offline():
    import wandb
    from fastai.callback.wandb import WandbCallback

    os.environ.setdefault("WANDB_MODE", "offline")
    wandb.init(project="conformance", dir=str(OUT))
    learn = tab([WandbCallback(log_preds=False, log_model=False)])
    learn.fit(1, 1e-2)
    wandb.finish()
    runs = sorted(p.name for p in (OUT / "wandb").glob("offline-run-*"))
    learn.conformance = {"same": {"wandb_runs": len(runs)}}
    return learn


@case("gradient_accumulation", ["GradientAccumulation"], final=tab,
      note="n_acc counts the samples of every rank (one process's meaning); micro-steps skip the all-reduce")
def gradient_accumulation():
    from fastai.callback.training import GradientAccumulation

    learn = tab([GradientAccumulation(n_acc=64)])
    learn.fit(1, 1e-2)
    return learn
