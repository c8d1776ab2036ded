"""An ordinary fastai script whose model has a module with data-dependent control flow (no torch.export)."""
import torch
from fastai.basics import DataLoader, DataLoaders, Learner
from torch import nn


class Gate(nn.Module):
    """Doubles its input when the batch sum is positive: Python control flow on a tensor's value."""

    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x


data = [(torch.randn(4), torch.tensor(i % 2)) for i in range(256)]
dls = DataLoaders(DataLoader(data, bs=32, shuffle=True, drop_last=True), DataLoader(data[:64], bs=32))
model = nn.Sequential(nn.Linear(4, 8), Gate(), nn.ReLU(), nn.Linear(8, 2))
Learner(dls, model, loss_func=nn.CrossEntropyLoss()).fit(1)
