"""The minimal wrapper a user writes to run a fastai script under torchrun without fastlaunch: a gloo
process group, the model in DistributedDataParallel, and the script's own fastai DataLoaders wrapped in
fastai's DistributedDL, so both fastai peers run the same loader and the same callbacks. Imported after
the script's Learner is made: importing fastai.distributed adds fastai's ProgressCallback to the defaults of
every Learner made after it, a bar the script never asked for. A script that has one keeps it on rank 0
only, as fastai's own Learner.to_distributed does."""
import torch
import torch.distributed as dist
from fastai.basics import DataLoaders
from fastai.callback.progress import ProgressCallback
from fastai.distributed import DistributedDL
from torch.nn.parallel import DistributedDataParallel


class CpuDistributedDL(DistributedDL):
    """fastai's DistributedDL with its index broadcast on the CPU (fastai's calls .cuda(), for NCCL)."""

    def _broadcast(self, t, rank):
        t = torch.LongTensor(t)
        dist.broadcast(t, rank)
        return t.tolist()


def hand_wrap(learn):
    """This rank's share of a one-process Learner, in place: its loaders sharded, its model in DDP."""
    dist.init_process_group("gloo")
    learn.dls = DataLoaders(CpuDistributedDL(learn.dls.train), CpuDistributedDL(learn.dls.valid))
    learn.model = DistributedDataParallel(learn.model)
    if dist.get_rank():
        learn.remove_cb(ProgressCallback)
