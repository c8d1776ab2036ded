"""Files that ship with fastlaunch (templates/, launch_configs/): package data in an installed wheel,
the repository's top-level folders in a source checkout."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["data_path"]


def data_path(*parts: str) -> Path:
    """The path of a shipped file or folder, e.g. data_path("templates", "minimal")."""
    packaged = resources.files("fastlaunch").joinpath(*parts)
    if packaged.is_file() or packaged.is_dir():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent.joinpath(*parts)
