"""torch.library.opcheck of the Triton backend's custom ops ``torch.ops.hss_triton.*`` (schema, fake
kernels, autograd registration), on every device: the fakes must give what the kernels give (shapes,
dtypes, strides) for NCHW, channels_last and non-dense logits, every reduction, the single pass and a
stride-0 grad_output; torch.compile relies on them."""
import pytest
import torch

from hss_kernels import tables, trees

import helpers as H

pytest.importorskip("hss_kernels.triton")
from hss_kernels.triton import decode as D, hierarchical_softmax as HS, tree_min as TM  # noqa: E402

FWD_UTILS = ("test_schema", "test_faketensor", "test_autograd_registration")
BWD_UTILS = ("test_schema", "test_faketensor")
MODES = [("mean", False), ("mean", True), ("sum", True), ("none", False)]


def _views(channels, device):
    base = torch.randn(2, channels, 6, 8).to(device)
    yield base
    yield base.contiguous(memory_format=torch.channels_last)
    yield base.contiguous(memory_format=torch.channels_last)[:, :, ::2, 1:]  # not dense


def _target(x, tree):
    y = torch.randint(0, tree.num_leaves, (x.shape[0],) + tuple(x.shape[2:]))
    y[0, 0] = 255
    return y.to(x.device)


def test_hierarchical_softmax_ops(backend, device):
    tree = trees.load("cityscapes")
    group, w = HS._tables(tree, None, torch.float32, device)
    for x in _views(tree.num_leaves, device):
        y = _target(x, tree)
        for reduction, single in MODES:
            args = (x, y, group, w, 0.0, 255, reduction, single)
            torch.library.opcheck(torch.ops.hss_triton.hierarchical_softmax_fwd.default, args, test_utils=FWD_UTILS)
            if not single:
                loss, stats, count, _, _ = torch.ops.hss_triton.hierarchical_softmax_fwd(*args)
                torch.library.opcheck(torch.ops.hss_triton.hierarchical_softmax_bwd.default,
                                      (torch.randn_like(loss), x, y, group, w, stats, count, 0.0, 255, reduction),
                                      test_utils=BWD_UTILS)


@pytest.mark.parametrize("case", ["mean", "none", "single_pass", "backward"])
def test_hierarchical_softmax_ops_with_options(backend, device, case):
    """Level weights and eps; the backward with a stride-0 grad_output (every utility of opcheck)."""
    tree = trees.load("pascal_person_part")
    x, y = H.inputs(tree, "hierarchical_softmax_loss", (2, 3, 5), device=device)
    leaf_group, level_w = HS._tables(tree, [1.0, 0.5, 2.0], torch.float32, x.device)
    if case == "backward":
        _, stats, count, _, _ = HS._hierarchical_softmax_fwd(x, y, leaf_group, level_w, 1e-4, 255, "none", False)
        go = torch.randn(1, 3, 1).to(device).expand(2, 3, 5)
        torch.library.opcheck(HS._hierarchical_softmax_bwd, (go, x, y, leaf_group, level_w, stats, count, 1e-4, 255, "none"))
        return
    x.requires_grad_(True)
    reduction = "none" if case == "none" else "mean"
    torch.library.opcheck(HS._hierarchical_softmax_fwd, (x, y, leaf_group, level_w, 0.0, 255, reduction, case == "single_pass"))


@pytest.mark.parametrize("extrema", [True, False])
def test_tree_min_ops(backend, device, extrema):
    tree = trees.load("cityscapes")
    tab, sizes = tables.tree_min_table(tree, device), tables.tree_min_sizes(tree)
    k = tables.node_weight_vector(tree, 1.0, "level", torch.float32, device)
    for x in _views(tree.num_nodes, device):
        y = _target(x, tree)
        for reduction, single in MODES:
            args = (x, y, tab, k, sizes, 2.0, 0.0, 255, reduction, extrema, single)
            torch.library.opcheck(torch.ops.hss_triton.tree_min_fwd.default, args, test_utils=FWD_UTILS)
            if not single:
                loss, count, _, _ = torch.ops.hss_triton.tree_min_fwd(*args)
                torch.library.opcheck(torch.ops.hss_triton.tree_min_bwd.default,
                                      (torch.randn_like(loss), x, y, tab, k, count, sizes, 2.0, 0.0, 255, reduction,
                                       extrema), test_utils=BWD_UTILS)


@pytest.mark.parametrize("case", ["min_mean", "bce_none", "min_single_pass", "min_backward"])
def test_tree_min_ops_with_options(backend, device, case):
    """Node weights with scale 5; the backward of a mean (every utility of opcheck)."""
    tree = trees.load("pascal_person_part")
    x, y = H.inputs(tree, "tree_min_loss", (2, 3, 5), device=device)
    tab = tables.tree_min_table(tree, x.device)
    k = tables.node_weight_vector(tree, 5.0, "level", torch.float32, x.device)
    if case == "min_backward":
        count = (y != 255).sum()
        torch.library.opcheck(TM._tree_min_bwd, (torch.tensor(0.5).to(device), x, y, tab, k, count, tables.tree_min_sizes(tree), 2.0,
                                             0.0, 255, "mean", True))
        return
    x.requires_grad_(True)
    reduction = "none" if case == "bce_none" else "mean"
    torch.library.opcheck(TM._tree_min_fwd, (x, y, tab, k, tables.tree_min_sizes(tree), 2.0, 0.0, 255, reduction,
                                         case != "bce_none", case == "min_single_pass"))


def test_decode_op(backend, device):
    tree = trees.load("helen")
    for C, leaf in ((tree.num_nodes, False), (tree.num_leaves, True)):
        x = torch.randn(2, C, 3, 5).to(device).contiguous(memory_format=torch.channels_last)
        x[0, 1, 2, 3] = float("nan")
        act = D._IDENTITY if leaf else 1
        for ignore_index, size, align_corners in ((255, [], False), (-1, [7, 9], True), (-1, [3, 5], False)):
            torch.library.opcheck(torch.ops.hss_triton.decode.default,
                                  (x, D._walk(tree, leaf), act, not leaf, ignore_index, size, align_corners))
