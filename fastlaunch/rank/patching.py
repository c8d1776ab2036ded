"""Patches as objects: each declares the names it replaces, applies through a Patcher that records the
previous values, and is undone by the same Patcher (names put back exactly as found, in reverse order).

A patch names the module it changes (`module`): it applies when that module has been loaded, at once if it
is already, else right after the script imports it (an import hook, AfterImport). So a rank imports only
what its script imports: a plain PyTorch script never loads fastai, and fastai's optional modules (progress
bars, fp16, text) load, with the callbacks they register, only when the script asks for them."""
from __future__ import annotations

import fnmatch
import importlib.abc
import sys
from dataclasses import dataclass
from typing import Any, Callable

__all__ = ["Patch", "Patcher", "patch", "Installation", "label_of", "AfterImport", "loaded"]

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
        """Rebind a function in every loaded module of the package that imported it by name (modules loaded
        later import the replacement from its home; undo puts the original back in those too)."""
        for mod_name, module in list(sys.modules.items()):
            if mod_name.split(".")[0] == package and getattr(module, name, None) is original:
                self.set(module, name, replacement)
        self._undo.append((_Everywhere(package), name, (original, replacement)))

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
            elif isinstance(owner, _Everywhere):
                owner.put_back(name, *previous)
            elif previous is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, previous)
        self.touched = []


class _Everywhere:
    """An undo record of replace_everywhere: every module of the package holding the replacement."""

    def __init__(self, package: str):
        self.package = package

    def put_back(self, name: str, original: Any, replacement: Any) -> None:
        for mod_name, module in list(sys.modules.items()):
            if mod_name.split(".")[0] == self.package and vars(module).get(name) is replacement:
                setattr(module, name, original)


@dataclass(frozen=True)
class Patch:
    """One named change to fastai or torch: why (the docstring of apply), what it replaces (patterns of
    labels, see label_of), how (apply(ctx, patcher)), and the module that must be loaded first (None:
    nothing to wait for)."""

    name: str
    replaces: tuple[str, ...]
    apply: Callable[[Any, Patcher], None]
    module: str | None = None
    assumes: tuple[str, ...] = ()  # fastai functions whose code it relies on, fingerprinted (assumed.py)

    def covers(self, label: str) -> bool:
        return any(fnmatch.fnmatchcase(label, pattern) for pattern in self.replaces)


def patch(*replaces: str, module: str | None = None,
          assumes: tuple[str, ...] = ()) -> Callable[[Callable[[Any, Patcher], None]], Patch]:
    """Decorator: a function apply(ctx, patcher) becomes a Patch replacing the given labels, applied once
    `module` is loaded, after checking the code of the functions it `assumes`."""
    def wrap(fn: Callable[[Any, Patcher], None]) -> Patch:
        return Patch(fn.__name__, tuple(replaces), fn, module, tuple(assumes))
    return wrap


def loaded(name: str) -> bool:
    """Whether a module is loaded and done executing (not one in the middle of its own import)."""
    module = sys.modules.get(name)
    return module is not None and not getattr(getattr(module, "__spec__", None), "_initializing", False)


class AfterImport(importlib.abc.MetaPathFinder):
    """Runs a callback right after a named module finishes executing, the first time it is imported."""

    def __init__(self, on_loaded: Callable[[str], None], names: set[str]):
        self.on_loaded, self.names = on_loaded, names

    def find_spec(self, name, path, target=None):
        if name not in self.names:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                break
        else:
            return None
        loader = spec.loader
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        run_module, hook = loader.exec_module, self

        def exec_module(module):
            run_module(module)
            hook.names.discard(name)
            spec._initializing = False  # done executing: patches may apply
            hook.on_loaded(name)

        loader.exec_module = exec_module
        return spec


class Installation:
    """Patches applied together, each once its module is loaded; `uninstall()` leaves everything exactly as
    found (and forgets the patches still waiting for their module)."""

    def __init__(self, patches: tuple[Patch, ...], ctx: Any, on_uninstall: Callable[[], None] | None = None):
        self.patches, self.patcher, self._on_uninstall, self._ctx = patches, Patcher(), on_uninstall, ctx
        self.waiting = [item for item in patches if item.module is not None and not loaded(item.module)]
        self._hook: AfterImport | None = None
        if self.waiting:
            self._hook = AfterImport(self._module_loaded, {item.module for item in self.waiting if item.module})
            sys.meta_path.insert(0, self._hook)
        for item in patches:
            if item not in self.waiting:
                self._apply(item)

    def _apply(self, item: Patch) -> None:
        if item.assumes:
            from .assumed import check_assumed

            check_assumed(item.name, item.assumes)
        self.patcher.current = item.name
        try:
            item.apply(self._ctx, self.patcher)
        finally:
            self.patcher.current = ""

    def _module_loaded(self, name: str) -> None:
        ready = [item for item in self.waiting if item.module == name]
        self.waiting = [item for item in self.waiting if item.module != name]
        if not self.waiting:
            self._unhook()
        for item in ready:
            self._apply(item)

    def _unhook(self) -> None:
        if self._hook is not None and self._hook in sys.meta_path:
            sys.meta_path.remove(self._hook)
        self._hook = None

    def undeclared(self) -> list[tuple[str, str]]:
        """(patch, label) of every name a patch set without declaring it (tests keep this empty)."""
        by_name = {item.name: item for item in self.patches}
        return [(who, label) for who, label in self.patcher.touched if who in by_name and not by_name[who].covers(label)]

    def uninstall(self) -> None:
        self._unhook()
        self.waiting = []
        self.patcher.undo()
        if self._on_uninstall is not None:
            self._on_uninstall()
