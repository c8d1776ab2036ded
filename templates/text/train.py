"""Text: a bag-of-embeddings classifier learns the sentiment of sentences generated here (no download).

    python train.py --epochs 3                     # one GPU, or the CPU
    fastlaunch --gpus 4 train.py --epochs 3        # 4 GPUs
    fastlaunch --cpu 2 train.py --epochs 1         # 2 CPU ranks, no GPU needed
    fastlaunch slurm --nodes 2 --gpus 8 --time 1:00:00 train.py --epochs 10 > job.sbatch; sbatch job.sbatch
    python train.py --data reviews.csv             # your texts: columns `text` and `label`

It trains offline: the corpus is generated, the model starts from random weights, and fastai's
tokenizer runs in memory (under fastlaunch a folder's tokenizer cache is written once per machine).
--pretrained uses fastai's AWD_LSTM classifier instead (it downloads its weights once).
"""
import argparse
import random

import pandas as pd
from fastai.text.all import AWD_LSTM, Learner, TextDataLoaders, accuracy, text_classifier_learner
from torch import nn

POSITIVE = ["good", "great", "excellent", "lovely", "superb", "wonderful"]
NEGATIVE = ["bad", "awful", "terrible", "poor", "dreadful", "boring"]
FILLER = ["the", "film", "was", "really", "quite", "and", "plot", "acting", "music", "very", "a", "story", "it"]


def corpus(n: int, seed: int = 0) -> pd.DataFrame:
    """n short sentences, each with one sentiment word among filler words."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        positive = rng.random() < 0.5
        words = rng.choices(FILLER, k=rng.randint(5, 12)) + [rng.choice(POSITIVE if positive else NEGATIVE)]
        rng.shuffle(words)
        rows.append((" ".join(words), "pos" if positive else "neg"))
    return pd.DataFrame(rows, columns=["text", "label"])


class BagOfEmbeddings(nn.Module):
    """Mean of the token embeddings (padding left out), then a linear layer."""

    def __init__(self, vocab_size: int, n_out: int, pad_id: int = 1, dim: int = 32):
        super().__init__()
        self.pad_id = pad_id
        self.embed = nn.Embedding(vocab_size, dim, padding_idx=pad_id)
        self.head = nn.Linear(dim, n_out)

    def forward(self, tokens):
        mask = (tokens != self.pad_id).unsqueeze(-1).float()
        pooled = (self.embed(tokens) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return self.head(pooled)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--bs", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--data", help="a CSV file with columns text and label")
    parser.add_argument("--pretrained", action="store_true", help="fine-tune fastai's AWD_LSTM (downloads)")
    args = parser.parse_args()

    df = pd.read_csv(args.data) if args.data else corpus(2000)
    dls = TextDataLoaders.from_df(df, text_col="text", label_col="label", valid_pct=0.2, seed=42, bs=args.bs)
    if args.pretrained:
        learn = text_classifier_learner(dls, AWD_LSTM, metrics=accuracy)
        learn.fine_tune(args.epochs, args.lr)
    else:
        model = BagOfEmbeddings(len(dls.vocab[0]), len(dls.vocab[1]))
        learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss(), metrics=accuracy)
        learn.fit_one_cycle(args.epochs, args.lr)


if __name__ == "__main__":
    main()
