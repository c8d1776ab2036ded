"""Seeds: one stream shared by every rank (splits, shuffles outside a fit, weight init), and during a
distributed fit one stream per rank (augmentation, dropout), after which the shared stream resumes."""
from __future__ import annotations

import random

__all__ = ["seed_everything", "reseed_per_rank", "rng_states", "set_rng_states"]


def seed_everything(seed: int) -> None:
    """The same seed for python, numpy and torch."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_states() -> tuple:
    """Every random stream this process draws from (python, numpy, torch; CUDA once initialised)."""
    import numpy as np
    import torch

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return random.getstate(), np.random.get_state(), torch.get_rng_state(), cuda


def set_rng_states(states: tuple) -> None:
    """Put back what rng_states() returned."""
    import numpy as np
    import torch

    py, np_state, torch_state, cuda = states
    random.setstate(py)
    np.random.set_state(np_state)
    torch.set_rng_state(torch_state)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)


def reseed_per_rank(rank: int) -> tuple:
    """Give each rank its own random stream for a fit, derived from the shared stream so a run stays
    reproducible; returns the shared streams' states, to be put back after the fit (set_rng_states) so
    that whatever the script draws next (an unseeded RandomSplitter, a new model's weights) is the same
    on every rank. The shared stream advances by one draw per fit."""
    import torch

    base = int(torch.randint(0, 2**31 - 1, (1,)).item())
    shared = rng_states()
    seed_everything((base + 104_729 * (rank + 1)) % 2**31)
    return shared
