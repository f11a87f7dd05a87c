"""The CUDA kernels' float arithmetic, checked on the CPU.

On a GPU, float32/float16/bfloat16 logits go through the per-pixel functions of csrc/include/*_math.h
instantiated for float; on the CPU those dtypes normally take vectorised row passes instead,
and only float64 runs the per-pixel code. ``HSS_CPU_PIXEL_PATH=1`` sends the CPU's float inputs through
the per-pixel functions in float, so that this arithmetic meets the reference before any GPU does:
every loss, real and random trees, ties, large logits (groups far below the max), channels_last,
every reduction with a stride-0 grad_output, labels outside the tree, and decode. (The CPU's own: the
switch does nothing on CUDA tensors.)
"""
import pytest
import torch

import hss_kernels
from hss_kernels import native, trees

import helpers as H
from helpers import inputs

pytestmark = pytest.mark.parametrize("device", ["cpu"])
LOSSES = pytest.mark.parametrize("loss", H.LOSSES)


@pytest.fixture(autouse=True)
def pixel_path(monkeypatch):
    monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")


def _check(loss, x, y, tree, **kw):
    return H.check(loss, "native", x, y, tree, **kw)


@LOSSES
def test_float_pixel_path_matches_reference(backend, device, loss):
    # 140 pixels per image: full 64-pixel blocks read in place, a block across images, a partial one
    for tree in (trees.load("vistas_v2"), trees.load("helen"), H.random_tree(min_nodes=4, max_depth=6)):
        x, y = inputs(tree, loss, (2, 5, 14), ignore_frac=0.15)
        opts = {} if loss == "hierarchical_softmax_loss" else dict(gamma=1.5, scale=5.0, normalize="node")
        _check(loss, x, y, tree, reduction="mean", **opts)
        _check(loss, x, y, tree, reduction="sum", **({"eps": 1e-4} if loss == "hierarchical_softmax_loss"
                                                     else dict(gamma=2.0, eps=1e-8)))
        go = torch.randn((), dtype=torch.float32).expand(y.shape)
        _check(loss, x.contiguous(memory_format=torch.channels_last), y, tree, grad_out=go, reduction="none", **opts)


@LOSSES
@pytest.mark.parametrize("dtype", H.HALF)
def test_half_inputs_on_the_pixel_path(backend, device, loss, dtype):
    tree = trees.load("cityscapes")
    x, y = inputs(tree, loss, (2, 5, 14), dtype, ignore_frac=0.15)
    _check(loss, x, y, tree, reduction="none")


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_ties_on_the_pixel_path(backend, device, loss):
    # the last: as deep as the kernels allow (kMaxDepth = 8), every per-depth slot in use
    for tree in (trees.load("helen"), H.random_tree(min_nodes=4, max_depth=6),
                 H.random_tree(min_nodes=14, max_nodes=30, min_depth=8, max_depth=8, seed=3)):
        x, y = inputs(tree, loss, (2, 5, 14), ties=True, ignore_frac=0.15)
        _check(loss, x, y, tree, reduction="sum", gamma=1.0)


def test_hierarchical_softmax_far_groups_on_the_pixel_path(backend, device):
    tree = trees.load("vistas")
    x, y = inputs(tree, "hierarchical_softmax_loss", (2, 5, 14), std=40.0, ignore_frac=0.15)
    for eps in (0.0, 1e-4):
        _check("hierarchical_softmax_loss", x, y, tree, reduction="none", eps=eps)


@LOSSES
def test_bad_labels_on_the_pixel_path(backend, device, loss):
    tree = trees.load("cityscapes")
    x, y = inputs(tree, loss, (2, 5, 14), ignore_frac=0.15)
    bad = torch.zeros(y.shape, dtype=torch.bool)
    bad.view(-1)[[5, 70, 139]] = True
    y[bad] = torch.tensor([-1, tree.num_leaves, 1000])
    out, g, _ = H.loss_and_grad(native.OPS[loss], x, y, tree, reduction="none")
    assert torch.isnan(out[bad]).all() and not torch.isnan(out[~bad]).any()
    rows = g.permute(0, 2, 3, 1)
    assert torch.isnan(rows[bad]).all() and not torch.isnan(rows[~bad]).any()


@pytest.mark.parametrize("activation", H.ACTIVATIONS)
@pytest.mark.parametrize("score", H.SCORES)
def test_decode_on_the_pixel_path(backend, device, activation, score):
    for tree in (trees.load("vistas"), H.random_tree(min_nodes=4, max_depth=6)):
        x = torch.randn(2, tree.num_nodes, 5, 14) * 3
        out = hss_kernels.decode(x, tree, activation, score, backend="native")
        H.assert_decodes_like_reference(out, x, tree, activation, score)
        assert torch.equal(out, native.OPS["decode"](x.contiguous(memory_format=torch.channels_last), tree,
                                                     activation, score))


@LOSSES
def test_the_switch_takes_effect(backend, device, loss, monkeypatch):
    """A property only one path has: the row passes' exp (cpu/vmath.h's vexp) clamps its argument at -87,
    so a logit 200 below the others gets a gradient of about 1e-38 (never exactly 0), while the per-pixel
    code's exp underflows to 0, as the reference's does. So with the switch on, that channel's gradient
    is exactly 0 (the reference's), and with it off it is not: the tests above do run the per-pixel code."""
    tree = trees.load("vistas")
    x, y = inputs(tree, loss, (2, 8, 16), ignore_frac=0.0)
    far = 5  # a leaf channel (label 5) no pixel is labelled with
    x[:, far] = -200.0
    y[y == 5] = 6
    kw = {} if loss == "hierarchical_softmax_loss" else {"gamma": 0.0}
    _, g_pixel, go = H.loss_and_grad(native.OPS[loss], x, y, tree, reduction="sum", **kw)
    _, g_ref, _ = H.loss_and_grad(H.ref(loss), x, y, tree, go, reduction="sum", **kw)
    assert torch.equal(g_ref[:, far], torch.zeros_like(g_ref[:, far]))
    assert torch.equal(g_pixel[:, far], g_ref[:, far])
    monkeypatch.delenv("HSS_CPU_PIXEL_PATH")
    _, g_rows, _ = H.loss_and_grad(native.OPS[loss], x, y, tree, go, reduction="sum", **kw)
    assert (g_rows[:, far] != 0).all()
