"""Patches for what a fit does besides training: lr_find's checkpoint, CSV history, the loss graph,
best-model reload, mixed precision on the rank's device, and downloads and tokenizer caches made once
per node."""
from __future__ import annotations

import copy
import functools
import threading

from ..comm import current_env, is_rank_zero, local_rank_zero_first
from .core import replace_everywhere

__all__ = ["SIDE_EFFECT_PATCHES"]


def _unwrap(model):
    return getattr(model, "module", model)


def patch_lr_find_in_memory() -> None:
    """lr_find saves to a per-rank temp folder that only rank 0 writes, so only rank 0 reaches the
    barrier in load and rank 1 never restores its weights (a deadlock): snapshot and restore model and
    optimizer in memory on every rank."""
    from fastai.callback.schedule import LRFinder, ParamScheduler

    def before_fit(self):
        ParamScheduler.before_fit(self)
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

    LRFinder.before_fit, LRFinder.after_fit = before_fit, after_fit


def patch_csv_logger_rank_zero() -> None:
    """CSVLogger opens its file with 'w' on every rank: the others truncate rank 0's history."""
    from fastai.callback.progress import CSVLogger

    for name in ("before_fit", "after_fit"):
        original = getattr(CSVLogger, name)

        @functools.wraps(original)
        def on_rank_zero(self, _original=original):
            if is_rank_zero():
                return _original(self)

        setattr(CSVLogger, name, on_rank_zero)


def patch_show_graph_rank_zero() -> None:
    """ShowGraphCallback asserts the Learner has a progress bar, which only rank 0 keeps (as with fastai's
    own to_distributed): the other ranks failed with 'IndexError: tuple index out of range' (fastai's
    message rewrite of a bare assert). It draws on rank 0 and stands aside for the fit elsewhere."""
    from fastai.callback.progress import ShowGraphCallback

    original = ShowGraphCallback.before_fit

    @functools.wraps(original)
    def before_fit(self):
        if not is_rank_zero():
            self.run = False  # fastai's Callback.__call__ sets run back to True after the fit
            return None
        return original(self)

    ShowGraphCallback.before_fit = before_fit


def patch_save_model_reload_from_rank_zero() -> None:
    """SaveModelCallback reloads the best model from a file only rank 0 wrote: on several machines
    without a shared filesystem the others cannot read it. Rank 0 loads it and sends the weights."""
    import torch.distributed as dist
    from fastai.callback.tracker import SaveModelCallback
    from fastai.learner import load_model
    from fastcore.xtras import join_path_file

    original = SaveModelCallback.after_fit

    @functools.wraps(original)
    def after_fit(self, **kwargs):
        if self.at_end or self.every_epoch or not current_env().is_distributed or not dist.is_initialized():
            return original(self, **kwargs)
        model = _unwrap(self.learn.model)
        if is_rank_zero():
            file = join_path_file(self.fname, self.learn.path / self.learn.model_dir, ext=".pth")
            # fastai's own load: weights_only=True, with fastai's containers allowed
            load_model(file, model, self.learn.opt, with_opt=self.with_opt, device=next(model.parameters()).device)
        for tensor in [*model.parameters(), *model.buffers()]:
            dist.broadcast(tensor.data, src=0)

    SaveModelCallback.after_fit = after_fit


def patch_precision_for_device() -> None:
    """MixedPrecision hard-codes autocast('cuda') and turns itself off on CPU: every MixedPrecision a
    script creates is the device-aware subclass, and to_fp16/to_bf16 replace (never add) a precision."""
    import fastai.callback.fp16 as fp16
    from fastai.learner import Learner

    from ..callbacks.precision import DevicePrecision, use_script_precision

    replace_everywhere("MixedPrecision", fp16.MixedPrecision, DevicePrecision)

    def to_fp16(self, **kwargs): return use_script_precision(self, DevicePrecision(**kwargs))
    def to_bf16(self): return use_script_precision(self, DevicePrecision(amp_mode=fp16.AMPMode.BF16))

    Learner.to_fp16, Learner.to_bf16 = to_fp16, to_bf16


_depth = threading.local()


def _first_on_node(original):
    """Run a download step on local rank 0 first (outermost call only: get() calls download())."""
    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        if getattr(_depth, "n", 0):
            return original(*args, **kwargs)
        _depth.n = 1
        try:
            return local_rank_zero_first(original, *args, **kwargs)
        finally:
            _depth.n = 0
    return wrapper


def patch_downloads_local_rank_zero_first() -> None:
    """FastDownload (behind untar_data) and fastai's config.ini creation race when every rank downloads
    and extracts into the same folder: each node's local rank 0 goes first, the others then find it done."""
    import fastai.data.external as external
    from fastdownload import FastDownload

    for name in ("__init__", "get", "download", "extract"):
        setattr(FastDownload, name, _first_on_node(getattr(FastDownload, name)))
    replace_everywhere("fastai_cfg", external.fastai_cfg, _first_on_node(external.fastai_cfg))


def patch_tokenizer_cache_local_rank_zero_first() -> None:
    """fastai writes its tokenizer cache (<path>_tok, <name>_tok.csv) from every rank at once: each node's
    local rank 0 tokenizes first; the others then find the cache and skip it."""
    import fastai.text.core as text_core

    for name in ("_tokenize_files", "tokenize_csv"):
        original = getattr(text_core, name)
        replace_everywhere(name, original, _first_on_node(original))


SIDE_EFFECT_PATCHES = (patch_lr_find_in_memory, patch_csv_logger_rank_zero, patch_show_graph_rank_zero,
                       patch_save_model_reload_from_rank_zero,
                       patch_precision_for_device, patch_downloads_local_rank_zero_first,
                       patch_tokenizer_cache_local_rank_zero_first)
