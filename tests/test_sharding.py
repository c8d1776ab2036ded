"""ShardedDL: disjoint shares, agreed order, len() equal to the batches yielded, plain torch loaders kept."""
from __future__ import annotations

import pytest
import torch
from fastai.data.load import DataLoader
from torch.utils.data import IterableDataset, SubsetRandomSampler

from fastlaunch.errors import UsageError
from fastlaunch.rank.sharding import ShardedDL, batch_shards, shard_indices, shard_sizes


def _ids(batches):
    return [int(v) for b in batches for v in (b[0] if isinstance(b, (tuple, list)) else b).flatten()]


def test_shard_indices_trim_for_drop_last():
    shards = [shard_indices(list(range(1000)), r, 2, 64, drop_last=True) for r in range(2)]
    assert [len(s) for s in shards] == [448, 448]  # 7 full batches each, 104 items trimmed
    assert not set(shards[0]) & set(shards[1])


def test_shard_indices_pad_for_evaluation():
    shards = [shard_indices(list(range(203)), r, 2, 64, drop_last=False) for r in range(2)]
    assert [len(s) for s in shards] == [102, 102]
    assert set(shards[0]) | set(shards[1]) == set(range(203))
    assert shard_sizes(203, 2, 64, False) == (102, 1)


def test_len_equals_batches_yielded_1000_items_bs64_two_ranks():
    base = DataLoader(list(range(1000)), bs=64, shuffle=True, drop_last=True)
    for rank in range(2):
        dl = ShardedDL(base, rank=rank, world_size=2, seed=5)
        batches = list(dl)
        assert len(dl) == len(batches) == 7  # fastai's DistributedDL reports 8 and yields 7
        assert all(len(b) == 64 for b in batches)


def test_ranks_agree_on_order_and_get_disjoint_shares_every_epoch():
    items = list(range(256))
    dls = [ShardedDL(DataLoader(items, bs=16, shuffle=True, drop_last=True), rank=r, world_size=2, seed=9)
           for r in range(2)]
    epochs = [[_ids(list(dl)) for dl in dls] for _ in range(2)]
    for a, b in epochs:
        assert not set(a) & set(b) and set(a) | set(b) == set(items)
    assert epochs[0][0] != epochs[1][0]  # a new shuffle each epoch


def test_padded_evaluation_shards_know_their_real_count():
    dls = [ShardedDL(DataLoader(list(range(203)), bs=64), rank=r, world_size=2, seed=1) for r in range(2)]
    assert [len(dl) for dl in dls] == [2, 2]
    assert [dl.real_count() for dl in dls] == [102, 101]
    assert sum(len(_ids(list(dl))) for dl in dls) == 204


def test_plain_torch_loader_keeps_collate_and_worker_init():
    def collate(batch):
        return torch.tensor(batch) * 10

    base = torch.utils.data.DataLoader(list(range(40)), batch_size=4, shuffle=False, collate_fn=collate,
                                       worker_init_fn=lambda wid: None)
    dl = ShardedDL(base, rank=1, world_size=2, seed=0)
    batches = list(dl)
    assert len(dl) == len(batches) == 5
    assert batches[0].tolist() == [10, 30, 50, 70]  # collate_fn applied; rank 1 takes odd positions
    assert dl.dl.wif is not None and not hasattr(dl.dl.wif, "__self__")  # the user's worker_init_fn is kept


class Stream(IterableDataset):
    def __iter__(self): return iter(range(10))


def test_iterable_dataset_refused_with_hint():
    with pytest.raises(UsageError, match="IterableDataset cannot be sharded.*HINT"):
        ShardedDL(torch.utils.data.DataLoader(Stream(), batch_size=2), rank=0, world_size=2, seed=0)


def test_custom_sampler_refused_with_hint():
    base = torch.utils.data.DataLoader(list(range(10)), batch_size=2, sampler=SubsetRandomSampler(range(5)))
    with pytest.raises(UsageError, match="custom sampler.*SubsetRandomSampler.*HINT"):
        ShardedDL(base, rank=0, world_size=2, seed=0)


def test_evaluation_deals_one_process_batches_to_the_ranks():
    # 203 items in batches of 64: 4 batches (the last of 11); 3 ranks: one gets a padding batch
    shards = batch_shards(203, 3, 64, drop_last=False)
    assert shards == [[(0, 64, True), (192, 11, True)], [(64, 64, True), (0, 64, False)],
                      [(128, 64, True), (64, 64, False)]]
    real = sorted((s, n) for mine in shards for s, n, ok in mine if ok)
    assert real == [(0, 64), (64, 64), (128, 64), (192, 11)]
    dls = [ShardedDL(DataLoader(list(range(203)), bs=64), rank=r, world_size=3, seed=1, evaluation=True)
           for r in range(3)]
    batches = [[b.tolist() for b in dl] for dl in dls]
    assert batches[1][0] == list(range(64, 128))  # rank 1's first batch is one process's second
    assert [dl.real_count() for dl in dls] == [75, 64, 64]
    assert [len(dl) for dl in dls] == [2, 2, 2]
