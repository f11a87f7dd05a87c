"""The native backward ops' fake kernels give the gradient the strides the real kernels give it (logits as
ops.h's dense_logits walks them): a sliced channels_last view is walked as a contiguous NCHW copy. With
a plain empty_like the fake said channels_last, and torch.compile's stride assertion failed."""
import pytest
import torch

from hss_kernels import trees

native = pytest.importorskip("hss_kernels.native")
if native.unavailable_reason("cpu") is not None:
    pytest.skip(native.unavailable_reason("cpu"), allow_module_level=True)


def _views(channels):
    base = torch.randn(2, channels, 6, 8)
    yield base  # NCHW
    yield base.contiguous(memory_format=torch.channels_last)  # dense channels_last
    yield base.contiguous(memory_format=torch.channels_last)[:, :, ::2, 1:]  # not dense
    yield base[:, :, 1:4, :7]  # not dense, NCHW-ordered


def test_hsoftmax_bwd_fake_strides():
    tree = trees.load("cityscapes")
    group, w = tree.tables().leaf_group, torch.rand(tree.depth)
    for x in _views(tree.num_leaves):
        y = torch.randint(0, tree.num_leaves, (x.shape[0],) + tuple(x.shape[2:]))
        _, stats, _ = torch.ops.hss_kernels.hsoftmax_fwd(x, y, group, w, 0.0, 255, True)
        torch.library.opcheck(torch.ops.hss_kernels.hsoftmax_bwd.default,
                              (torch.randn(y.shape), x, y, stats, group, w, 0.0, 255),
                              test_utils=("test_faketensor",))


def test_tree_loss_bwd_fake_strides():
    tree = trees.load("cityscapes")
    index, k = native.tree_index(tree, "cpu"), torch.rand(tree.num_nodes)
    for x in _views(tree.num_nodes):
        y = torch.randint(0, tree.num_leaves, (x.shape[0],) + tuple(x.shape[2:]))
        torch.library.opcheck(torch.ops.hss_kernels.tree_loss_bwd.default,
                              (torch.randn(y.shape), x, y, index, k, tree.num_leaves, tree.depth, 2.0, 0.0, 255,
                               True), test_utils=("test_faketensor",))
