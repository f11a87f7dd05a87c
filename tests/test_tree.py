"""Tree parsing, validation, channel layout and index tables."""
import json
from pathlib import Path

import pytest
import torch

from hss_kernels import Tree, trees

import helpers

ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "anchors" / "trees"
needs_anchors = pytest.mark.skipif(not ANCHORS.is_dir(), reason="shared/anchors/trees is not beside the checkout")

SMALL = "a\n\ta1\n\ta2\nb\n\tb1\n\t\tb11\n\t\tb12\n\tb2\nc\n"


def test_small_tree_layout():
    t = Tree.from_text(SMALL)
    assert t.leaf_names == ["a1", "a2", "b11", "b12", "b2", "c"]  # file order
    assert t.num_leaves == 6 and t.num_nodes == 9 and t.depth == 3
    # leaves first by label, then internal nodes deepest first: b1 (depth 2), then a, b (depth 1)
    assert t.names[6:] == ["b1", "a", "b"]
    assert t.parents[t.names.index("b11")] == t.names.index("b1")
    assert t.nodes_per_depth == [3, 4, 2]
    assert t.class_names(1) == ["a", "b", "c"]
    assert t.class_names(2) == ["a1", "a2", "b1", "b2", "c"]
    assert t.class_names(3) == t.leaf_names
    assert "b11" in str(t) and "label 2" in str(t)


def test_classes_reorders_labels():
    t = Tree.from_text(SMALL, classes=["c", "b2", "a1", "a2", "b12", "b11"])
    assert t.leaf_names == ["c", "b2", "a1", "a2", "b12", "b11"]
    assert t.leaf_channels == list(range(6))
    # depth-1 classes are numbered by the smallest leaf label under them
    assert t.class_names(1) == ["c", "b", "a"]


def test_to_text_round_trip():
    t = trees.load("helen")
    u = Tree.from_text(t.to_text(), classes=t.leaf_names)
    assert u.names == t.names and u.parents == t.parents and u.depths == t.depths


@pytest.mark.parametrize("seed", range(5))
def test_tables_are_consistent(seed):
    t = helpers.random_tree(12 + seed * 5, max_depth=40, seed=seed)
    tab = t.tables("cpu")
    V, L, D = t.num_nodes, t.num_leaves, t.depth

    def ancestors(c):
        out = [c]
        while t.parents[out[-1]] >= 0:
            out.append(t.parents[out[-1]])
        return set(out)

    for c in range(V):
        s, p = int(tab.subtree_size[c]), int(tab.dfs_pos[c])
        run = set(tab.dfs_order[p:p + s].tolist())
        assert run == {u for u in range(V) if c in ancestors(u)}  # desc-or-self is one contiguous run
    for l in range(L):
        leaf = int(tab.leaf_channel[l])
        anc = ancestors(leaf)
        assert set(torch.nonzero(tab.path[:, l]).flatten().tolist()) == anc
        assert {int(v) for v in tab.path_nodes[l] if v >= 0} == anc
        for d in range(1, D + 1):
            a = int(tab.leaf_ancestor[d - 1, l])
            assert a in anc and (t.depths[a] == d or (a == leaf and t.depths[leaf] < d))
            same = {k for k in range(L) if int(tab.leaf_ancestor[d - 1, k]) == a}
            assert same == {k for k in range(L) if int(tab.leaf_group[d - 1, k]) == int(tab.leaf_group[d - 1, l])}
    assert tab.leaf_group[D - 1].tolist() == list(range(L))  # the deepest classes are the leaves
    assert tab.nodes_per_depth.tolist() == [t.depths.count(d) for d in range(1, D + 1)]
    assert t.tables("cpu") is tab  # cached


def test_shipped_trees():
    sizes = {"vistas": (66, 3), "vistas_v2": (123, 3), "cityscapes": (19, 2),
             "pascal_person_part": (7, 3), "lip": (20, 3), "helen": (11, 4)}
    assert set(trees.names()) == set(sizes)
    for name, (L, D) in sizes.items():
        t = trees.load(name)
        assert (t.num_leaves, t.depth) == (L, D), name
    assert trees.load("vistas_v2").num_nodes == 147
    assert trees.load("cityscapes").num_nodes == 26
    with pytest.raises(ValueError, match="unknown tree"):
        trees.load("nope")


@needs_anchors
def test_hssn_layouts_match_the_papers_code():
    for name, file in [("pascal_person_part", "hssn_pascal_person_part_hierarchy.json"),
                       ("lip", "hssn_lip_hierarchy.json")]:
        ref = json.loads((ANCHORS / file).read_text())
        assert trees.load(name).parents == ref["node_parent"], name
    ref = json.loads((ANCHORS / "hssn_cityscapes_hierarchy.json").read_text())
    t = trees.load("cityscapes")
    assert t.leaf_names == ref["leaf_names_trainId_order"]
    groups = list(ref["hiera"]["hiera_high"])
    for leaf, g in enumerate(ref["hiera_map"]):
        assert t.parents[leaf] == 19 + g  # superclasses are channels 19..25 in hiera_high order
    assert [t.names[19 + i].replace(" (group)", "") for i in range(7)] == groups


@needs_anchors
def test_muller_label_orders():
    ref = json.loads((ANCHORS / "muller_class_lookup.json").read_text())
    for name, key, file in [("helen", "helen_class_lookup", "faces_tree.txt"),
                            ("vistas", "vistas_class_lookup", "mapillary_tree.txt")]:
        t = trees.load(name)
        dfs_leaves = [c for c in t.dfs_order if t.is_leaf(c)]
        # Muller: leaf k in depth-first file order gets data label class_lookup[k]
        assert [t.channel_labels[c] for c in dfs_leaves] == ref[key]
        assert Tree.from_file(ANCHORS / file).num_leaves == t.num_leaves


@needs_anchors
def test_vistas_v2_groups_match_logicseg():
    ref = json.loads((ANCHORS / "logicseg_mapillary_v2_hierarchy.json").read_text())
    t = trees.load("vistas_v2")
    assert t.leaf_names == ref["leaf_names"][:123]
    for depth, key in [(1, "hiera_high"), (2, "hiera_middle")]:
        g = t.tables("cpu").leaf_group[depth - 1].tolist()
        for i, (a, b) in enumerate(ref["hiera"][key].values()):
            assert g[a:b] == [i] * (b - a)


# ----------------------------------------------------------------------------- bad files
@pytest.mark.parametrize("text, line, match", [
    ("a\n\t\tb\n", 2, "indented 2 tab"),
    ("\ta\n", 1, "first node"),
    ("a\n \tb\n", 2, "spaces in the indentation"),
    ("a\n\t b\n", 2, "spaces in the indentation"),
    ("a\n    b\n", 2, "spaces in the indentation"),
    ("a\n\tb\nc\n\tb\n", 4, "duplicate name 'b' \\(first on line 2\\)"),
    ("a\n\t\n\tb\n", 2, "empty name"),
])
def test_bad_tree_text_names_the_line(text, line, match):
    with pytest.raises(ValueError, match=f"<text>:{line}: .*{match}"):
        Tree.from_text(text)


def test_empty_file(tmp_path):
    p = tmp_path / "empty.txt"
    p.write_text("\n\n")
    with pytest.raises(ValueError, match="empty tree file"):
        Tree.from_file(p)


def test_file_errors_name_the_path(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_text("a\n\t\tb\n")
    with pytest.raises(ValueError, match=r"bad.txt:2:"):
        Tree.from_file(p)


@pytest.mark.parametrize("classes, match", [
    (["a1", "a2", "b11", "b12", "b2"], r"missing leaves 'c' \(line 9\)"),
    (["a1", "a2", "b11", "b12", "b2", "c", "zz"], "'zz'.* not in the tree"),
    (["a1", "a2", "b11", "b12", "b2", "b"], "internal nodes"),
    (["a1", "a1", "b11", "b12", "b2", "c"], "twice"),
])
def test_bad_classes(classes, match):
    with pytest.raises(ValueError, match=match):
        Tree.from_text(SMALL, classes=classes)


@pytest.mark.parametrize("parents, names, match", [
    ([1, 0], None, "cycle"),
    ([-1, 2, 1], None, "cycle"),
    ([-1, 5], None, "out of range"),
    ([-1, -2], None, "out of range"),
    ([0], None, "own parent"),
    ([], None, "empty"),
    ([-1, 0], ["x"], "2 nodes"),
    ([-1, 0], ["x", "x"], "duplicate"),
])
def test_bad_parents(parents, names, match):
    with pytest.raises(ValueError, match=match):
        Tree.from_parents(parents, names)


def test_from_parents_keeps_channels():
    t = Tree.from_parents([-1, 0, 0, -1], names=["top", "x", "y", "z"])
    assert t.leaf_channels == [1, 2, 3] and t.leaf_names == ["x", "y", "z"]
    assert t.depth == 2 and t.nodes_per_depth == [2, 2]
    assert t.tables("cpu").leaf_ancestor.tolist() == [[0, 0, 3], [1, 2, 3]]
