"""Warnings from dependencies that a fastlaunch user cannot act on, filtered on every rank and in the
doctor's dry run; every other warning (the script's own, fastai's advice) still shows."""
from __future__ import annotations

import warnings

__all__ = ["DEPENDENCY_NOISE", "quiet_dependency_warnings"]

DEPENDENCY_NOISE = (
    # fastai's own import calls torch.jit.script, which torch now deprecates
    (r".*torch\.jit\.script.* is deprecated", FutureWarning),
    # fastai turns DataFrame columns into tensors from read-only views (pandas copy-on-write)
    (r"The given NumPy array is not writable", UserWarning),
)


def quiet_dependency_warnings() -> None:
    for message, category in DEPENDENCY_NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
