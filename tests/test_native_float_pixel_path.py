"""The CUDA kernels' float arithmetic, checked on the CPU.

On a GPU, float32/float16/bfloat16 logits go through hss_math.h's (and decode_math.h's) per-pixel
functions instantiated for float; on the CPU those dtypes normally take vectorised row passes instead,
and only float64 runs the per-pixel code. ``HSS_CPU_PIXEL_PATH=1`` sends the CPU's float inputs through
the per-pixel functions in float, so that this arithmetic meets the reference before any GPU does:
every loss, real and random trees, ties, large logits (groups far below the max), channels_last,
every reduction with a stride-0 grad_output, labels outside the tree, and decode.
"""
import random

import pytest
import torch

import hss_kernels
from hss_kernels import Tree, reference, trees

native = pytest.importorskip("hss_kernels.native")
if native.unavailable_reason("cpu") is not None:
    pytest.skip(native.unavailable_reason("cpu"), allow_module_level=True)

LOSSES = ("hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss")
TOL = {torch.float32: dict(rtol=2e-5, atol=2e-6), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-4),
       torch.float16: dict(rtol=2e-3, atol=2e-5)}


@pytest.fixture(autouse=True)
def pixel_path(monkeypatch):
    monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")


def _random_tree():
    rng = random.Random(int(torch.randint(0, 2**31, ())))
    while True:
        V = rng.randint(4, 24)
        tree = Tree.from_parents([-1] + [rng.randrange(-1, i) for i in range(1, V)])
        if tree.depth <= 6:
            return tree


def _inputs(tree, loss, shape=(2, 5, 14), dtype=torch.float32, std=3.0, ties=False):
    C = tree.num_leaves if loss == "hierarchical_softmax_loss" else tree.num_nodes
    N, H, W = shape
    if ties:
        x = torch.randint(-2, 3, (N, C, H, W)).to(dtype)
    else:
        x = (torch.randn(N, C, H, W, dtype=torch.float64) * std).to(dtype)
    y = torch.randint(0, tree.num_leaves, shape)
    y[torch.rand(shape) < 0.15] = 255
    y.view(-1)[:2] = torch.tensor([0, tree.num_leaves - 1])
    return x, y


def _run(fn, x, y, tree, go=None, **kw):
    a = x.detach().clone().requires_grad_(True)
    out = fn(a, y, tree, **kw)
    go = torch.randn(out.shape, dtype=out.dtype) if go is None else go
    (g,) = torch.autograd.grad(out, a, go)
    return out.detach(), g, go


def _check(loss, x, y, tree, go=None, tol=None, **kw):
    out, g, go = _run(native.OPS[loss], x, y, tree, go, **kw)
    ref, gref, _ = _run(getattr(reference, loss), x, y, tree, go, **kw)
    tol = tol or TOL[x.dtype]
    assert out.dtype == ref.dtype and g.dtype == x.dtype and g.shape == x.shape
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(g.double(), gref.double(), rtol=tol["rtol"],
                               atol=tol["atol"] + tol["rtol"] * float(gref.abs().max()))
    return out, g


@pytest.mark.parametrize("loss", LOSSES)
def test_float_pixel_path_matches_reference(loss):
    # 140 pixels per image: full 64-pixel blocks read in place, a block across images, a partial one
    for tree in (trees.load("vistas_v2"), trees.load("helen"), _random_tree()):
        x, y = _inputs(tree, loss)
        opts = {} if loss == "hierarchical_softmax_loss" else dict(gamma=1.5, scale=5.0, normalize="node")
        _check(loss, x, y, tree, reduction="mean", **opts)
        _check(loss, x, y, tree, reduction="sum", **({"eps": 1e-4} if loss == "hierarchical_softmax_loss"
                                                     else dict(gamma=2.0, eps=1e-8)))
        go = torch.randn((), dtype=torch.float32).expand(y.shape)
        _check(loss, x.contiguous(memory_format=torch.channels_last), y, tree, go=go, reduction="none", **opts)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_on_the_pixel_path(loss, dtype):
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, loss, dtype=dtype)
    _check(loss, x, y, tree, reduction="none")


@pytest.mark.parametrize("loss", ["tree_min_loss", "tree_bce_loss"])
def test_ties_on_the_pixel_path(loss):
    for tree in (trees.load("helen"), _random_tree()):
        x, y = _inputs(tree, loss, ties=True)
        _check(loss, x, y, tree, reduction="sum", gamma=1.0)


def test_hierarchical_softmax_far_groups_on_the_pixel_path():
    tree = trees.load("vistas")
    x, y = _inputs(tree, "hierarchical_softmax_loss", std=40.0)
    for eps in (0.0, 1e-4):
        _check("hierarchical_softmax_loss", x, y, tree, reduction="none", eps=eps,
               tol=dict(rtol=2e-5, atol=2e-6 * 40))


@pytest.mark.parametrize("loss", LOSSES)
def test_bad_labels_on_the_pixel_path(loss):
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, loss)
    bad = torch.zeros(y.shape, dtype=torch.bool)
    bad.view(-1)[[5, 70, 139]] = True
    y[bad] = torch.tensor([-1, tree.num_leaves, 1000])
    out, g, _ = _run(native.OPS[loss], x, y, tree, reduction="none")
    assert torch.isnan(out[bad]).all() and not torch.isnan(out[~bad]).any()
    rows = g.permute(0, 2, 3, 1)
    assert torch.isnan(rows[bad]).all() and not torch.isnan(rows[~bad]).any()


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("score", ["sum", "mean"])
def test_decode_on_the_pixel_path(activation, score):
    for tree in (trees.load("vistas"), _random_tree()):
        x = torch.randn(2, tree.num_nodes, 5, 14) * 3
        ref = reference.decode(x.double(), tree, activation, score)
        out = hss_kernels.decode(x, tree, activation, score, backend="native")
        # float32 against float64: a rare near-tie may flip, nothing more
        assert (out != ref).float().mean() < 0.02
        assert torch.equal(out, native.OPS["decode"](x.contiguous(memory_format=torch.channels_last), tree,
                                                     activation, score))


@pytest.mark.parametrize("loss", LOSSES)
def test_the_switch_takes_effect(loss, monkeypatch):
    """Two float implementations: their gradients differ in the last bits somewhere (else the variable
    would be ignored and the tests above would check the row passes again)."""
    tree = trees.load("vistas")
    x, y = _inputs(tree, loss, shape=(2, 8, 16))
    _, g_pixel, go = _run(native.OPS[loss], x, y, tree, reduction="sum")
    monkeypatch.delenv("HSS_CPU_PIXEL_PATH")
    _, g_rows, _ = _run(native.OPS[loss], x, y, tree, go, reduction="sum")
    assert not torch.equal(g_pixel, g_rows)
