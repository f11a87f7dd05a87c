"""hss_kernels.tables: the tensors the kernels read, each in the one layout both backends read."""
import pytest
import torch

from hss_kernels import tables, trees

import helpers

TREES = ["cityscapes", "vistas", "vistas_v2", "helen", "pascal_person_part"]


def _trees():
    return [trees.load(name) for name in TREES] + [helpers.random_tree(20, max_depth=6, seed=s) for s in range(3)]


def test_tree_index_layout():
    """``depth | dfs_order | dfs_pos | subtree_size | path_nodes`` (docs/MATH.md §1.7), from the tree's own
    numberings; the native ops read this very tensor."""
    from hss_kernels.native import tree_min as native_tree_min
    for tree in _trees():
        got = tables.tree_index(tree, "cpu")
        assert got.dtype == torch.int32 and got.is_contiguous()
        V, L, D = tree.num_nodes, tree.num_leaves, tree.depth
        path = torch.full((L, D), -1, dtype=torch.int32)
        for y in range(L):
            for v in tree.ancestors[tree.leaf_channels[y]]:
                path[y, tree.depths[v] - 1] = v
        want = torch.cat([torch.tensor(tree.depths), torch.tensor(tree.dfs_order), torch.tensor(tree.dfs_pos),
                          torch.tensor(tree.subtree_size), path.reshape(-1)]).to(torch.int32)
        assert torch.equal(got, want), tree
    assert native_tree_min.tree_index is tables.tree_index


def test_decode_walk_layout():
    """The nodes in pre-order: channel, depth, leaf id (-1 internal), and whether the leaf ids increase
    along it; for leaf logits a flat walk of the leaf channels."""
    for tree in _trees():
        walk, ordered = tables.decode_walk(tree, "cpu", False)
        assert walk.dtype == torch.int32 and walk.is_contiguous() and walk.shape == (3, tree.num_nodes)
        order = list(tree.dfs_order)
        assert walk[0].tolist() == order
        assert walk[1].tolist() == [tree.depths[c] for c in order]
        assert walk[2].tolist() == [tree.channel_labels[c] for c in order]
        leaves = [l for l in walk[2].tolist() if l >= 0]
        assert sorted(leaves) == list(range(tree.num_leaves)) and ordered == (leaves == sorted(leaves))
        leaf, flat_ordered = tables.decode_walk(tree, "cpu", True)
        L = torch.arange(tree.num_leaves, dtype=torch.int32)
        assert torch.equal(leaf, torch.stack([L, torch.ones_like(L), L])) and flat_ordered
    assert not tables.decode_walk(trees.load("vistas"), "cpu", False)[1]
    assert tables.decode_walk(trees.load("vistas_v2"), "cpu", False)[1]


def test_leaf_group_is_the_tables_one():
    for tree in _trees():
        got = tables.leaf_group(tree, "cpu")
        assert got.is_contiguous() and got.shape == (tree.depth, tree.num_leaves)
        assert torch.equal(got, tree.tables("cpu").leaf_group)


def test_tree_min_table_extends_tree_index():
    """One packed layout: the Triton table starts with the native index (the same memory), then holds
    the segmented-scan ancestors and the internal nodes."""
    for tree in _trees():
        full, index = tables.tree_min_table(tree, "cpu"), tables.tree_index(tree, "cpu")
        L, D, DI, I = tables.tree_min_sizes(tree)
        V = tree.num_nodes
        assert full.numel() == 4 * V + L * D + DI * V + 4 * I
        assert index.data_ptr() == full.data_ptr() and index.numel() == 4 * V + L * D
        internal = full[4 * V + L * D + DI * V:].reshape(I, 4).tolist()
        pre = [c for c in tree.dfs_order if not tree.is_leaf(c)]
        assert [c for _, _, c, _ in internal] == pre
        for row, size, c, depth in internal:
            assert (row, size, depth) == (tree.dfs_pos[c], tree.subtree_size[c], tree.depths[c])


def test_weight_vectors():
    tree = trees.load("vistas")
    w = tables.level_weight_vector(tree, [1.0, 0.5, 2.0], torch.float64, "cpu")
    assert w.tolist() == [1.0, 0.5, 2.0] and w.dtype == torch.float64
    assert tables.level_weight_vector(tree, [1.0, 0.5, 2.0], torch.float64, "cpu") is w  # cached
    assert tables.level_weight_vector(tree, None, torch.float32, "cpu").tolist() == [1.0] * tree.depth
    k = tables.node_weight_vector(tree, 5.0, "level", torch.float32, "cpu")
    per_depth = [5.0 / n for n in tree.nodes_per_depth]
    assert k.tolist() == pytest.approx([per_depth[d - 1] for d in tree.depths])
    k = tables.node_weight_vector(tree, 5.0, "node", torch.float32, "cpu")
    assert k.tolist() == pytest.approx([5.0 / tree.num_nodes] * tree.num_nodes)


def test_cached_per_device():
    tree = trees.load("helen")
    assert tables.tree_min_table(tree, "cpu") is tables.tree_min_table(tree, torch.device("cpu"))
    assert tree.tables("cpu") is tables.tree_tables(tree, "cpu")
