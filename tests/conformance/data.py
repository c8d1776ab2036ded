"""Tiny generated data in the layouts fastai's examples use: built from fixed generators, so every rank
and the one-process check build the same items and the same split."""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from fastai.vision.all import (CategoryBlock, DataBlock, ImageBlock, IndexSplitter, MaskBlock, Normalize,
                               PILImage, PILMask, aug_transforms, imagenet_stats)

N_VALID = 37  # not a multiple of any batch size or of 2 ranks: padding and partial batches are exercised


def tabular_df(n: int = 237, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({"colour": rng.choice(["red", "green", "blue"], n), "size": rng.choice(["s", "m", "l"], n),
                       "x1": rng.normal(size=n), "x2": rng.normal(size=n)})
    df["target"] = (df.x1 + (df.colour == "red") * 0.8 - df.x2 * 0.5 > 0.2).astype(int)
    return df


def tabular_dls(bs: int = 32, **kwargs):
    from fastai.tabular.all import Categorify, CategoryBlock, Normalize as TabNormalize, TabularDataLoaders

    df = tabular_df()
    return TabularDataLoaders.from_df(df, y_names="target", cat_names=["colour", "size"], cont_names=["x1", "x2"],
                                      y_block=CategoryBlock(), procs=[Categorify, TabNormalize],
                                      valid_idx=list(range(len(df) - N_VALID, len(df))),
                                      bs=bs, **kwargs)


def _images(n: int, size: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    imgs = rng.integers(0, 80, (n, size, size, 3)).astype(np.uint8)
    for img, lab in zip(imgs, labels):  # class 1: a bright square in the top left corner
        if lab:
            img[: size // 2, : size // 2] += 150
    return imgs, labels


def image_dls(n: int = 96, size: int = 32, bs: int = 16, tfms: bool = True):
    imgs, labels = _images(n, size)
    block = DataBlock(blocks=(ImageBlock, CategoryBlock), get_items=lambda _: list(range(n)),
                      get_x=lambda i: PILImage.create(imgs[i]), get_y=lambda i: "bright" if labels[i] else "dark",
                      splitter=IndexSplitter(list(range(n - N_VALID, n))),
                      batch_tfms=[*aug_transforms(size=size, min_scale=0.9), Normalize.from_stats(*imagenet_stats)]
                      if tfms else [Normalize.from_stats(*imagenet_stats)])
    return block.dataloaders(None, bs=bs, num_workers=0)


def segmentation_dls(n: int = 64, size: int = 32, bs: int = 8):
    imgs, _ = _images(n, size)
    masks = (imgs.mean(-1) > 100).astype(np.uint8)
    block = DataBlock(blocks=(ImageBlock, MaskBlock(codes=["background", "bright"])), get_items=lambda _: list(range(n)),
                      get_x=lambda i: PILImage.create(imgs[i]), get_y=lambda i: PILMask.create(masks[i]),
                      splitter=IndexSplitter(list(range(n - N_VALID, n))), batch_tfms=[Normalize.from_stats(*imagenet_stats)])
    return block.dataloaders(None, bs=bs, num_workers=0)


WORDS = ("the cat dog sat ran on mat log big small red blue happy sad film good bad plot actor scene "
         "loved hated great awful fun dull").split()


def text_df(n: int = 160, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        mood = ["good", "great", "loved", "fun"] if label else ["bad", "awful", "hated", "dull"]
        words = list(rng.choice(WORDS, int(rng.integers(8, 20)))) + list(rng.choice(mood, 3))
        rng.shuffle(words)
        rows.append((" ".join(words), "pos" if label else "neg"))
    df = pd.DataFrame(rows, columns=["text", "label"])
    df["is_valid"] = np.arange(n) >= n - N_VALID
    return df


def ratings_df(n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 30, n), rng.integers(0, 20, n)
    taste = np.sin(users)[:, None] * np.cos(items)[:, None]
    return pd.DataFrame({"user": users, "item": items, "rating": (3 + 2 * taste[:, 0]).astype(np.float32)})


def tensor_items(n: int = 237, dim: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = (x[:, 0] * x[:, 1] + x[:, 2] > 0).long()
    return [(x[i], y[i]) for i in range(n)]
