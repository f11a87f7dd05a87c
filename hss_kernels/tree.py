"""Class trees: parsing, validation and the index tables every backend reads.

A tree file is tab-indented text, one node name per line, one more tab per level down; the root is
implicit; blank lines and lines starting with ``#`` are skipped, except ``#classes<TAB>name<TAB>...``,
the leaf names in label-id order (see docs/MATH.md §1.1 and the README). Names may repeat between
internal nodes and between an internal node and a leaf; leaf names are unique (they map label ids).
Two numberings matter:

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
    """A class hierarchy. Build it with :meth:`from_file`, :meth:`from_text`, :meth:`from_parents` or
    :meth:`from_levels` (the level dicts of HSSN's and LogicSeg's code).

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
        """Parse a tab-indented tree. ``classes``: leaf names in label-id order (default: the file's
        ``#classes`` line if it has one, else file order). Blank lines and ``#`` comment lines are skipped.

        Raises ``ValueError`` naming the line (``source:line``) for every malformed input.
        """
        names: List[str] = []
        parents_file: List[int] = []
        lines_of: List[int] = []
        stack: List[int] = []  # file indices of the open nodes on the current path
        seen: Dict[str, int] = {}
        file_classes: Optional[List[str]] = None
        for lineno, raw in enumerate(text.splitlines(), start=1):
            line = raw.rstrip("\r\n")
            if not line.strip():
                if line and "\t" in line and not line.strip(" \t"):
                    raise ValueError(f"{source}:{lineno}: empty name (a line of only indentation)")
                continue
            if line.lstrip(" \t").startswith("#"):
                if line.startswith("#classes\t"):
                    if file_classes is not None:
                        raise ValueError(f"{source}:{lineno}: a second #classes line")
                    file_classes = line.split("\t")[1:]
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
            seen.setdefault(name, lineno)
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
        first_leaf: Dict[str, int] = {}
        for i in file_leaves:  # leaf names map label ids: unique (internal names may repeat)
            if names[i] in first_leaf:
                raise ValueError(f"{source}:{lines_of[i]}: duplicate leaf name {names[i]!r} (first on line "
                                 f"{lines_of[first_leaf[names[i]]]}); leaf names must be unique")
            first_leaf[names[i]] = i
        if classes is None:
            classes = file_classes
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
                internal = [c for c in extra if c in seen]  # the name of an internal node only
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
        if any(not n.strip() for n in names):
            raise ValueError("from_parents: empty name")
        has_child = set(p for p in parents if p >= 0)
        leaves = [i for i in range(V) if i not in has_child]
        leaf_names = [names[i] for i in leaves]
        dup = {n for n in leaf_names if leaf_names.count(n) > 1}
        if dup:
            raise ValueError(f"from_parents: duplicate leaf names {sorted(dup)!r} (leaf names must be unique; "
                             f"internal nodes may share names)")
        tree = cls(names, parents, leaves)
        tree.source = "<parents>"
        return tree

    @classmethod
    def from_levels(cls, levels, leaf_names: Optional[Sequence[str]] = None, ranges: bool = True) -> "Tree":
        """A tree from level dicts as HSSN's and LogicSeg's code writes them: ``levels`` coarsest level
        first, each ``{group name: leaves}``; the leaves are the label ids 0 .. L-1. ``leaves`` is a
        ``[start, end)`` pair of label ids (``ranges=True``, the default: HSSN's ``"flat": [0, 2]`` holds
        leaves 0 and 1), a ``range``, or (``ranges=False``) a list of label ids. ``leaf_names``: the leaves'
        names in label-id order (default ``class0``, ``class1``, ...; its length sets L).

        A group of a level must lie inside one group of the level above; a leaf hangs under its group at
        the deepest level that holds it, and every leaf must be in a group of the first level. Group
        names may repeat (across levels, and a group may share its leaf's name, as HSSN's Cityscapes
        ``sky``). Node channels follow the file rule: leaves by label id, then the groups deepest level
        first, each level in dict order. Raises ``ValueError`` naming the level and group."""
        if isinstance(levels, dict):
            raise TypeError("from_levels: levels is a list of dicts, coarsest first (got one dict: wrap it in a list)")
        levels = list(levels)
        if not levels:
            raise ValueError("from_levels: no levels")
        members: List[List[List[int]]] = []
        for k, level in enumerate(levels, start=1):
            if not isinstance(level, dict) or not level:
                raise ValueError(f"from_levels: level {k} must be a non-empty dict {{group name: leaves}}")
            row = []
            for name, leaves in level.items():
                where = f"from_levels: level {k}, group {name!r}"
                if isinstance(leaves, range):
                    ids = list(leaves)
                elif ranges:
                    if len(leaves) != 2 or not all(isinstance(v, int) for v in leaves) or not leaves[0] < leaves[1]:
                        raise ValueError(f"{where}: {list(leaves)!r} is not a [start, end) pair with start < end "
                                         f"(pass ranges=False for lists of label ids)")
                    ids = list(range(leaves[0], leaves[1]))
                else:
                    ids = [int(v) for v in leaves]
                if not ids or min(ids) < 0:
                    raise ValueError(f"{where}: needs label ids >= 0, got {list(leaves)!r}")
                if not str(name).strip() or "\t" in str(name) or "\n" in str(name):
                    raise ValueError(f"{where}: a group name must be non-empty, without tabs or newlines")
                row.append(ids)
            members.append(row)
        L = max(max(ids) for row in members for ids in row) + 1
        if leaf_names is None:
            leaf_names = [f"class{i}" for i in range(L)]
        leaf_names = [str(n) for n in leaf_names]
        if len(leaf_names) < L:
            raise ValueError(f"from_levels: the levels name label id {L - 1} but leaf_names has {len(leaf_names)} names")
        L = len(leaf_names)
        # group_of[k][l]: the index of leaf l's group at level k, or -1.
        group_of = []
        for k, (level, row) in enumerate(zip(levels, members), start=1):
            names_k = list(level)
            g = [-1] * L
            for j, ids in enumerate(row):
                for leaf in ids:
                    if g[leaf] >= 0:
                        raise ValueError(f"from_levels: level {k}: leaf {leaf} ({leaf_names[leaf]!r}) is in groups "
                                         f"{names_k[g[leaf]]!r} and {names_k[j]!r}")
                    g[leaf] = j
            group_of.append(g)
        missing = [leaf for leaf in range(L) if group_of[0][leaf] < 0]
        if missing:
            shown = ", ".join(f"{leaf} ({leaf_names[leaf]!r})" for leaf in missing[:5])
            raise ValueError(f"from_levels: leaves {shown}{' ...' if len(missing) > 5 else ''} are in no group of "
                             f"level 1; every leaf needs one (give leaf_names only for the leaves the levels cover)")
        parent_group = []  # per level k >= 2: the level-(k-1) group of each group
        for k in range(1, len(levels)):
            names_k, names_up = list(levels[k]), list(levels[k - 1])
            par = []
            for j, ids in enumerate(members[k]):
                ups = {group_of[k - 1][leaf] for leaf in ids}
                if len(ups) != 1 or -1 in ups:
                    what = sorted(names_up[u] for u in ups if u >= 0)
                    raise ValueError(f"from_levels: level {k + 1}, group {names_k[j]!r} is not inside one group of "
                                     f"level {k} (its leaves are in {what}{' and in none' if -1 in ups else ''})")
                par.append(ups.pop())
            parent_group.append(par)
        # The tree as a file: groups depth first in dict order, leaves in label-id order under their group.
        children: Dict[tuple, List[tuple]] = {}
        for k, row in enumerate(members):
            for j in range(len(row)):
                key = ("g", k, j)
                parent = ("root",) if k == 0 else ("g", k - 1, parent_group[k - 1][j])
                children.setdefault(parent, []).append(key)
        for leaf in range(L):
            k = max(k for k in range(len(levels)) if group_of[k][leaf] >= 0)
            children.setdefault(("g", k, group_of[k][leaf]), []).append(("l", leaf))
        lines: List[str] = []
        stack = [(c, 0) for c in reversed(children[("root",)])]
        while stack:
            node, depth = stack.pop()
            name = list(levels[node[1]])[node[2]] if node[0] == "g" else leaf_names[node[1]]
            lines.append("\t" * depth + str(name))
            stack.extend((c, depth + 1) for c in reversed(children.get(node, [])))
        tree = cls.from_text("\n".join(lines) + "\n", classes=leaf_names, source="<levels>")
        tree.source = "<levels>"
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
        """The tree as a tab-indented file that :meth:`from_text` loads back to this tree: the nodes in
        depth-first order, and a ``#classes`` line with the leaf names in label-id order when that differs
        from the file's leaf order. (A tree from :meth:`from_parents` may number its internal nodes
        otherwise than the file rule; the file keeps its structure, names and label ids.)"""
        body = "".join("\t" * (self.depths[c] - 1) + self.names[c] + "\n" for c in self.dfs_order)
        file_leaves = [self.names[c] for c in self.dfs_order if self.is_leaf(c)]
        if file_leaves == self.leaf_names:
            return body
        return "#classes\t" + "\t".join(self.leaf_names) + "\n" + body

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
