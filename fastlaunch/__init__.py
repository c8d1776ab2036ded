"""fastlaunch: run an unmodified one-GPU fastai script data-parallel on N GPUs or N CPU processes.

Kept light on purpose: every rank imports this package before its bootstrap runs.
"""
__all__ = ["__version__", "load_ipython_extension"]
__version__ = "0.1.0"


def load_ipython_extension(shell) -> None:
    """`%load_ext fastlaunch` in a notebook: the `%fastlaunch` magics (fastlaunch/session/magics.py)."""
    from .session.magics import load_ipython_extension as load

    load(shell)
