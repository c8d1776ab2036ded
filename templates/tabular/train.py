"""Tabular: a fastai tabular model learns to tell malignant from benign tumours (scikit-learn's breast
cancer set: 569 rows, 30 numeric columns).

    python train.py --epochs 3                     # one GPU, or the CPU
    fastlaunch --gpus 4 train.py --epochs 3        # 4 GPUs
    fastlaunch --cpu 2 train.py --epochs 1         # 2 CPU ranks, no GPU needed
    fastlaunch slurm --nodes 2 --gpus 8 --time 1:00:00 train.py --epochs 10 > job.sbatch; sbatch job.sbatch
    python train.py --data your.csv --target label # your table: the target column, the rest as inputs

It trains offline: the table ships with scikit-learn.
"""
import argparse

import pandas as pd
from fastai.tabular.all import (Categorify, CategoryBlock, FillMissing, Normalize, TabularDataLoaders, accuracy,
                                cont_cat_split, tabular_learner)


def load(path: str | None, target: str) -> tuple[pd.DataFrame, str]:
    if path:
        return pd.read_csv(path), target
    from sklearn.datasets import load_breast_cancer

    return load_breast_cancer(as_frame=True).frame, "target"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--data", help="a CSV file")
    parser.add_argument("--target", default="target", help="the column to predict (with --data)")
    args = parser.parse_args()

    df, target = load(args.data, args.target)
    cont, cat = cont_cat_split(df, max_card=20, dep_var=target)
    valid_idx = list(range(0, len(df), 5))  # every fifth row: the same split on every rank and every run
    dls = TabularDataLoaders.from_df(df, y_names=target, cat_names=cat, cont_names=cont, y_block=CategoryBlock(),
                                     procs=[Categorify, FillMissing, Normalize], valid_idx=valid_idx, bs=args.bs)
    learn = tabular_learner(dls, layers=[64, 32], metrics=accuracy)
    learn.fit_one_cycle(args.epochs, args.lr)


if __name__ == "__main__":
    main()
