"""How a launcher option's value of one kind is read, alike from a flag, a file or a variable: a switch's
words, a whole number within limits. Standard library only (every rank imports it)."""
from __future__ import annotations

from .errors import UsageError, shown

__all__ = ["switch_value", "whole_number"]

_SWITCH_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def switch_value(value: object) -> bool | None:
    """A switch's value: a bool, 0 or 1, or true/false, yes/no, on/off, 1/0 in any case; None for anything else."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return _SWITCH_WORDS.get(value.strip().lower()) if isinstance(value, str) else None


def whole_number(flag: str, value: object, low: int, high: int | None = None, why: str = "") -> int:
    """An integer value from low to high, or a UsageError naming the flag."""
    if isinstance(value, bool) or not isinstance(value, int):
        try:
            value = int(str(value))
        except ValueError:
            raise UsageError(f"{flag} takes a whole number", shown(value), f"e.g. {flag} {max(low, 2)}") from None
    if value < low:
        raise UsageError(f"{flag} must be at least {low}", value, f"e.g. {flag} {max(low, 2)}")
    if high is not None and value > high:
        raise UsageError(f"{flag} must be at most {high}", value,
                         f"use {flag} {low} to {high}" + (f" ({why})" if why else ""))
    return value
