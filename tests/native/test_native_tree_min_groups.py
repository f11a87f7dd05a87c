"""The CUDA tree-min backward's per-thread body (``tree_min_backward_group``), checked on the CPU.

Without upsampling, the CUDA tree-min backward gives each thread G = 16 / element-size consecutive pixels
(float32 4, bfloat16/float16 8, float64 2): one bottom-up pass over the nodes (maxima per depth, two bits per
node and lane, 16 nodes to a 32-bit word), one top-down pass (owed weights, the off-path gradients of the G
lanes, one store per channel) and a walk down each lane's path. ``HSS_CPU_PIXEL_PATH=1`` runs the same
function on the CPU for every dtype, grouped as the kernel groups the pixels (float64 always runs it). What
these tests aim at: the node bits across several words and a partial last word (147 nodes; random trees of
17 to 40 nodes), the deepest trees (depth 8), ties in the maxima and the minima (logits -1, 0, 1), paths with
several new minima, last groups shorter than G, layouts the kernel reads lane by lane (channels_last, a
strided view, a misaligned one), one pixel, no labelled pixel, every focal mode and an upstream gradient that
is not dense.
"""
import pytest
import torch

from hss_kernels import native, trees

import helpers as H
from helpers import inputs

pytestmark = pytest.mark.parametrize("device", ["cpu"])
LOSS = "tree_min_loss"
MODES = pytest.mark.parametrize("opts", [dict(gamma=2.0), dict(gamma=0.0), dict(gamma=1.5), dict(gamma=2.0, eps=1e-6)],
                                ids=["g2", "g0", "g1.5", "eps"])
# (N, H, W): one pixel; 21 pixels (the last group partial for every G); 65 per image (a block boundary)
SHAPES = [(1, 1, 1), (1, 3, 7), (2, 5, 13)]


@pytest.fixture(params=["default", "pixel"])
def path(request, monkeypatch):
    if request.param == "pixel":
        monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")
    else:
        monkeypatch.delenv("HSS_CPU_PIXEL_PATH", raising=False)
    return request.param


def _dtypes(path):
    """The dtypes that run tree_min_backward_group on this path."""
    return H.DTYPES if path == "pixel" else (torch.float64,)


def _trees():
    # 147 nodes (10 words of bits, the last partial), depth 8 chains, 17 nodes (a second word of one node)
    return [trees.load("vistas_v2"), H.random_tree(min_nodes=20, max_nodes=40, min_depth=8, max_depth=8, seed=3),
            H.random_tree(17, max_depth=8, seed=11), H.random_tree(2, seed=5)]


def _layouts(x):
    """NCHW, channels_last, a strided view and a misaligned copy (storage offset of one element)."""
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    N, C, Hh, W = x.shape
    big = torch.zeros(N, C, Hh + 1, 2 * W, dtype=x.dtype)
    big[:, :, 1:, ::2] = x
    yield "strided", big[:, :, 1:, ::2]
    flat = torch.zeros(x.numel() + 1, dtype=x.dtype)
    flat[1:] = x.reshape(-1)
    yield "misaligned", flat[1:].view(x.shape)


@MODES
@pytest.mark.parametrize("shape", SHAPES)
def test_groups_match_reference(backend, device, opts, shape, path):
    for tree in _trees():
        for dtype in _dtypes(path):
            x, y = inputs(tree, LOSS, shape, dtype, ignore_frac=0.25)
            for name, xv in _layouts(x):
                assert torch.equal(xv, x), name
                H.check(LOSS, "native", xv, y, tree, reduction="mean", **opts)
            for go in H.grad_outs(shape, transposed=shape[1] > 1):
                H.check(LOSS, "native", x, y, tree, grad_out=go, reduction="none", **opts)


@pytest.mark.parametrize("kind", ["ties", "far", "descending"])
def test_groups_ties_and_new_minima(backend, device, kind, path):
    """Ties everywhere (logits -1, 0, 1: the earliest node in pre-order keeps a maximum, the shallower a
    minimum), far logits, and logits falling with depth, so that every node of a path sets a new minimum."""
    tree = trees.load("vistas_v2")
    for dtype in _dtypes(path):
        if kind == "ties":
            x, y = inputs(tree, LOSS, (2, 3, 7), dtype, ties=True)
        elif kind == "far":
            x, y = inputs(tree, LOSS, (2, 3, 7), dtype, std=40.0)
        else:
            x, y = inputs(tree, LOSS, (2, 3, 7), dtype)
            depth = torch.tensor(tree.depths, dtype=torch.float64)
            x = (x.double() - 4.0 * depth.view(1, -1, 1, 1)).to(dtype)
        for opts in (dict(gamma=2.0), dict(gamma=1.5, eps=1e-4)):
            H.check(LOSS, "native", x, y, tree, reduction="sum", **opts)


def test_groups_no_labelled_pixel_and_one_labelled_lane(backend, device, path):
    """Every pixel ignored: a zero gradient; one labelled pixel in a group of ignored and bad ones: its row is
    the reference's, the ignored rows 0, the bad rows NaN."""
    tree = trees.load("vistas_v2")
    for dtype in _dtypes(path):
        x, y = inputs(tree, LOSS, (1, 3, 7), dtype, ignore_frac=0.0)
        fn = native.OPS[LOSS]
        _, grad, _ = H.loss_and_grad(fn, x, y.clone().fill_(255), tree, reduction="sum")
        assert (grad == 0).all()
        y1 = y.clone().fill_(255)
        y1.view(-1)[5] = y.view(-1)[5]
        y1.view(-1)[6] = tree.num_leaves  # a bad label in the same group
        _, grad, go = H.loss_and_grad(fn, x, y1, tree, reduction="none")
        rows = grad.permute(0, 2, 3, 1).reshape(21, -1)
        assert torch.isnan(rows[6]).all()
        keep = torch.ones(21, dtype=torch.bool)
        keep[6] = False
        assert (rows[keep][torch.arange(21)[keep] != 5] == 0).all()
        y2 = y1.clone()
        y2.view(-1)[6] = 255
        _, gref, _ = H.loss_and_grad(H.ref(LOSS), x.double(), y2, tree, go.double(), reduction="none")
        gref = gref.permute(0, 2, 3, 1).reshape(21, -1)
        H.assert_grad_close(rows[5], gref[5].to(rows.dtype), dtype, float(go.abs().max()))


@MODES
def test_groups_gradcheck(backend, device, opts, path):
    if path != "default":
        pytest.skip("float64 takes the groups on either path")
    for seed in (7, 8):
        tree = H.random_tree(min_nodes=17, max_nodes=24, max_depth=8, seed=seed)
        x, y = inputs(tree, LOSS, (1, 1, 5), torch.float64, ignore_frac=0.2)
        fn = native.OPS[LOSS]
        assert torch.autograd.gradcheck(lambda a: fn(a, y, tree, reduction="sum", **opts), (x.requires_grad_(True),))
