"""hss_kernels.tables: the tensors the kernels read. The native backend's packed layouts are built here
too; each must equal what the native glue builds itself (until it imports them from here)."""
import pytest
import torch

from hss_kernels import tables, trees

import helpers

TREES = ["cityscapes", "vistas", "vistas_v2", "helen", "pascal_person_part"]


def _trees():
    return [trees.load(name) for name in TREES] + [helpers.random_tree(20, max_depth=6, seed=s) for s in range(3)]


def test_tree_index_is_the_native_one():
    from hss_kernels import native
    for tree in _trees():
        got = tables.tree_index(tree, "cpu")
        assert got.dtype == torch.int32 and got.is_contiguous()
        assert torch.equal(got, native.tree_index(tree, "cpu")), tree


def test_decode_path_is_the_native_one():
    native_decode = pytest.importorskip("hss_kernels.native_decode")
    for tree in _trees():
        for leaf_logits in (False, True):
            got = tables.decode_path(tree, "cpu", leaf_logits)
            assert got.dtype == torch.int32 and got.is_contiguous()
            assert torch.equal(got, native_decode._path_table(tree, "cpu", leaf_logits)), tree


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
