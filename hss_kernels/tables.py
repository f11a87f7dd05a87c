"""Every tensor a kernel reads, built from a :class:`~hss_kernels.tree.Tree` (docs/MATH.md §1.7).

Each builder is cached per tree and device (:meth:`Tree.cached`), so that a training step builds and
copies nothing from the host; the tensors are shared: do not modify them.

* :func:`tree_tables`: the plain index tables (:class:`TreeTables`), what ``Tree.tables`` returns.
* :func:`level_weight_vector` (hierarchical softmax, w_d) and :func:`node_weight_vector` (tree-min and
  tree BCE, k_v).
* :func:`leaf_group`: the ``(D, L)`` class ids both hierarchical softmax backends read.
* :func:`tree_index`: the tree-min / tree-BCE index the native kernels read,
  ``depth | dfs_order | dfs_pos | subtree_size | path_nodes``; :func:`tree_min_table` is the same tensor
  followed by what the Triton kernel reads beyond it (:func:`tree_index` is a view of its start).
* :func:`decode_walk`: the ``(3, V)`` pre-order walk the native decode reads; :func:`decode_walk_rows`, its
  values as lists, which the Triton kernel compiles in (``triton/decode.py:_walk``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List

import torch

if TYPE_CHECKING:  # tree.py imports this module
    from .tree import Tree

__all__ = [
    "TreeTables",
    "tree_tables",
    "level_weight_vector",
    "node_weight_vector",
    "leaf_group",
    "tree_index",
    "tree_min_sizes",
    "tree_min_table",
    "decode_walk",
    "decode_walk_rows",
]


@dataclass(frozen=True)
class TreeTables:
    """Index tables of one tree on one device (all int32 unless said otherwise).

    ``L`` leaves, ``V`` nodes (channels), ``D`` depth. Every node index below is a node channel.

    * ``leaf_channel[l]``: channel of leaf label ``l``.  ``(L,)``
    * ``depth[c]``: depth of the node (1 for a child of the root).  ``(V,)``
    * ``leaf_group[d-1, l]``: the class id of leaf ``l`` at depth ``d`` (dense ids ``0..G_d-1``).  The
      group ``G_d(l)`` of docs/MATH.md §1.4 is ``{k : leaf_group[d-1, k] == leaf_group[d-1, l]}``.  ``(D, L)``
    * ``leaf_ancestor[d-1, l]``: ``a_d(l)`` as a channel (the leaf itself when shallower than d).  ``(D, L)``
    * ``path_nodes[l, d-1]``: channel of the depth-d node on leaf ``l``'s root-to-leaf path, -1 past the
      leaf's depth.  ``(L, D)``
    * ``path``: path-membership matrix, ``path[c, l] = 1`` if node ``c`` is on leaf ``l``'s path.
      ``(V, L)``, uint8.
    * ``dfs_order[i]``: the channel at depth-first (pre-order, file order) position ``i``;
      ``dfs_pos[c]`` its inverse; ``subtree_size[c]``: number of descendants-or-self, so that
      desc-or-self(c) = ``dfs_order[dfs_pos[c] : dfs_pos[c] + subtree_size[c]]``.  ``(V,)`` each.
    * ``nodes_per_depth[d-1]``: ``|V_d|``.  ``(D,)``
    """

    leaf_channel: torch.Tensor
    depth: torch.Tensor
    leaf_group: torch.Tensor
    leaf_ancestor: torch.Tensor
    path_nodes: torch.Tensor
    path: torch.Tensor
    dfs_order: torch.Tensor
    dfs_pos: torch.Tensor
    subtree_size: torch.Tensor
    nodes_per_depth: torch.Tensor


def _key(name: str, device, *options):
    return (name, str(torch.device(device))) + options


def tree_tables(tree: "Tree", device="cpu") -> TreeTables:
    """The int32 index tables of ``tree`` on ``device``."""
    return tree.cached(_key("tables", device), lambda: _build_tree_tables(tree, torch.device(device)))


def _build_tree_tables(tree: "Tree", device: torch.device) -> TreeTables:
    L, V, D = tree.num_leaves, tree.num_nodes, tree.depth

    def i32(x):
        return torch.tensor(x, dtype=torch.int32, device=device)

    path_nodes = [[-1] * D for _ in range(L)]
    path = [[0] * L for _ in range(V)]
    for l, c in enumerate(tree.leaf_channels):
        for d, a in enumerate(tree.ancestors[c]):
            path_nodes[l][d] = a
            path[a][l] = 1
    return TreeTables(
        leaf_channel=i32(tree.leaf_channels),
        depth=i32(tree.depths),
        leaf_group=i32(tree.leaf_group).reshape(D, L),
        leaf_ancestor=i32(tree.leaf_ancestor).reshape(D, L),
        path_nodes=i32(path_nodes).reshape(L, D),
        path=torch.tensor(path, dtype=torch.uint8, device=device).reshape(V, L),
        dfs_order=i32(tree.dfs_order),
        dfs_pos=i32(tree.dfs_pos),
        subtree_size=i32(tree.subtree_size),
        nodes_per_depth=i32(tree.nodes_per_depth),
    )


# ------------------------------------------------------------------------------------ weight vectors
def level_weight_vector(tree: "Tree", level_weights, dtype, device) -> torch.Tensor:
    """The per-depth weights w_1..w_D of the hierarchical softmax loss (docs/MATH.md §2.1; default all
    ones), contiguous, of ``dtype``. A tensor ``level_weights`` is converted on every call (it may
    change between calls, or carry a gradient); a sequence or None is built once per (weights, dtype,
    device)."""
    if isinstance(level_weights, torch.Tensor):
        return _level_weights(tree, level_weights, dtype, device)
    weights = None if level_weights is None else tuple(float(v) for v in level_weights)
    return tree.cached(_key("level_weights", device, weights, dtype),
                       lambda: _level_weights(tree, level_weights, dtype, device))


def _level_weights(tree: "Tree", level_weights, dtype, device) -> torch.Tensor:
    if level_weights is None:
        return torch.ones(tree.depth, dtype=dtype, device=device)
    # contiguous: kernels read w_ptr + d (reshape keeps a strided 1-D view as it is)
    return torch.as_tensor(level_weights, dtype=dtype, device=device).reshape(-1).contiguous()


def node_weight_vector(tree: "Tree", scale: float, normalize: str, dtype, device) -> torch.Tensor:
    """k_v of docs/MATH.md §3.5 per channel: ``scale / |V_d|`` (``normalize="level"``) or ``scale / V``
    (``"node"``)."""
    scale = float(scale)
    return tree.cached(_key("node_weights", device, scale, normalize, dtype),
                       lambda: _node_weights(tree, scale, normalize, dtype, device))


def _node_weights(tree: "Tree", scale: float, normalize: str, dtype, device) -> torch.Tensor:
    if normalize == "level":
        per_depth = [scale / n for n in tree.nodes_per_depth]
        w = [per_depth[d - 1] for d in tree.depths]
    else:
        w = [scale / tree.num_nodes] * tree.num_nodes
    return torch.tensor(w, dtype=dtype, device=device)


# ------------------------------------------------------------------------------------ kernel tables
def leaf_group(tree: "Tree", device) -> torch.Tensor:
    """``(D, L)`` int32, contiguous: the class id of each leaf at each depth (``TreeTables.leaf_group``),
    the table the hierarchical softmax kernels of both backends read."""
    return tree_tables(tree, device).leaf_group


def tree_min_sizes(tree: "Tree") -> List[int]:
    """``[L, D, DI, I]``: leaves, depth, depth of the deepest internal node (0: flat), internal nodes."""
    internal = [tree.depths[c] for c in range(tree.num_nodes) if not tree.is_leaf(c)]
    return [tree.num_leaves, tree.depth, max(internal, default=0), len(internal)]


def tree_index(tree: "Tree", device) -> torch.Tensor:
    """The tree-min / tree-BCE index of the native kernels (docs/MATH.md §1.7), one int32 tensor of
    ``4V + L*D`` values: ``depth (V) | dfs_order (V) | dfs_pos (V) | subtree_size (V) | path_nodes (L*D)``,
    every per-node entry indexed by channel. The first ``4V + L*D`` values of :func:`tree_min_table`."""
    V, L, D = tree.num_nodes, tree.num_leaves, tree.depth
    return tree_min_table(tree, device)[:4 * V + L * D]


def tree_min_table(tree: "Tree", device) -> torch.Tensor:
    """:func:`tree_index` followed by what the Triton tree-min kernel reads beyond it (docs/MATH.md §3.10),
    one contiguous int32 tensor:

    * ``DI * V``: for each internal depth l = 1..DI and each pre-order row, the row of the row's
      depth-l ancestor-or-self if that node is internal, else -1 (the segmented-scan variant);
    * ``4 * I``: for each internal node in pre-order, its row, subtree size, channel and depth.

    ``DI`` and ``I`` are :func:`tree_min_sizes`' last two values.
    """
    return tree.cached(_key("tree_min_table", device), lambda: _build_tree_min_table(tree, device))


def _build_tree_min_table(tree: "Tree", device) -> torch.Tensor:
    t = tree_tables(tree, "cpu")
    order = tree.dfs_order
    DI = tree_min_sizes(tree)[2]
    anc = []
    for lvl in range(1, DI + 1):
        for c in order:
            chain = tree.ancestors[c]  # root side first, c last
            a = chain[lvl - 1] if len(chain) >= lvl else -1
            anc.append(tree.dfs_pos[a] if a >= 0 and not tree.is_leaf(a) else -1)
    internal = [[tree.dfs_pos[c], tree.subtree_size[c], c, tree.depths[c]] for c in order if not tree.is_leaf(c)]
    parts = [t.depth, t.dfs_order, t.dfs_pos, t.subtree_size, t.path_nodes.reshape(-1),
             torch.tensor(anc, dtype=torch.int32), torch.tensor(internal, dtype=torch.int32).reshape(-1)]
    return torch.cat(parts).to(device=device, dtype=torch.int32).contiguous()


def decode_walk_rows(tree: "Tree", leaf_logits: bool) -> List[List[int]]:
    """The rows of :func:`decode_walk` as lists (the Triton kernel compiles them in): the channels in
    pre-order, their depths and their leaf ids (-1 for an internal node); for leaf logits a flat walk."""
    def build():
        if leaf_logits:
            L = tree.num_leaves
            return [list(range(L)), [1] * L, list(range(L))]
        order = tree.dfs_order
        return [list(order), [tree.depths[c] for c in order], [tree.channel_labels[c] for c in order]]
    return tree.cached(("decode_walk_rows", bool(leaf_logits)), build)


def decode_walk(tree: "Tree", device, leaf_logits: bool):
    """``(walk, ordered)``: the tree's nodes in pre-order as one ``(3, V)`` int32 contiguous tensor, rows
    channel, depth (1 for a child of the root) and leaf id (-1 for an internal node); ``ordered``: the leaf
    ids increase along the walk. For leaf logits a flat walk of the ``L`` leaf channels (channel ``l``,
    depth 1, leaf id ``l``; ordered): the argmax."""
    def build():
        rows = decode_walk_rows(tree, leaf_logits)
        leaves = [l for l in rows[2] if l >= 0]
        walk = torch.tensor(rows, dtype=torch.int32, device=device).contiguous()
        return walk, leaves == sorted(leaves)
    return tree.cached(_key("decode_walk", device, bool(leaf_logits)), build)
