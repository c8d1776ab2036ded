"""ShardedDL: one rank's share of a fastai DataLoader, with len() equal to the batches it yields.

Replaces fastai's DistributedDL, which calls .cuda() (no CPU ranks), reports a len() that ignores
drop_last per rank (one-cycle never finishes its schedule), and rebuilds a plain torch DataLoader
without its collate_fn, sampler or worker_init_fn.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import math
import random

import numpy as np
import torch
from fastai.data.core import TfmdDL
from fastai.data.load import DataLoader, _FakeLoader
from torch.utils.data import BatchSampler, IterableDataset, RandomSampler, SequentialSampler, get_worker_info

from ..errors import UsageError

__all__ = ["ShardedDL", "shard_indices", "shard_sizes", "batch_shards"]

def shard_sizes(n: int, world: int, bs: int, drop_last: bool) -> tuple[int, int]:
    """(items per rank, padding items added overall) for n items."""
    if drop_last:  # every rank gets the same whole number of full batches
        return (n // (bs * world)) * bs, 0
    per_rank = math.ceil(n / world)
    return per_rank, per_rank * world - n


def shard_indices(idxs: list, rank: int, world: int, bs: int, drop_last: bool) -> list:
    """This rank's indices: trim (drop_last) or pad by wrapping around, then interleave across ranks."""
    per_rank, pad = shard_sizes(len(idxs), world, bs, drop_last)
    if drop_last:
        idxs = idxs[: per_rank * world]
    elif pad:
        idxs = idxs + (idxs * math.ceil(pad / max(len(idxs), 1)))[:pad]
    return idxs[rank::world]


def batch_shards(n: int, world: int, bs: int, drop_last: bool) -> list[list[tuple[int, int, bool]]]:
    """Evaluation shards whole batches: one process's batches (start, size) dealt to the ranks in turn,
    rank r taking batches r, r + world, ...; the ranks left a batch short get a padding batch (a repeat,
    marked False) so every rank runs the same number of forwards. A batch is then the very batch one
    process makes (same items, same padding of variable-length items)."""
    sizes = [bs] * (n // bs) + ([] if drop_last or n % bs == 0 else [n % bs])
    batches = [(i * bs, size, True) for i, size in enumerate(sizes)]
    short = -len(batches) % world
    batches += [(start, size, False) for start, size, _ in (batches * world)[:short]]
    return [batches[r::world] for r in range(world)]


@contextlib.contextmanager
def _agreed_global_rng(seed: int):
    """Seed python's and numpy's global generators alike on every rank for a moment, then put back
    each rank's own state (augmentation keeps drawing differently per rank)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _from_torch(dl: torch.utils.data.DataLoader) -> DataLoader:
    """A fastai DataLoader equivalent to a plain torch one, keeping its collate_fn and worker_init_fn."""
    if isinstance(dl.dataset, IterableDataset):
        raise UsageError("an IterableDataset cannot be sharded across ranks", type(dl.dataset).__name__,
                         "use a map-style Dataset (with __len__ and __getitem__), or shard the stream yourself")
    if type(dl.sampler) not in (SequentialSampler, RandomSampler) or type(dl.batch_sampler) is not BatchSampler:
        raise UsageError("a custom sampler cannot be sharded across ranks",
                         type(dl.sampler).__name__, "use shuffle=True/False instead of a sampler under fastlaunch")
    user_wif = dl.worker_init_fn
    kwargs = {}
    if user_wif is not None:
        kwargs["wif"] = lambda: user_wif(get_worker_info().id)  # type: ignore[union-attr]
    return DataLoader(dataset=dl.dataset, bs=dl.batch_size, num_workers=dl.num_workers, pin_memory=dl.pin_memory,
                      timeout=dl.timeout, shuffle=isinstance(dl.sampler, RandomSampler), drop_last=dl.drop_last,
                      persistent_workers=dl.persistent_workers, create_batch=dl.collate_fn, **kwargs)


def _lm_item(dl, layout_bs: int, seq):
    """fastai's LMDataLoader.create_item with the stream layout of the global batch (layout_bs streams)
    while the loader batches by this rank's bs: the same text, cut the same way, as one process."""
    if seq is None:
        seq = 0
    if seq >= dl.n:
        raise IndexError
    sl = dl.last_len if seq // layout_bs == dl.n_batches - 1 else dl.seq_len
    st = (seq % layout_bs) * dl.bl + (seq // layout_bs) * dl.seq_len
    txt = dl.chunks[st: st + sl + 1]
    from fastai.text.data import LMTensorText
    return LMTensorText(txt[:-1]), txt[1:]


def _is_lm(dl) -> bool:
    import sys
    text_data = sys.modules.get("fastai.text.data")  # not loaded: no language-model loader exists
    return text_data is not None and isinstance(dl, text_data.LMDataLoader)


def _lm_for_ranks(dl, per_rank_bs: int, world: int, evaluation: bool):
    """A language-model loader cuts its corpus into `bs` streams and a batch is one chunk of each stream;
    interleaving items across ranks mixed positions of the same streams in one batch (the hidden state
    carried across batches went wrong, and a short last chunk failed to collate). Here each rank takes
    every world-th stream at every position: its own streams, contiguous from batch to batch. Training
    lays the corpus out in (per-rank bs x ranks) streams, one process's layout for the global batch;
    evaluation keeps the loader's own layout (bs / ranks streams each), so whole-set figures are one
    process's."""
    if evaluation and dl.bs % world == 0:
        layout, per_rank_bs = dl.bs, dl.bs // world
    else:
        layout = per_rank_bs * world
    if dl.bs != layout:
        dl = dl.new(bs=layout)
    dl = copy.copy(dl)
    dl.bs = per_rank_bs
    dl.create_item = functools.partial(_lm_item, dl, layout)
    return dl


class ShardedDL(TfmdDL):
    """Wraps a DataLoader; every epoch all ranks agree on one shuffled order and each takes its share.

    Rank, world size and seed come from the arguments, else from the rank context (`ctx`, passed or bound
    on the class a script's DistributedDL names): the context's loader numbers advance alike on every rank."""

    ctx = None

    def __init__(self, dl, rank: int | None = None, world_size: int | None = None, device=None,
                 seed: int | None = None, bs: int | None = None, evaluation: bool = False, ctx=None):
        ctx = ctx if ctx is not None else type(self).ctx
        if ctx is None and (rank is None or world_size is None or seed is None):
            raise TypeError("ShardedDL needs rank, world_size and seed, or a rank context")
        rank = ctx.env.rank if rank is None else rank
        world_size = ctx.env.world_size if world_size is None else world_size
        if isinstance(dl, torch.utils.data.DataLoader):
            dl = _from_torch(dl)
        self.original = dl  # one process's loader: what evaluation inside a fit and new() start from
        # evaluation (not of a language model, sharded by streams) deals out one process's whole batches
        self.batch_sharded = evaluation and not _is_lm(dl)
        if _is_lm(dl):
            dl = _lm_for_ranks(dl, bs or dl.bs, world_size, evaluation)
        elif bs is not None and bs != dl.bs and not evaluation:  # --keep-global-batch: batches of bs
            dl = copy.copy(dl)
            dl.bs = bs
        if dl.n is None:
            raise UsageError("a DataLoader of unknown length cannot be sharded", type(dl.dataset).__name__,
                             "give the dataset a __len__")
        if seed is None:  # agreed without a collective when the launcher chose a seed
            seed = (ctx.env.seed * 1_000_003 + next(ctx.loader_numbers)) if ctx.env.seed is not None else \
                ctx.comm.broadcast_object(random.getrandbits(31))
        self.dl, self.rank, self.world_size, self.seed, self.epoch = dl, rank, world_size, seed, 0
        self.skip_batches = 0  # set when resuming mid-epoch: the next epoch starts after these batches
        self.bs = dl.bs or 1
        self.drop_last, self.dataset, self.num_workers = dl.drop_last, dl.dataset, dl.num_workers
        self.offs, self.pin_memory, self.indexed = dl.offs, dl.pin_memory, dl.indexed
        self.shuffle = dl.shuffle
        self.n, self.n_pad = shard_sizes(dl.n, world_size, self.bs, self.drop_last)
        if self.batch_sharded:
            mine = batch_shards(dl.n, world_size, self.bs, self.drop_last)[rank]
            self.n, self._real = sum(size for _, size, _ in mine), sum(size for _, size, real in mine if real)
        self.device = dl.device if device is None else device
        if device is not None:
            dl.to(device)
        fake = dl.fake_l
        self.fake_l = _FakeLoader(self, fake.pin_memory, fake.num_workers, fake.timeout,
                                  persistent_workers=fake.persistent_workers,
                                  pin_memory_device=fake.pin_memory_device)

    def real_count(self) -> int:
        """Items of this rank's shard that are not padding (for whole-set evaluation)."""
        if self.batch_sharded:
            return self._real
        padded_ranks = range(self.world_size - self.n_pad, self.world_size)
        return self.n - (1 if self.rank in padded_ranks else 0)

    def get_idxs(self):
        self.dl.rng = random.Random(self.seed + self.epoch)  # the same order on every rank, new each epoch
        with _agreed_global_rng(self.seed + self.epoch):  # loaders that shuffle with numpy's (SortedDL)
            base = list(self.dl.get_idxs())
        self.epoch += 1
        if self.batch_sharded:
            mine = batch_shards(len(base), self.world_size, self.bs, self.drop_last)[self.rank]
            idxs = [i for start, size, _ in mine for i in base[start:start + size]]
        else:
            idxs = shard_indices(base, self.rank, self.world_size, self.bs, self.drop_last)
        skip, self.skip_batches = self.skip_batches * self.bs, 0
        return idxs[skip:]

    def to(self, device):
        self.device = device
        self.dl.to(device)

    @property
    def n_inp(self): return self.dl.n_inp

    def randomize(self): self.dl.randomize()
    def before_iter(self): self.dl.before_iter()
    def after_batch(self, b): return self.dl.after_batch(b)
    def after_iter(self): self.dl.after_iter()
    def create_batches(self, samps): return self.dl.create_batches(samps)
    def decode(self, b): return self.dl.decode(b)
    def decode_batch(self, b, max_n: int = 9, full: bool = True): return self.dl.decode_batch(b, max_n, full)
    def new(self, *args, **kwargs): return self.original.new(*args, **kwargs)
