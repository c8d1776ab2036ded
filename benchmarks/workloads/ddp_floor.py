"""The floor: a hand-written PyTorch DDP loop on the same model and data (run with torchrun). $BENCH_TINY=1:
the tiny step's model, data and batch (nn.Linear(16, 2), batch 8 per rank, $BENCH_STEPS steps per rank)."""
import os
import sys

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, os.path.dirname(__file__))
from common import (BS, TINY_BS, TINY_WARMUP, StepClock, images, maybe_crash, small_cnn, tiny_data,  # noqa: E402
                    tiny_model)

tiny = os.environ.get("BENCH_TINY") == "1"
distributed = "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1
if distributed:
    dist.init_process_group("gloo")
data, bs = (tiny_data()[0], TINY_BS) if tiny else (images(), BS)
sampler = DistributedSampler(data) if distributed else None
loader = torch.utils.data.DataLoader(data, batch_size=bs, sampler=sampler, shuffle=sampler is None, drop_last=True)
model = tiny_model() if tiny else small_cnn()
if distributed:
    model = DistributedDataParallel(model)
opt = torch.optim.Adam(model.parameters(), lr=1e-3)
loss_fn = nn.CrossEntropyLoss()
clock = StepClock(bs=TINY_BS, warmup=TINY_WARMUP) if tiny else StepClock()
for x, y in loader:
    opt.zero_grad()
    loss_fn(model(x), y).backward()
    opt.step()
    clock.step()
    maybe_crash(clock.steps)
clock.write(os.environ.get("BENCH_TAG", "floor"))
if distributed:
    dist.destroy_process_group()
