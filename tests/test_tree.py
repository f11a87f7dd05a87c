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
    ("a\n\tb\nc\n\tb\n", 4, "duplicate leaf name 'b' \\(first on line 2\\)"),
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
    ([-1, -1], ["x", "x"], "duplicate leaf names \\['x'\\]"),
])
def test_bad_parents(parents, names, match):
    with pytest.raises(ValueError, match=match):
        Tree.from_parents(parents, names)


def test_from_parents_keeps_channels():
    t = Tree.from_parents([-1, 0, 0, -1], names=["top", "x", "y", "z"])
    assert t.leaf_channels == [1, 2, 3] and t.leaf_names == ["x", "y", "z"]
    assert t.depth == 2 and t.nodes_per_depth == [2, 2]
    assert t.tables("cpu").leaf_ancestor.tolist() == [[0, 0, 3], [1, 2, 3]]


# ----------------------------------------------------------------------------- names, comments, level dicts
def test_internal_names_may_repeat_leaf_names_may_not():
    """A group may share its leaf's name (HSSN's Cityscapes 'sky') and groups may share names across levels;
    leaf names map label ids and stay unique, in every constructor."""
    t = Tree.from_text("sky\n\tsky\nanimal\n\tanimal\n\t\tbird\n\t\tdog\n")
    assert t.leaf_names == ["sky", "bird", "dog"] and t.class_names(1) == ["sky", "animal"]
    assert t.class_names(2) == ["sky", "animal"] and t.num_nodes == 6
    u = Tree.from_parents([-1, 0, -1, 2, 3, 3], names=["sky", "sky", "animal", "animal", "bird", "dog"])
    assert u.leaf_names == ["sky", "bird", "dog"]
    with pytest.raises(ValueError, match="<text>:5: duplicate leaf name 'bird' \\(first on line 3\\)"):
        Tree.from_text("a\n\tb\n\t\tbird\nc\n\tbird\n")


def test_comments_blank_lines_and_the_classes_line(tmp_path):
    text = "# a comment\n\nb\n\t# an indented comment\n\tb1\n\n\tb2\na\n#classes\ta\tb2\tb1\n"
    t = Tree.from_text(text)
    assert t.leaf_names == ["a", "b2", "b1"] and t.num_nodes == 4
    assert Tree.from_text(text, classes=["b1", "b2", "a"]).leaf_names == ["b1", "b2", "a"]  # the argument wins
    with pytest.raises(ValueError, match="<text>:3: a second #classes line"):
        Tree.from_text("a\n#classes\ta\n#classes\ta\n")
    with pytest.raises(ValueError, match="'zz'.* not in the tree"):
        Tree.from_text("a\n#classes\tzz\n")


@pytest.mark.parametrize("name", trees.names())
def test_to_text_loads_back_to_the_same_tree(name, tmp_path):
    t = trees.load(name)
    p = tmp_path / "t.txt"
    p.write_text(t.to_text())
    u = Tree.from_file(p)
    assert (u.names, u.parents, u.leaf_channels, u.leaf_names) == (t.names, t.parents, t.leaf_channels, t.leaf_names)


def test_to_text_of_a_random_tree_keeps_structure_and_labels():
    t = helpers.random_tree()
    u = Tree.from_text(t.to_text())
    assert u.leaf_names == t.leaf_names and u.depth == t.depth
    for d in range(1, t.depth + 1):
        assert u.tables("cpu").leaf_group[d - 1].tolist() == t.tables("cpu").leaf_group[d - 1].tolist()


def _anchor(name):
    return json.loads((ANCHORS / name).read_text())


def _same_grouping(t, s):
    """Same leaves, the same classes at every depth, with the same names up to the shipped trees' spelling
    (their ' (group)' suffixes, needed while names had to be unique, and '-' for the code's '_'; trees/README.md)."""
    def spelled(n):
        return n.replace(" (group)", "").rstrip("_").replace("_", "-")

    assert t.leaf_names == s.leaf_names and t.depth == s.depth and t.num_nodes == s.num_nodes
    for d in range(1, t.depth + 1):
        assert t.tables("cpu").leaf_group[d - 1].tolist() == s.tables("cpu").leaf_group[d - 1].tolist()
        assert [spelled(n) for n in s.class_names(d)] == [spelled(n) for n in t.class_names(d)]


@needs_anchors
def test_from_levels_hssn_cityscapes():
    """HSSN's level dict, as its code writes it ([start, end) ranges of train ids), groups the leaves as the
    shipped tree does; its group 'sky' holds the leaf 'sky'."""
    ref = _anchor("hssn_cityscapes_hierarchy.json")
    t = Tree.from_levels([ref["hiera"]["hiera_high"]], ref["leaf_names_trainId_order"])
    _same_grouping(t, trees.load("cityscapes"))
    assert t.class_names(1)[4] == "sky" and t.leaf_names[10] == "sky"


@needs_anchors
def test_from_levels_logicseg_vistas_v2():
    ref = _anchor("logicseg_mapillary_v2_hierarchy.json")
    levels = [ref["hiera"]["hiera_high"], ref["hiera"]["hiera_middle"]]
    t = Tree.from_levels(levels, ref["leaf_names"][:123])
    _same_grouping(t, trees.load("vistas_v2"))
    with pytest.raises(ValueError, match="leaves 123 \\('Unlabeled'\\) are in no group of level 1"):
        Tree.from_levels(levels, ref["leaf_names"])


def test_from_levels_forms():
    pairs = Tree.from_levels([{"a": [0, 2], "b": [2, 5]}, {"a1": [0, 1], "b1": [2, 4]}])
    lists = Tree.from_levels([{"a": [0, 1], "b": [2, 3, 4]}, {"a1": [0], "b1": [2, 3]}], ranges=False)
    rng = Tree.from_levels([{"a": range(2), "b": range(2, 5)}, {"a1": range(1), "b1": range(2, 4)}],
                           leaf_names=list("vwxyz"))
    for t in (pairs, lists, rng):
        assert t.num_leaves == 5 and t.depth == 3 and t.num_nodes == 9
        assert t.depths[:5] == [3, 2, 3, 3, 2]  # leaves 1 and 4 hang under their level-1 group
        assert t.class_names(1) == ["a", "b"]
    assert rng.leaf_names == list("vwxyz") and pairs.leaf_names[0] == "class0"


@pytest.mark.parametrize("levels, kw, match", [
    ({"a": [0, 2]}, {}, "a list of dicts"),
    ([], {}, "no levels"),
    ([{}], {}, "level 1 must be a non-empty dict"),
    ([{"a": [2, 2]}], {}, r"level 1, group 'a': \[2, 2\] is not a \[start, end\) pair"),
    ([{"a": [0, 1, 2]}], {}, "not a \\[start, end\\) pair"),
    ([{"a": [0, 2], "b": [1, 3]}], {}, "level 1: leaf 1 \\('class1'\\) is in groups 'a' and 'b'"),
    ([{"a": [0, 2], "b": [2, 4]}, {"c": [1, 3]}], {}, "level 2, group 'c' is not inside one group of level 1"),
    ([{"a": [0, 2]}], {"leaf_names": ["x"]}, "label id 1 but leaf_names has 1 names"),
    ([{"a": [0, 1]}], {"leaf_names": ["x", "y"]}, "leaves 1 \\('y'\\) are in no group of level 1"),
    ([{"a": [-1, 1]}], {}, "label ids >= 0"),
    ([{"a\tb": [0, 1]}], {}, "without tabs"),
])
def test_from_levels_errors(levels, kw, match):
    with pytest.raises((ValueError, TypeError), match=match):
        Tree.from_levels(levels, **kw)
