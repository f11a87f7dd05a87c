"""The real class hierarchies shipped in the project's ``trees/`` folder, loaded by name.

>>> from hss_kernels import trees
>>> trees.names()
['cityscapes', 'helen', 'lip', 'pascal_person_part', 'vistas', 'vistas_v2']
>>> tree = trees.load("vistas")

Each ``<name>.txt`` is a tab-indented tree file; where the data set's label ids do not follow the
file's leaf order, ``<name>.classes.txt`` lists the leaf names in label-id order.
``trees/README.md`` says where each hierarchy comes from.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import List

from .tree import Tree

__all__ = ["names", "load", "path"]

_HERE = Path(__file__).resolve().parent
# An installed wheel carries the files as hss_kernels/tree_files; a checkout has them in ../trees.
_DIRS = [_HERE / "tree_files", _HERE.parent / "trees"]


def _dir() -> Path:
    for d in _DIRS:
        if (d / "vistas.txt").is_file():
            return d
    raise FileNotFoundError(f"the tree files are missing (looked in {', '.join(map(str, _DIRS))})")


def names() -> List[str]:
    """Names of the shipped trees."""
    return sorted(p.stem for p in _dir().glob("*.txt") if not p.name.endswith(".classes.txt"))


def path(name: str) -> Path:
    """Path of the tree file called ``name``."""
    p = _dir() / f"{name}.txt"
    if name.endswith(".classes") or not p.is_file():
        raise ValueError(f"unknown tree {name!r}; the shipped trees are {names()}")
    return p


@lru_cache(maxsize=None)
def load(name: str) -> Tree:
    """Load a shipped tree by name, with its data set's label order (cached: trees are immutable)."""
    p = path(name)
    classes_file = p.with_name(f"{name}.classes.txt")
    classes = None
    if classes_file.is_file():
        classes = [line.rstrip("\r\n") for line in classes_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return Tree.from_file(p, classes=classes)
