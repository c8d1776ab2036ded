"""Seeds: one for every rank before the script (identical splits), one per rank for augmentation."""
from __future__ import annotations

import random

__all__ = ["seed_everything", "reseed_per_rank"]


def seed_everything(seed: int) -> None:
    """The same seed for python, numpy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def reseed_per_rank(rank: int) -> int:
    """Give each rank its own random stream from here on (augmentation, dropout), derived from the
    current shared stream so a run stays reproducible; the data order is agreed separately."""
    import torch

    base = int(torch.randint(0, 2**31 - 1, (1,)).item())
    seed = (base + 104_729 * (rank + 1)) % 2**31
    seed_everything(seed)
    return seed
