"""Patches as objects: each declares the names it replaces, applies through a Patcher that records the
previous values, and is undone by the same Patcher (names put back exactly as found, in reverse order)."""
from __future__ import annotations

import fnmatch
import sys
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Patch", "Patcher", "patch", "Installation", "label_of"]

_MISSING = object()


def label_of(owner: Any, name: str) -> str:
    """A patched name as written in a Patch's `replaces`: module.attr or module.Class.attr."""
    if isinstance(owner, type):
        return f"{owner.__module__}.{owner.__qualname__}.{name}"
    if hasattr(owner, "__spec__") and hasattr(owner, "__name__"):  # a module
        return f"{owner.__name__}.{name}"
    return f"{type(owner).__module__}.{type(owner).__qualname__}().{name}"


class Patcher:
    """Sets attributes and remembers what was there, to put it all back."""

    def __init__(self) -> None:
        self._undo: list[tuple[Any, str, Any]] = []
        self.touched: list[tuple[str, str]] = []  # (patch name, label)
        self.current = ""  # the patch applying now

    def set(self, owner: Any, name: str, value: Any) -> None:
        previous = vars(owner).get(name, _MISSING)
        self._undo.append((owner, name, previous))
        self.touched.append((self.current, label_of(owner, name)))
        setattr(owner, name, value)

    def replace_everywhere(self, name: str, original: Any, replacement: Any, package: str = "fastai") -> None:
        """Rebind a function in every loaded module of the package that imported it by name."""
        for mod_name, module in list(sys.modules.items()):
            if mod_name.split(".")[0] == package and getattr(module, name, None) is original:
                self.set(module, name, replacement)

    def append(self, items: list, value: Any) -> None:
        """Append to a registry list (fastai's default callbacks); undone by removing that item."""
        items.append(value)
        self._undo.append((items, "", value))

    def undo(self) -> None:
        while self._undo:
            owner, name, previous = self._undo.pop()
            if isinstance(owner, list):
                if previous in owner:
                    owner.remove(previous)
            elif previous is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, previous)
        self.touched = []


@dataclass(frozen=True)
class Patch:
    """One named change to fastai or torch: why (the docstring of apply), what it replaces (patterns of
    labels, see label_of), and how (apply(ctx, patcher))."""

    name: str
    replaces: tuple[str, ...]
    apply: Callable[[Any, Patcher], None]

    def covers(self, label: str) -> bool:
        return any(fnmatch.fnmatchcase(label, pattern) for pattern in self.replaces)


def patch(*replaces: str) -> Callable[[Callable[[Any, Patcher], None]], Patch]:
    """Decorator: a function apply(ctx, patcher) becomes a Patch replacing the given labels."""
    def wrap(fn: Callable[[Any, Patcher], None]) -> Patch:
        return Patch(fn.__name__, tuple(replaces), fn)
    return wrap


class Installation:
    """Patches applied together; `uninstall()` leaves everything exactly as found."""

    def __init__(self, patches: tuple[Patch, ...], ctx: Any, on_uninstall: Callable[[], None] | None = None):
        self.patches, self.patcher, self._on_uninstall = patches, Patcher(), on_uninstall
        for item in patches:
            self.patcher.current = item.name
            item.apply(ctx, self.patcher)
        self.patcher.current = ""

    def undeclared(self) -> list[tuple[str, str]]:
        """(patch, label) of every name a patch set without declaring it (tests keep this empty)."""
        by_name = {item.name: item for item in self.patches}
        return [(who, label) for who, label in self.patcher.touched if who in by_name and not by_name[who].covers(label)]

    def uninstall(self) -> None:
        self.patcher.undo()
        if self._on_uninstall is not None:
            self._on_uninstall()
