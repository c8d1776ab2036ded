"""What a rank writes into its records and the launcher reads back: the labels both sides share."""
from __future__ import annotations

__all__ = ["BY_DESIGN", "by_design", "CONSEQUENCE_MARKERS", "is_consequence_message"]

BY_DESIGN = " in GradScaler"  # appended to the method of a sync GradScaler makes


def by_design(how: str) -> bool:
    """Whether a counted sync's method label marks one made by design (GradScaler's)."""
    return how.endswith(BY_DESIGN)


# Errors a rank sees because another rank died first: consequences, never the root cause.
CONSEQUENCE_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                       "communicator was aborted", "DistNetworkError", "Socket Timeout", "timed out")


def is_consequence_message(message: str) -> bool:
    return any(marker in message for marker in CONSEQUENCE_MARKERS)
