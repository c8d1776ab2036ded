"""Errors meant for a person: one line, the value, and a HINT with the fix."""
from __future__ import annotations

__all__ = ["UsageError", "format_usage_error", "shown"]


class UsageError(Exception):
    """Bad input from the user: printed as one line, exit status 2, no traceback."""

    exit_code = 2

    def __init__(self, what: str, got: object, hint: str):
        self.what, self.got, self.hint = what, got, hint
        super().__init__(format_usage_error(what, got, hint))

    def __str__(self) -> str:  # the one line, even where fastai's callback dispatch rewrote args
        return format_usage_error(self.what, self.got, self.hint)


def format_usage_error(what: str, got: object, hint: str) -> str:
    """Render the one-line form `fastlaunch: error: <what> (got <value>). HINT: <fix>`."""
    return f"fastlaunch: error: {what} (got {got}). HINT: {hint}"


def shown(value: object) -> str:
    """A value as an error line shows it: on one line, and short."""
    said = value if isinstance(value, str) and value.isprintable() else repr(value)
    return said if len(said) <= 80 else said[:77] + "..."
