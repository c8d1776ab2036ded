"""Placement and data parallelism for every real fit: rank device, DDP wrap, sharded DataLoaders."""
from __future__ import annotations

from fastai.callback.core import TrainEvalCallback
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ...device import rank_device
from ..seeding import reseed_per_rank, set_rng_states
from ..sharding import ShardedDL
from ..stopchannel import StopChannel, flag_bucket_hook
from .base import LeanCallback

__all__ = ["DistributedFit", "FastlaunchDDP", "pin_batches", "to_sync_batchnorm", "restore_modules"]


class FastlaunchDDP(DistributedDataParallel):
    """DDP that passes attribute access and indexing through to the wrapped module.

    fastai looks attributes up on the model that DDP lacks (about 50 misses a training step); nn.Module's
    lookup raises for each, so this reads DDP's own parameters, buffers and modules first, as nn.Module
    does, and otherwise asks the wrapped module: no exception on the way."""

    def __getattr__(self, name):
        own = self.__dict__
        for kind in ("_parameters", "_buffers", "_modules"):
            found = own[kind]
            if name in found:
                return found[name]
        return getattr(own["_modules"]["module"], name)

    def __getitem__(self, idx): return self.module[idx]
    def __len__(self): return len(self.module)

    def reset(self):
        if hasattr(self.module, "reset"):
            self.module.reset()


def _per_rank_bs(dl, denv) -> int | None:
    """With --keep-global-batch, each rank takes bs / world so the script's bs stays the global batch."""
    if not denv.keep_global_batch or not getattr(dl, "bs", None):
        return None
    return max(1, dl.bs // denv.world_size)


def _loader_seed(denv, fit_index: int, loader: int) -> int | None:
    """The data order's seed: the same on every rank, and again when a run resumes this fit."""
    return None if denv.seed is None else (denv.seed * 1_000_003 + fit_index * 64 + loader) % 2**62


def _global_batch_line(train_dl, denv) -> str:
    """DDP makes the global batch per-rank bs x ranks."""
    return (f"fastlaunch: global batch {train_dl.bs * denv.world_size} = {train_dl.bs} x {denv.world_size} ranks"
            + (" (--keep-global-batch)" if denv.keep_global_batch else ""))


def pin_batches(loaders, device) -> list:
    """On a GPU, fastai loaders hand out batches in pinned host memory, so that their copy to the GPU
    (non_blocking, integrate/nosync.py) does not wait for it. Returns the loaders it pinned."""
    if getattr(device, "type", str(device)) != "cuda":
        return []
    pinned = []
    for dl in loaders:
        fake = getattr(dl, "fake_l", None)
        if fake is not None and not fake.pin_memory:
            dl.pin_memory = fake.pin_memory = True
            pinned.append(dl)
    return pinned


def to_sync_batchnorm(model: nn.Module) -> list:
    """--sync-bn: every BatchNorm becomes a SyncBatchNorm sharing its parameters and running statistics
    (the optimizer and the statistics carry over). Returns what restore_modules puts back after the fit,
    so the Learner, its exports and a later one-process use keep plain BatchNorm."""
    swapped = []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, nn.SyncBatchNorm):
                setattr(parent, name, nn.SyncBatchNorm.convert_sync_batchnorm(child))
                swapped.append((parent, name, child))
    return swapped


def restore_modules(swapped: list) -> None:
    for parent, name, child in swapped:
        setattr(parent, name, child)


class DistributedFit(LeanCallback):
    """Puts model and data on the rank's device; wraps the model in DDP and shards the data for a fit."""

    order = TrainEvalCallback.order - 1  # before TrainEvalCallback moves the model to dls.device

    def __init__(self) -> None:
        self._wrapped = False
        self._old_loaders = None
        self._shared_rng = None
        self._swapped: list = []

    def before_fit(self):
        ctx = self.ctx
        run = ctx.fit_of(self.learn)
        self._wrapped = run is not None and not isinstance(self.learn.model, DistributedDataParallel)
        if not self._wrapped:
            return
        denv = ctx.env
        device = rank_device(denv.device_type, denv.local_rank)
        self.learn.model.to(device)
        if not denv.is_distributed:
            self.learn.dls.to(device)
            pin_batches(self.learn.dls.loaders, device)
            self._wrapped = False
            return
        ctx.comm.ensure_group()
        self._old_loaders = list(self.learn.dls.loaders)
        self.learn.dls.loaders = [dl if isinstance(dl, ShardedDL) else
                                  ShardedDL(dl, ctx=ctx, device=device, bs=_per_rank_bs(dl, denv),
                                            seed=_loader_seed(denv, run.index, i), evaluation=i > 0)
                                  for i, dl in enumerate(self._old_loaders)]
        ctx.say(_global_batch_line(self.learn.dls.loaders[0], denv), once=True)
        self.learn.dls.to(device)
        pin_batches(self.learn.dls.loaders, device)
        # DDP broadcasts rank 0's parameters and buffers at construction: every rank starts identical.
        # static_graph: parameters the forward never uses (a head left over, a BatchNorm of zero columns in
        # collab's EmbeddingNN) are found in the first step, instead of failing the second step with
        # "Expected to have finished reduction"; no per-step search of the graph as find_unused_parameters.
        if denv.sync_bn:
            self._swapped = to_sync_batchnorm(self.learn.model)
        self.learn.model = FastlaunchDDP(self.learn.model, static_graph=True,
                                         device_ids=[denv.local_rank] if denv.device_type == "cuda" else None)
        channel = StopChannel(device, ctx.comm, ctx.not_counted)
        self.learn.model.register_comm_hook(channel, flag_bucket_hook)  # stop flags ride on the gradients
        channel.active = True
        run.stop = channel  # closed with the fit (context.py)
        # augmentation differs per rank; the data order is agreed by ShardedDL
        self._shared_rng = reseed_per_rank(denv.rank)

    def after_fit(self):
        if not self._wrapped:
            return
        self.learn.model = self.learn.model.module
        restore_modules(self._swapped)
        self._swapped = []
        self.learn.dls.loaders = self._old_loaders  # the stop channel stays open until the fit closes
        self._old_loaders, self._wrapped = None, False
        if self._shared_rng is not None:  # the ranks draw alike again: splits, new models, shuffles
            set_rng_states(self._shared_rng)
            self._shared_rng = None
