"""The kernels' ``sm90:`` annotations and the variables their trip expressions may use.

An annotation is a comment on a source line (``# sm90: ...`` in Python, ``// sm90: ...`` in C++),
items separated by ``;``:

* ``trips=<expr>`` on the line of a loop (``for``/``while``): how many iterations the loop makes per
  execution of the code around it, averaged over labels (see :func:`tree_variables`);
* ``cold`` on the line of a branch whose one side real inputs almost never run (bad labels, groups
  that underflow);
* ``logits`` on a line that loads the logits (the loads whose width ``global_load_bits`` reports);
* ``share=<expr>`` on the line of a branch that only some warps take (the branch on the warp index): the
  share of the executions that run the code it guards, e.g. ``share=1/CH``;
* ``mem=<expr>`` on the line of a loop beside its ``trips``: the memory instructions (loads, stores) one
  iteration issues in the loop's own body, not its inner loops'. A loop of constant trips that the compiler
  unrolled by u without a remainder copy is one SASS loop of u iterations a pass: its memory instructions over
  this give u, and it is counted trips / u times (without ``mem`` it would be counted trips times).
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Dict, Iterable, List, Optional

from .sass import Annotation, Loc, SassError

ROOT = Path(__file__).resolve().parents[2]
# Files that hold kernel code, relative to the repository root.
KERNEL_GLOBS = ("hss_kernels/triton/*.py", "csrc/include/*.h", "csrc/cuda/*.cu", "csrc/cuda/*.cuh")

_ITEM = re.compile(r"(?:#|//).*?\bsm90:\s*(.*?)\s*$")


def parse_annotation(line: str) -> Optional[Annotation]:
    """The annotation of one source line, or None."""
    m = _ITEM.search(line)
    if not m:
        return None
    trips, cold, logits, share, mem = None, False, False, None, None
    for item in (s.strip() for s in m.group(1).split(";")):
        if not item:
            continue
        if item.startswith("trips="):
            trips = item[len("trips="):].strip()
            if not trips:
                raise ValueError(f"empty trips expression: {line.strip()!r}")
        elif item.startswith("share="):
            share = item[len("share="):].strip()
            if not share:
                raise ValueError(f"empty share expression: {line.strip()!r}")
        elif item.startswith("mem="):
            mem = item[len("mem="):].strip()
            if not mem:
                raise ValueError(f"empty mem expression: {line.strip()!r}")
        elif item == "cold":
            cold = True
        elif item == "logits":
            logits = True
        else:
            raise ValueError(f"unknown sm90 annotation {item!r} in {line.strip()!r}")
    return Annotation(trips, cold, logits, share, mem)


class Annotations:
    """Every annotation of the kernel sources under ``root``; looks up nvdisasm's (file, line) pairs by
    the longest path suffix (a cached cubin may name another checkout's copy of the same file)."""

    def __init__(self, root: Path = ROOT, globs: Iterable[str] = KERNEL_GLOBS):
        self.root = Path(root)
        self.by_file: Dict[str, Dict[int, Annotation]] = {}
        for g in globs:
            for p in sorted(self.root.glob(g)):
                rel = p.relative_to(self.root).as_posix()
                lines = {}
                for n, text in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
                    try:
                        a = parse_annotation(text)
                    except ValueError as exc:
                        raise SassError(f"{rel}:{n}: {exc}") from None
                    if a is not None:
                        lines[n] = a
                self.by_file[rel] = lines
        self._resolved: Dict[str, Optional[str]] = {}

    def relpath(self, path: str) -> Optional[str]:
        """The repository file that nvdisasm's ``path`` names, or None (torch headers, ...)."""
        if path not in self._resolved:
            norm = os.path.normpath(path).replace(os.sep, "/")
            best = None
            for rel in self.by_file:
                if norm == rel or norm.endswith("/" + rel):
                    if best is None or len(rel) > len(best):
                        best = rel
            self._resolved[path] = best
        return self._resolved[path]

    def __call__(self, loc: Loc) -> Optional[Annotation]:
        rel = self.relpath(loc[0])
        return self.by_file[rel].get(loc[1]) if rel else None

    def name(self, loc: Loc) -> str:
        rel = self.relpath(loc[0])
        return f"{rel or loc[0]}:{loc[1]}"

    def lines(self, what: str) -> List[str]:
        return [f"{f}:{n}" for f, d in self.by_file.items() for n, a in sorted(d.items()) if getattr(a, what)]


# ------------------------------------------------------------------------------------------ variables
def tree_variables(tree) -> Dict[str, float]:
    """Variables of a tree for trip expressions, with labels uniform over the leaves:

    L leaves, V nodes, D depth, I internal nodes, DI depth of the deepest internal node;
    PATH: mean number of nodes on a label's root-to-leaf path;
    PATH_ITERS: mean iterations a ``for d < D`` loop over the path starts when it breaks at the path's
    end (min(PATH_d + 1, D) per label);
    WALK: mean over labels of the nodes the subtree walks of the off-path internal nodes visit, the sum
    over nodes v not on the label's path of (subtree size of v) - 1.
    """
    L, V, D = tree.num_leaves, tree.num_nodes, tree.depth
    internal = [c for c in range(V) if not tree.is_leaf(c)]
    paths = [set(tree.ancestors[tree.leaf_channels[y]]) for y in range(L)]
    lens = [len(p) for p in paths]
    walk = [sum(tree.subtree_size[v] - 1 for v in internal if v not in p) for p in paths]
    return {
        "L": L, "V": V, "D": D, "I": len(internal),
        "DI": max((tree.depths[c] for c in internal), default=0),
        "PATH": sum(lens) / L,
        "PATH_ITERS": sum(min(n + 1, D) for n in lens) / L,
        "WALK": sum(walk) / L,
    }


_FUNCS = {"ceil": math.ceil, "floor": math.floor, "log2": math.log2, "min": min, "max": max, "cdiv":
          lambda a, b: -(-a // b)}


def evaluate(expr: str, variables: Dict[str, float], where: str) -> float:
    """The value of a trips expression; SassError naming ``where`` if it does not evaluate."""
    try:
        value = eval(compile(expr, where, "eval"), {"__builtins__": {}, **_FUNCS}, dict(variables))  # noqa: S307
    except Exception as exc:  # a typo or an unknown variable in a kernel's annotation
        raise SassError(f"{where}: cannot evaluate trips={expr!r} ({type(exc).__name__}: {exc}); "
                        f"variables: {', '.join(sorted(variables))}") from None
    if not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
        raise SassError(f"{where}: trips={expr!r} gives {value!r}, not a count")
    return float(value)
