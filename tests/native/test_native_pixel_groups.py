"""The CUDA tree-min / tree BCE forward's per-thread body, checked on the CPU.

Without upsampling, the CUDA forward gives each thread G = 16 / element-size consecutive pixels (float32 4,
bfloat16/float16 8, float64 2) and runs ``tree_forward_group`` of csrc/include/tree_min_math.h on them, with
the focal term compiled for the call's options (``focal_k``: gamma 2 or 0 with eps 0, else any gamma/eps).
The CPU runs the same function, grouped the same way, for float64 and, with ``HSS_CPU_PIXEL_PATH=1``, for
every dtype. These tests hit what a group can get wrong: a last group that is partial (sizes that are not
multiples of G), groups whose lanes mix valid, ignored and bad labels, one pixel, no labelled pixel, a NaN
logit in one lane, each focal mode, channels_last (the CUDA kernel's per-lane loads) and the gradients of
the same modes (``tree_backward_pixel<A, kF>``; the tree BCE's ``tree_bce_backward_group``, G pixels a
thread like the forward).
"""
import pytest
import torch

import hss_kernels
from hss_kernels import native, trees

import helpers as H
from helpers import inputs

pytestmark = pytest.mark.parametrize("device", ["cpu"])

# gamma / eps of each focal mode: kFocalG2, kFocalG0, kFocalAny (gamma), kFocalAny (eps)
MODES = pytest.mark.parametrize("opts", [dict(gamma=2.0), dict(gamma=0.0), dict(gamma=1.5), dict(gamma=2.0, eps=1e-6)],
                                ids=["g2", "g0", "g1.5", "eps"])
# pixel counts: 21 = 2 * 8 + 5 = 5 * 4 + 1 = 10 * 2 + 1, partial groups for every G; 67 crosses a 64-pixel block
SHAPES = pytest.mark.parametrize("shape", [(1, 3, 7), (1, 1, 1), (1, 1, 67), (3, 1, 7)])


@pytest.fixture
def path(cpu_path):
    """conftest.cpu_path: the CPU's own paths or HSS_CPU_PIXEL_PATH=1."""
    return cpu_path


def _dtypes(path):
    return H.DTYPES if path == "pixel" else (torch.float64,)


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
@MODES
@SHAPES
def test_groups_match_reference(backend, device, loss, opts, shape, path):
    tree = trees.load("vistas_v2") if shape[2] == 7 else H.random_tree(min_nodes=4, max_depth=6, seed=shape[2])
    for dtype in _dtypes(path):
        for fmt in (torch.contiguous_format, torch.channels_last):
            x, y = inputs(tree, loss, shape, dtype, ignore_frac=0.3, memory_format=fmt)
            H.check(loss, "native", x, y, tree, reduction="none", **opts)
            H.check(loss, "native", x, y, tree, reduction="mean", **opts)


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
@MODES
def test_groups_lanes_mixed(backend, device, loss, opts, path):
    """In one group: valid, ignored and bad labels, a NaN logit in one lane and NaN logits at an ignored
    pixel: only the NaN lane's loss and gradient row are NaN, the bad labels' too, the ignored ones' 0, the
    others the reference's."""
    tree = trees.load("cityscapes")
    for dtype in _dtypes(path):
        x, y = inputs(tree, loss, (1, 3, 7), dtype, ignore_frac=0.0)
        y.view(-1)[[1, 9]] = 255
        y.view(-1)[[2, 19]] = torch.tensor([-1, tree.num_leaves])
        x[0, 3, 0, 3] = float("nan")  # pixel 3
        x[0, :, 0, 1] = float("nan")  # an ignored pixel's NaN logits: still 0
        fn = native.OPS[loss]
        out, grad, _ = H.loss_and_grad(fn, x, y, tree, reduction="none", **opts)
        flat = out.view(-1)
        nan = torch.zeros(21, dtype=torch.bool)
        nan[[2, 3, 19]] = True
        assert torch.isnan(flat[nan]).all() and not torch.isnan(flat[~nan]).any()
        assert (flat[[1, 9]] == 0).all()
        rows = grad.permute(0, 2, 3, 1).reshape(21, -1)
        assert torch.isnan(rows[nan]).all() and not torch.isnan(rows[~nan]).any()
        assert (rows[[1, 9]] == 0).all()
        keep = ~nan
        keep[[1, 9]] = False
        ref = H.ref(loss)(x.double(), torch.where(nan.view(y.shape), 255, y), tree, reduction="none", **opts)
        _, gref, _ = H.loss_and_grad(H.ref(loss), x.double(), torch.where(nan.view(y.shape), 255, y), tree,
                                     torch.ones(y.shape, dtype=torch.float64), reduction="none", **opts)
        tol = H.TOL[H.acc_dtype(dtype)]
        torch.testing.assert_close(flat[keep].double(), ref.view(-1)[keep].double(), **tol)
        _, g1, _ = H.loss_and_grad(fn, x, y, tree, torch.ones(y.shape, dtype=out.dtype), reduction="none", **opts)
        g1 = g1.permute(0, 2, 3, 1).reshape(21, -1)
        gref = gref.permute(0, 2, 3, 1).reshape(21, -1)
        H.assert_grad_close(g1[keep], gref[keep].to(g1.dtype), dtype, 1.0)


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_groups_no_labelled_pixel(backend, device, loss, path):
    tree = trees.load("cityscapes")
    for dtype in _dtypes(path):
        x, y = inputs(tree, loss, (1, 3, 7), dtype, ignore_frac=0.0)
        y.fill_(255)
        for reduction in ("none", "sum", "mean"):
            out = getattr(hss_kernels, loss)(x, y, tree, reduction=reduction, backend="native")
            assert (out == 0).all()


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
@MODES
def test_groups_gradcheck(backend, device, loss, opts, path):
    if path != "default":
        pytest.skip("float64 takes the groups on either path")
    tree = H.random_tree(min_nodes=4, max_nodes=9, max_depth=4, seed=7)
    x, y = inputs(tree, loss, (1, 1, 5), torch.float64, ignore_frac=0.2)
    fn = getattr(hss_kernels, loss)
    assert torch.autograd.gradcheck(lambda a: fn(a, y, tree, reduction="sum", backend="native", **opts),
                                    (x.requires_grad_(True),))
