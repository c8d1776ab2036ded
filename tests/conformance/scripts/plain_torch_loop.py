"""A plain PyTorch training loop, no fastai: fastlaunch runs it on every rank and shows rank 0's output."""
import torch
from torch import nn

torch.manual_seed(0)
model = nn.Linear(4, 1)
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(64, 4), torch.randn(64, 1)
for _ in range(20):
    opt.zero_grad()
    loss = nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
print(f"CONFORMANCE plain_torch_loop: done, loss {loss.item():.4f}", flush=True)
