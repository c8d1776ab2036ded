"""A fastai script that ends with sys.exit(3) after its fit: the launcher exits 3."""
import sys

import torch
from fastai.basics import DataLoaders, Learner
from fastai.data.load import DataLoader
from torch import nn

data = [(torch.randn(4), torch.tensor(i % 2)) for i in range(64)]
learn = Learner(DataLoaders(DataLoader(data, bs=16, drop_last=True), DataLoader(data[:16], bs=16)),
                nn.Linear(4, 2), loss_func=nn.CrossEntropyLoss())
learn.fit(1)
print("CONFORMANCE sys_exit: done", flush=True)
sys.exit(3)
