"""Minimal fastai training: a small network learns which quadrant pair a point lies in.

No download, no GPU needed: the data is generated here. Run it as it is, or on more devices:

    python train.py --epochs 3                 # one GPU, or the CPU, as you would without fastlaunch
    fastlaunch --cpu 2 train.py --epochs 3     # 2 CPU ranks over gloo
    fastlaunch --gpus 4 train.py --epochs 3    # 4 GPUs on this machine
    fastlaunch slurm --nodes 2 --gpus 8 --time 1:00:00 train.py --epochs 10 > job.sbatch; sbatch job.sbatch

The script has no distributed code: fastlaunch shards the data, wraps the model and
keeps the output on rank 0.
"""
import argparse

import fastai.callback.schedule  # noqa: F401  (adds Learner.fit_one_cycle)
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.metrics import accuracy
from torch import nn


def make_points(n: int, seed: int) -> list:
    """n points in the plane, labelled 1 when x and y have the same sign."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, generator=g)
    y = ((x[:, 0] * x[:, 1]) > 0).long()
    return list(zip(x, y))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bs", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--n-train", type=int, default=2048)
    args = parser.parse_args()

    train = DataLoader(make_points(args.n_train, seed=1), bs=args.bs, shuffle=True, drop_last=True)
    valid = DataLoader(make_points(512, seed=2), bs=args.bs)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 2))
    learn = Learner(DataLoaders(train, valid), model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
    learn.fit_one_cycle(args.epochs, args.lr)


if __name__ == "__main__":
    main()
