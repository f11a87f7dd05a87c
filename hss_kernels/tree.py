"""Class trees: parsing, validation and the index tables every backend reads.

A tree file is tab-indented text, one node name per line, one more tab per level down; the root is
implicit (see docs/MATH.md §1.1 and the README). Two numberings matter:

* **label ids** number the leaves: they are the values of a data set's target maps. By default leaves
  get ids in file order; ``classes`` (leaf names in label-id order) overrides that.
* **node channels** number every node but the root: they are the channels of a model that emits one
  logit per node (HSSN). Leaves come first, by label id, then the internal nodes from the deepest level
  to the shallowest, each level in file order.

All tables are computed once in :class:`Tree` (as Python lists); :mod:`hss_kernels.tables` turns them
into the small int32 tensors the kernels read, cached per device (:meth:`Tree.tables`, :meth:`Tree.cached`).
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional, Sequence

from .tables import TreeTables, tree_tables

__all__ = ["Tree", "TreeTables"]


class Tree:
    """A class hierarchy. Build it with :meth:`from_file`, :meth:`from_text` or :meth:`from_parents`.

    Attributes (plain Python, all indexed by node channel unless said otherwise):

    * ``names``: node names; ``parents``: parent channel or -1; ``depths``: 1 for children of the root.
    * ``leaf_channels[l]``: the channel of leaf label ``l``; ``leaf_names[l]`` its name.
    * ``num_leaves`` (L), ``num_nodes`` (V), ``depth`` (D, the largest leaf depth).
    """

    def __init__(self, names: Sequence[str], parents: Sequence[int], leaf_channels: Sequence[int]):
        # Internal constructor: arguments are already validated by the public builders.
        self.names: List[str] = list(names)
        self.parents: List[int] = [int(p) for p in parents]
        V = len(self.names)
        self.children: List[List[int]] = [[] for _ in range(V)]
        self.roots: List[int] = []
        for c, p in enumerate(self.parents):
            (self.roots if p < 0 else self.children[p]).append(c)
        self.leaf_channels: List[int] = [int(c) for c in leaf_channels]
        self.channel_labels: List[int] = [-1] * V
        for l, c in enumerate(self.leaf_channels):
            self.channel_labels[c] = l
        self.depths: List[int] = [0] * V
        self.dfs_order: List[int] = []
        # Depth-first pre-order; children in channel order (for file trees: file order, see from_text).
        stack = [(c, 1) for c in reversed(self._ordered(self.roots))]
        while stack:
            c, d = stack.pop()
            self.depths[c] = d
            self.dfs_order.append(c)
            stack.extend((k, d + 1) for k in reversed(self._ordered(self.children[c])))
        self.dfs_pos: List[int] = [0] * V
        for i, c in enumerate(self.dfs_order):
            self.dfs_pos[c] = i
        self.subtree_size: List[int] = [1] * V
        for c in reversed(self.dfs_order):
            if self.parents[c] >= 0:
                self.subtree_size[self.parents[c]] += self.subtree_size[c]
        self.depth: int = max(self.depths[c] for c in self.leaf_channels)
        self._build_tables()
        self._memo: Dict = {}

    # The order in which children are visited. from_text sets _file_rank so that DFS follows the file.
    _file_rank: Optional[List[int]] = None

    def _ordered(self, nodes: List[int]) -> List[int]:
        rank = self._file_rank
        return sorted(nodes, key=(lambda c: rank[c]) if rank is not None else None)

    def _build_tables(self) -> None:
        L, V, D = self.num_leaves, self.num_nodes, self.depth
        self.ancestors: List[List[int]] = []  # per channel: root-side first, itself last
        for c in range(V):
            chain = [c]
            while self.parents[chain[-1]] >= 0:
                chain.append(self.parents[chain[-1]])
            self.ancestors.append(chain[::-1])
        self.leaf_ancestor: List[List[int]] = [
            [self.ancestors[self.leaf_channels[l]][min(d, self.depths[self.leaf_channels[l]]) - 1] for l in range(L)]
            for d in range(1, D + 1)
        ]
        # Classes at depth d: the distinct a_d(l), numbered by the smallest leaf label under them, so that
        # the classes at depth D are exactly the leaf labels.
        self.leaf_group: List[List[int]] = []
        self.group_nodes: List[List[int]] = []  # per depth: channel of each class
        for d in range(D):
            ids: Dict[int, int] = {}
            row = []
            for l in range(L):
                a = self.leaf_ancestor[d][l]
                if a not in ids:
                    ids[a] = len(ids)
                row.append(ids[a])
            self.leaf_group.append(row)
            self.group_nodes.append(list(ids))
        self.nodes_per_depth: List[int] = [sum(1 for x in self.depths if x == d) for d in range(1, D + 1)]

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_text(cls, text: str, classes: Optional[Sequence[str]] = None, source: str = "<text>") -> "Tree":
        """Parse a tab-indented tree. ``classes``: leaf names in label-id order (default: file order).

        Raises ``ValueError`` naming the line (``source:line``) for every malformed input.
        """
        names: List[str] = []
        parents_file: List[int] = []
        lines_of: List[int] = []
        stack: List[int] = []  # file indices of the open nodes on the current path
        seen: Dict[str, int] = {}
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                if line and "\t" in line and not line.strip(" \t"):
                    raise ValueError(f"{source}:{lineno}: empty name (a line of only indentation)")
                continue
            stripped = line.lstrip("\t")
            level = len(line) - len(stripped)
            if stripped[:1].isspace():
                raise ValueError(
                    f"{source}:{lineno}: spaces in the indentation; indent with one tab per level")
            name = stripped.rstrip()
            if level > len(stack):
                above = f"the line above has {len(stack) - 1}" if stack else "the first node takes none"
                raise ValueError(
                    f"{source}:{lineno}: {name!r} is indented {level} tab(s) but {above}; a line may be at "
                    f"most one tab deeper than the line above")
            if name in seen:
                raise ValueError(f"{source}:{lineno}: duplicate name {name!r} (first on line {seen[name]})")
            seen[name] = lineno
            del stack[level:]
            parents_file.append(stack[-1] if stack else -1)
            stack.append(len(names))
            names.append(name)
            lines_of.append(lineno)
        if not names:
            raise ValueError(f"{source}: empty tree file (no node names)")
        is_leaf = [True] * len(names)
        for p in parents_file:
            if p >= 0:
                is_leaf[p] = False
        file_leaves = [i for i in range(len(names)) if is_leaf[i]]
        if classes is None:
            label_of_file_leaf = {i: k for k, i in enumerate(file_leaves)}
        else:
            classes = list(classes)
            index_of = {names[i]: i for i in file_leaves}
            first: Dict[str, int] = {}
            for k, cname in enumerate(classes):
                if cname in first:
                    raise ValueError(f"{source}: classes lists {cname!r} twice (ids {first[cname]} and {k})")
                first[cname] = k
            extra = [c for c in classes if c not in index_of]
            if extra:
                internal = [c for c in extra if c in seen]
                what = (f"{internal!r} are internal nodes, not leaves" if internal
                        else f"{extra!r} are not in the tree")
                raise ValueError(f"{source}: classes does not match the leaves: {what}")
            missing = [i for i in file_leaves if names[i] not in first]
            if missing:
                where = ", ".join(f"{names[i]!r} (line {lines_of[i]})" for i in missing)
                raise ValueError(f"{source}: classes does not match the leaves: missing leaves {where}")
            label_of_file_leaf = {index_of[c]: k for k, c in enumerate(classes)}
        # Node channels: leaves by label id, then internal nodes deepest level first, file order.
        depth_of = [0] * len(names)
        for i, p in enumerate(parents_file):
            depth_of[i] = 1 if p < 0 else depth_of[p] + 1
        L = len(file_leaves)
        channel_of = [0] * len(names)
        for i, k in label_of_file_leaf.items():
            channel_of[i] = k
        internal = sorted((i for i in range(len(names)) if not is_leaf[i]), key=lambda i: (-depth_of[i], i))
        for k, i in enumerate(internal):
            channel_of[i] = L + k
        V = len(names)
        ch_names = [""] * V
        ch_parents = [-1] * V
        rank = [0] * V
        for i in range(V):
            c = channel_of[i]
            ch_names[c] = names[i]
            ch_parents[c] = channel_of[parents_file[i]] if parents_file[i] >= 0 else -1
            rank[c] = i
        tree = cls.__new__(cls)
        tree._file_rank = rank
        Tree.__init__(tree, ch_names, ch_parents, list(range(L)))
        tree.source = source
        return tree

    @classmethod
    def from_file(cls, path, classes: Optional[Sequence[str]] = None) -> "Tree":
        """Read a tab-indented tree file (UTF-8). See :meth:`from_text`."""
        path = os.fspath(path)
        with open(path, encoding="utf-8") as f:
            text = f.read()
        return cls.from_text(text, classes=classes, source=path)

    @classmethod
    def from_parents(cls, parents: Sequence[int], names: Optional[Sequence[str]] = None) -> "Tree":
        """Build a tree from a parent list: node i is node channel i, ``parents[i] = -1`` for a child of
        the root. Leaves get label ids in index order. Children are visited in index order."""
        parents = [int(p) for p in parents]
        V = len(parents)
        if V == 0:
            raise ValueError("from_parents: empty parent list")
        for i, p in enumerate(parents):
            if p < -1 or p >= V:
                raise ValueError(f"from_parents: parents[{i}] = {p} is out of range [-1, {V})")
            if p == i:
                raise ValueError(f"from_parents: node {i} is its own parent")
        for i in range(V):  # cycle check: walking up from i must reach -1 within V steps
            seen, c = set(), i
            while c >= 0:
                if c in seen:
                    raise ValueError(f"from_parents: node {i} is on a cycle of parents ({sorted(seen)})")
                seen.add(c)
                c = parents[c]
        if names is None:
            names = [f"node{i}" for i in range(V)]
        names = [str(n) for n in names]
        if len(names) != V:
            raise ValueError(f"from_parents: {len(names)} names for {V} nodes")
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"from_parents: duplicate names {sorted(dup)!r}")
        if any(not n.strip() for n in names):
            raise ValueError("from_parents: empty name")
        has_child = set(p for p in parents if p >= 0)
        leaves = [i for i in range(V) if i not in has_child]
        tree = cls(names, parents, leaves)
        tree.source = "<parents>"
        return tree

    # ------------------------------------------------------------------ properties
    @property
    def num_leaves(self) -> int:
        return len(self.leaf_channels)

    @property
    def num_nodes(self) -> int:
        return len(self.names)

    @property
    def leaf_names(self) -> List[str]:
        return [self.names[c] for c in self.leaf_channels]

    def is_leaf(self, channel: int) -> bool:
        return self.channel_labels[channel] >= 0

    def class_names(self, depth: int) -> List[str]:
        """Names of the classes at ``depth`` (1..D), in class-id order (``TreeTables.leaf_group``)."""
        self._check_depth(depth)
        return [self.names[c] for c in self.group_nodes[depth - 1]]

    def num_classes(self, depth: int) -> int:
        self._check_depth(depth)
        return len(self.group_nodes[depth - 1])

    def _check_depth(self, depth: int) -> None:
        if not 1 <= depth <= self.depth:
            raise ValueError(f"depth must be in 1..{self.depth}, got {depth}")

    def to_text(self) -> str:
        """The tree as a tab-indented file (leaves in depth-first order; give ``classes`` to reload)."""
        return "".join("\t" * (self.depths[c] - 1) + self.names[c] + "\n" for c in self.dfs_order)

    def __str__(self) -> str:
        head = f"Tree({self.num_leaves} leaves, {self.num_nodes} nodes, depth {self.depth})"
        rows = []
        for c in self.dfs_order:
            tag = f"label {self.channel_labels[c]}" if self.channel_labels[c] >= 0 else "internal"
            rows.append(f"{'  ' * (self.depths[c] - 1)}{self.names[c]}  [channel {c}, {tag}]")
        return "\n".join([head] + rows)

    def __repr__(self) -> str:
        return f"Tree({self.num_leaves} leaves, {self.num_nodes} nodes, depth {self.depth})"

    # ------------------------------------------------------------------ tables
    def tables(self, device="cpu") -> TreeTables:
        """The int32 index tables on ``device`` (:func:`hss_kernels.tables.tree_tables`), computed once
        per device."""
        return tree_tables(self, device)

    def cached(self, key, build):
        """``build()``, computed once per ``key`` and kept with the tree: :mod:`hss_kernels.tables` keeps the
        small device tensors the kernels read (tables, packed layouts, weight vectors) here so that a
        training step builds and copies nothing from the host. ``key`` must name everything the value
        depends on (device, dtype, options)."""
        value = self._memo.get(key)
        if value is None:
            value = build()
            self._memo[key] = value
        return value
