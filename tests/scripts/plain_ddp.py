"""A torchrun-style script: no fastai, its own init_process_group, an all_reduce, its own teardown."""
import json
import os

import torch
import torch.distributed as dist

dist.init_process_group("gloo")
total = torch.tensor([float(dist.get_rank() + 1)])
dist.all_reduce(total)
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"]
out = {k: os.environ.get(k) for k in keys}
out.update(rank=dist.get_rank(), world=dist.get_world_size(), total=total.item())
with open(os.path.join(os.environ["FL_PROBE_OUT"], f"rank{dist.get_rank()}.json"), "w") as fh:
    json.dump(out, fh)
dist.destroy_process_group()
