"""Vision: a small CNN learns the handwritten digits that scikit-learn ships (8x8 images, 10 classes).

    python train.py --epochs 3                     # one GPU, or the CPU
    fastlaunch --gpus 4 train.py --epochs 3        # 4 GPUs: each rank trains on a quarter of every epoch
    fastlaunch --cpu 2 train.py --epochs 1         # 2 CPU ranks, no GPU needed
    fastlaunch slurm --nodes 2 --gpus 8 --time 1:00:00 train.py --epochs 10 > job.sbatch; sbatch job.sbatch
    python train.py --data path/to/images          # your images: one folder per class

It trains offline: the digits ship with scikit-learn and the model starts from random weights.
--pretrained uses an ImageNet resnet18 instead (it downloads its weights once).
"""
import argparse

import torch
from fastai.vision.all import (ConvLayer, DataLoader, DataLoaders, Flatten, ImageDataLoaders, Learner, Resize,
                               accuracy, resnet18, vision_learner)
from torch import nn


def digits(bs: int) -> DataLoaders:
    """scikit-learn's 1797 digits as 1x8x8 tensors; a fixed 1500 / 297 split."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32)[:, None] / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    items = [(x[i], y[i]) for i in order]
    train = DataLoader(items[:1500], bs=bs, shuffle=True, drop_last=True)
    valid = DataLoader(items[1500:], bs=bs)
    return DataLoaders(train, valid)


def small_cnn(c_in: int, n_out: int) -> nn.Module:
    """Three conv blocks and a linear head: learns in one short epoch on a CPU."""
    return nn.Sequential(ConvLayer(c_in, 32), ConvLayer(32, 64, stride=2), ConvLayer(64, 64, stride=2),
                         nn.AdaptiveAvgPool2d(1), Flatten(), nn.Linear(64, n_out))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--data", help="a folder of images, one subfolder per class")
    parser.add_argument("--pretrained", action="store_true", help="fine-tune an ImageNet resnet18 (downloads)")
    args = parser.parse_args()

    if args.data:
        dls = ImageDataLoaders.from_folder(args.data, valid_pct=0.2, seed=42, item_tfms=Resize(64), bs=args.bs)
        c_in, n_out = 3, dls.c
    else:
        dls, c_in, n_out = digits(args.bs), 1, 10
    if args.pretrained:
        learn = vision_learner(dls, resnet18, metrics=accuracy)
        learn.fine_tune(args.epochs, args.lr)
    else:
        learn = Learner(dls, small_cnn(c_in, n_out), loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
        learn.fit_one_cycle(args.epochs, args.lr)


if __name__ == "__main__":
    main()
