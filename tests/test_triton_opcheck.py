"""torch.library.opcheck of the Triton backend's custom ops (schema, fake kernels, autograd registration):
the fakes must give what the kernels give (shapes, dtypes, strides) for NCHW, channels_last and non-dense
logits, every reduction and the single pass; torch.compile relies on them."""
import pytest
import torch

from hss_kernels import trees
from hss_kernels.reference import node_weight_vector

pytest.importorskip("hss_kernels.triton")
from hss_kernels.triton import hierarchical_softmax as H, tree_min as TM  # noqa: E402

FWD_UTILS = ("test_schema", "test_faketensor", "test_autograd_registration")
BWD_UTILS = ("test_schema", "test_faketensor")
MODES = [("mean", False), ("mean", True), ("sum", True), ("none", False)]


def _views(channels):
    base = torch.randn(2, channels, 6, 8)
    yield base
    yield base.contiguous(memory_format=torch.channels_last)
    yield base.contiguous(memory_format=torch.channels_last)[:, :, ::2, 1:]  # not dense


def _target(x, tree):
    y = torch.randint(0, tree.num_leaves, (x.shape[0],) + tuple(x.shape[2:]))
    y[0, 0] = 255
    return y


def test_hsm_ops():
    tree = trees.load("cityscapes")
    group, w = H._tables(tree, None, torch.float32, "cpu")
    for x in _views(tree.num_leaves):
        y = _target(x, tree)
        for reduction, single in MODES:
            args = (x, y, group, w, 0.0, 255, reduction, single)
            torch.library.opcheck(torch.ops.hss_triton.hsm_fwd.default, args, test_utils=FWD_UTILS)
            if not single:
                loss, stats, count, _ = torch.ops.hss_triton.hsm_fwd(*args)
                torch.library.opcheck(torch.ops.hss_triton.hsm_bwd.default,
                                      (torch.randn_like(loss), x, y, group, w, stats, count, 0.0, 255, reduction),
                                      test_utils=BWD_UTILS)


@pytest.mark.parametrize("extrema", [True, False])
def test_tree_ops(extrema):
    tree = trees.load("cityscapes")
    tab, sizes = TM._build_table(tree, "cpu"), TM.sizes_of(tree)
    k = node_weight_vector(tree, 1.0, "level", torch.float32, "cpu")
    for x in _views(tree.num_nodes):
        y = _target(x, tree)
        for reduction, single in MODES:
            args = (x, y, tab, k, sizes, 2.0, 0.0, 255, reduction, extrema, single)
            torch.library.opcheck(torch.ops.hss_triton.tree_fwd.default, args, test_utils=FWD_UTILS)
            if not single:
                loss, count, _ = torch.ops.hss_triton.tree_fwd(*args)
                torch.library.opcheck(torch.ops.hss_triton.tree_bwd.default,
                                      (torch.randn_like(loss), x, y, tab, k, count, sizes, 2.0, 0.0, 255, reduction,
                                       extrema), test_utils=BWD_UTILS)
