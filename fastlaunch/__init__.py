"""fastlaunch: run an unmodified one-GPU fastai script data-parallel on N GPUs or N CPU processes.

Kept light on purpose: every rank imports this package before its bootstrap runs.
"""
__all__ = ["__version__"]
__version__ = "0.1.0"
