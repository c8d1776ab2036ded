"""Patches for what a fit does besides training: lr_find's checkpoint, CSV history, the loss graph,
best-model reload, mixed precision on the rank's device, and downloads and tokenizer caches made once
per node."""
from __future__ import annotations

import copy
import functools
import threading

from ..patching import patch
from .in_fit import lr_find_epochs

__all__ = ["SIDE_EFFECT_PATCHES"]


def _unwrap(model):
    return getattr(model, "module", model)


@patch("fastai.callback.schedule.LRFinder.before_fit", "fastai.callback.schedule.LRFinder.after_fit",
       module="fastai.callback.schedule",
       assumes=("fastai.callback.schedule.LRFinder.before_fit", "fastai.callback.schedule.LRFinder.after_fit",
                "fastai.learner.Learner.lr_find"))
def lr_find_in_memory(ctx, p) -> None:
    """lr_find saves to a per-rank temp folder that only rank 0 writes, so only rank 0 reaches the
    barrier in load and rank 1 never restores its weights (a deadlock): snapshot and restore model and
    optimizer in memory on every rank. In a distributed fit its epochs are counted again from the rank's
    loader (in_fit.py): the sweep takes its num_it steps, as in one process."""
    from fastai.callback.schedule import LRFinder, ParamScheduler

    def before_fit(self):
        ParamScheduler.before_fit(self)
        if ctx.stop_of(self.learn) is not None:  # fastai counted the epochs from one process's loader length
            self.learn.n_epoch = max(self.learn.n_epoch, lr_find_epochs(self.learn, self.num_it))
        model = _unwrap(self.learn.model)
        self._snapshot = ({k: v.detach().clone() for k, v in model.state_dict().items()},
                          copy.deepcopy(self.learn.opt.state_dict()))
        self.best_loss = float("inf")

    def after_fit(self):
        self.learn.opt.zero_grad()  # needed before detaching the optimizer for future fits
        model_state, opt_state = self._snapshot
        _unwrap(self.learn.model).load_state_dict(model_state)
        self.learn.opt.load_state_dict(opt_state)
        self._snapshot = None

    p.set(LRFinder, "before_fit", before_fit)
    p.set(LRFinder, "after_fit", after_fit)


@patch("fastai.callback.progress.CSVLogger.before_fit", "fastai.callback.progress.CSVLogger.after_fit",
       module="fastai.callback.progress",
       assumes=("fastai.callback.progress.CSVLogger.before_fit", "fastai.callback.progress.CSVLogger.after_fit"))
def csv_logger_rank_zero(ctx, p) -> None:
    """CSVLogger opens its file with 'w' on every rank: the others truncate rank 0's history."""
    from fastai.callback.progress import CSVLogger

    for name in ("before_fit", "after_fit"):
        original = getattr(CSVLogger, name)

        @functools.wraps(original)
        def on_rank_zero(self, _original=original):
            if ctx.is_rank_zero:
                return _original(self)

        p.set(CSVLogger, name, on_rank_zero)


@patch("fastai.callback.progress.ShowGraphCallback.before_fit", module="fastai.callback.progress",
       assumes=("fastai.callback.progress.ShowGraphCallback.before_fit",))
def show_graph_rank_zero(ctx, p) -> None:
    """ShowGraphCallback asserts the Learner has a progress bar, which only rank 0 keeps (as with fastai's
    own to_distributed): the other ranks failed with 'IndexError: tuple index out of range' (fastai's
    message rewrite of a bare assert). It draws on rank 0 and stands aside for the fit elsewhere."""
    from fastai.callback.progress import ShowGraphCallback

    original = ShowGraphCallback.before_fit

    @functools.wraps(original)
    def before_fit(self):
        if not ctx.is_rank_zero:
            self.run = False  # fastai's Callback.__call__ sets run back to True after the fit
            return None
        return original(self)

    p.set(ShowGraphCallback, "before_fit", before_fit)


@patch("fastai.callback.tracker.SaveModelCallback.after_fit", module="fastai.callback.tracker",
       assumes=("fastai.callback.tracker.SaveModelCallback.after_fit",))
def save_model_reload_from_rank_zero(ctx, p) -> None:
    """SaveModelCallback reloads the best model with torch.load(weights_only=False), which would run whatever
    a model file swapped in since it was saved holds: at every world size, fastai's own load_model reads it
    with weights_only=True (fastai's containers allowed), and a file it refuses is one line (the model keeps
    its last weights). With several ranks the file is one only rank 0 wrote (on several machines without a
    shared filesystem the others cannot read it): rank 0 loads it and sends the weights."""
    import pickle
    import re

    import torch.distributed as dist
    from fastai.callback.tracker import SaveModelCallback
    from fastai.learner import load_model
    from fastcore.xtras import join_path_file

    from ...lines import rank_warning

    original = SaveModelCallback.after_fit

    @functools.wraps(original)
    def after_fit(self, **kwargs):
        if self.at_end or self.every_epoch:
            return original(self, **kwargs)  # no reload
        model = _unwrap(self.learn.model)
        if ctx.is_rank_zero:
            file = join_path_file(self.fname, self.learn.path / self.learn.model_dir, ext=".pth")
            try:
                load_model(file, model, self.learn.opt, with_opt=self.with_opt, weights_only=True,
                           device=next(model.parameters()).device)
            except pickle.UnpicklingError as err:  # torch's refusal: the global it would not call, if named
                found = re.search(r"GLOBAL ([\w.]+)", str(err))
                why = found[1] if found else type(err).__name__
                rank_warning(f"fastlaunch: not reloading the best model from {file}: it holds more than tensors "
                             f"and plain data ({why}); the model keeps its last epoch's weights")
        if ctx.env.is_distributed and dist.is_initialized():
            ctx.comm.broadcast_tensors([t.data for t in [*model.parameters(), *model.buffers()]], src=0)

    p.set(SaveModelCallback, "after_fit", after_fit)


@patch("fastai.*.MixedPrecision", "fastai.learner.Learner.to_fp16", "fastai.learner.Learner.to_bf16", module="fastai.callback.fp16",
       assumes=("fastai.callback.fp16.MixedPrecision.before_fit", "fastai.callback.fp16.MixedPrecision.after_fit"))
def precision_for_device(ctx, p) -> None:
    """MixedPrecision hard-codes autocast('cuda') and turns itself off on CPU: every MixedPrecision a
    script creates is the device-aware subclass, and to_fp16/to_bf16 replace (never add) a precision."""
    import fastai.callback.fp16 as fp16
    from fastai.learner import Learner

    from ..callbacks.precision import DevicePrecision, use_script_precision

    p.replace_everywhere("MixedPrecision", fp16.MixedPrecision, DevicePrecision)

    def to_fp16(self, **kwargs): return use_script_precision(ctx, self, DevicePrecision(**kwargs))
    def to_bf16(self): return use_script_precision(ctx, self, DevicePrecision(amp_mode=fp16.AMPMode.BF16))

    p.set(Learner, "to_fp16", to_fp16)
    p.set(Learner, "to_bf16", to_bf16)


def _first_on_node(ctx, original, depth: threading.local):
    """Run a download step on local rank 0 first (outermost call only: get() calls download())."""
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if getattr(depth, "n", 0):
            return original(*args, **kwargs)
        depth.n = 1
        try:
            return ctx.comm.local_rank_zero_first(original, *args, **kwargs)
        finally:
            depth.n = 0
    return wrapper


@patch("fastdownload.core.FastDownload.*", "fastai.*.fastai_cfg", module="fastai.data.external")
def downloads_local_rank_zero_first(ctx, p) -> None:
    """FastDownload (behind untar_data) and fastai's config.ini creation race when every rank downloads
    and extracts into the same folder: each node's local rank 0 goes first, the others then find it done."""
    import fastai.data.external as external
    from fastdownload import FastDownload

    depth = threading.local()  # one download step at a time per thread: the outermost call waits
    for name in ("__init__", "get", "download", "extract"):
        p.set(FastDownload, name, _first_on_node(ctx, getattr(FastDownload, name), depth))
    p.replace_everywhere("fastai_cfg", external.fastai_cfg, _first_on_node(ctx, external.fastai_cfg, depth))


@patch("fastai.*._tokenize_files", "fastai.*.tokenize_csv", module="fastai.text.core")
def tokenizer_cache_local_rank_zero_first(ctx, p) -> None:
    """fastai writes its tokenizer cache (<path>_tok, <name>_tok.csv) from every rank at once: each node's
    local rank 0 tokenizes first; the others then find the cache and skip it."""
    import fastai.text.core as text_core

    depth = threading.local()
    for name in ("_tokenize_files", "tokenize_csv"):
        original = getattr(text_core, name)
        p.replace_everywhere(name, original, _first_on_node(ctx, original, depth))


@patch("fastai.text.core.SentencePieceTokenizer.setup", module="fastai.text.core",
       assumes=("fastai.text.core.SentencePieceTokenizer.setup", "fastai.text.core.SentencePieceTokenizer.train"))
def sentencepiece_trained_once_per_node(ctx, p) -> None:
    """SentencePieceTokenizer.setup writes <cache_dir>/texts.out, trains spm.model from it and deletes it:
    every rank at once (the fastai book's `subword(1000)`) failed with FileNotFoundError on texts.out. Each
    node's local rank 0 trains; the node's other ranks then load the model it wrote."""
    from fastai.text.core import SentencePieceTokenizer

    original = SentencePieceTokenizer.setup

    def load_trained(self, items, rules=None):
        from sentencepiece import SentencePieceProcessor

        model = self.cache_dir / "spm.model"
        self.tok = SentencePieceProcessor()
        self.tok.Load(str(model))
        return {"sp_model": model}

    @functools.wraps(original)
    def setup(self, items, rules=None):
        if self.tok is not None or ctx.env.local_world_size <= 1:
            return original(self, items, rules)
        return ctx.comm.local_rank_zero_first(original if ctx.env.local_rank == 0 else load_trained, self, items, rules)

    p.set(SentencePieceTokenizer, "setup", setup)


SIDE_EFFECT_PATCHES = (lr_find_in_memory, csv_logger_rank_zero, show_graph_rank_zero, save_model_reload_from_rank_zero,
                       precision_for_device, downloads_local_rank_zero_first, tokenizer_cache_local_rank_zero_first,
                       sentencepiece_trained_once_per_node)
