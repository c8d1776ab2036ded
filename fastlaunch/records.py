"""What a rank writes into its metrics records and the launcher reads back: the labels both sides share."""
from __future__ import annotations

__all__ = ["BY_DESIGN", "by_design"]

BY_DESIGN = " in GradScaler"  # appended to the method of a sync GradScaler makes


def by_design(how: str) -> bool:
    """Whether a counted sync's method label marks one made by design (GradScaler's)."""
    return how.endswith(BY_DESIGN)
