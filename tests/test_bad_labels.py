"""Labels outside [0, L) that are not ignore_index, passed to the backends' ops directly.

The public API rejects them (``functional._check_target``), but skips that check under torch.compile, so
every kernel must guard itself: such a pixel reads no table or channel out of bounds, counts as a
labelled pixel, and gets a NaN loss and a NaN gradient row; every other pixel is unaffected. The
reference does the same, so that no backend gives a plausible number for such a target.
"""
from types import SimpleNamespace

import pytest
import torch

from hss_kernels import reference, trees

from helpers import backend_or_skip

LOSSES = ("hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss")
IGNORE = 255


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _backend(name, device="cpu"):
    if name == "reference":
        return SimpleNamespace(OPS={loss: getattr(reference, loss) for loss in LOSSES})
    return backend_or_skip(name, device)


def _inputs(tree, loss, bad, dtype, shape=(2, 5, 7), device="cpu"):
    channels = tree.num_leaves if loss == "hierarchical_softmax_loss" else tree.num_nodes
    N, H, W = shape
    x = (torch.randn(N, channels, H, W, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, tree.num_leaves, shape)
    y[torch.rand(shape) < 0.2] = IGNORE
    flat = y.view(-1)
    where = torch.randperm(flat.numel())[:3]
    flat[where] = bad
    is_bad = torch.zeros(flat.numel(), dtype=torch.bool)
    is_bad[where] = True
    return x.to(device), y.to(device), is_bad.view(shape).to(device)


def _loss_and_grad(fn, x, y, tree, reduction, g=None):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, y, tree, ignore_index=IGNORE, reduction=reduction)
    if g is None:
        g = torch.randn_like(loss)
    (gx,) = torch.autograd.grad(loss, x, g)
    return loss.detach(), gx, g


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "triton", "reference"])
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("bad", ["-1", "L", "254", "1000"])
def test_bad_label_gives_nan_and_leaves_other_pixels_alone(backend, loss, bad, device):
    mod = _backend(backend, device)
    tree = trees.load("helen" if loss == "hierarchical_softmax_loss" else "pascal_person_part")
    value = {"-1": -1, "L": tree.num_leaves, "254": 254, "1000": 1000}[bad]
    dtype = torch.float64 if bad == "L" else torch.float32
    x, y, is_bad = _inputs(tree, loss, value, dtype, device=device)
    fn, ref = mod.OPS[loss], getattr(reference, loss)
    y_ref = y.masked_fill(is_bad, IGNORE)  # what every other pixel must see
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)

    # per pixel: NaN at the bad pixels, the reference's loss and gradient everywhere else
    out, gout, g = _loss_and_grad(fn, x, y, tree, "none")
    lref, gref, _ = _loss_and_grad(ref, x, y_ref, tree, "none", g)
    assert out.shape == lref.shape and gout.dtype == x.dtype
    assert torch.isnan(out[is_bad]).all()
    torch.testing.assert_close(out[~is_bad], lref[~is_bad], **tol)
    rows_bad = gout.permute(0, 2, 3, 1)[is_bad]
    assert torch.isnan(rows_bad).all()
    torch.testing.assert_close(gout.permute(0, 2, 3, 1)[~is_bad], gref.permute(0, 2, 3, 1)[~is_bad], **tol)

    # mean and sum: NaN, loud; the gradient is NaN on the bad pixels' rows only
    for reduction in ("mean", "sum"):
        out, gout, g = _loss_and_grad(fn, x, y, tree, reduction)
        assert out.dim() == 0 and torch.isnan(out), (reduction, out)
        rows = gout.permute(0, 2, 3, 1)
        assert torch.isnan(rows[is_bad]).all()
        assert torch.isfinite(rows[~is_bad]).all()
        if reduction == "sum":
            _, gref, _ = _loss_and_grad(ref, x, y_ref, tree, reduction, g)
            torch.testing.assert_close(rows[~is_bad], gref.permute(0, 2, 3, 1)[~is_bad], **tol)


@pytest.mark.parametrize("loss", LOSSES)
def test_bad_label_bfloat16_channels_last(loss):
    """The NaN survives the store in a half dtype and a strided layout (native CPU)."""
    mod = _backend("native")
    tree = trees.load("cityscapes")
    x, y, is_bad = _inputs(tree, loss, tree.num_leaves + 3, torch.bfloat16, shape=(2, 9, 11))
    x = x.contiguous(memory_format=torch.channels_last)
    out, gout, _ = _loss_and_grad(mod.OPS[loss], x, y, tree, "none")
    assert torch.isnan(out[is_bad]).all() and torch.isfinite(out[~is_bad]).all()
    rows = gout.permute(0, 2, 3, 1)
    assert torch.isnan(rows[is_bad]).all() and torch.isfinite(rows[~is_bad]).all()


@pytest.mark.parametrize("loss", LOSSES)
def test_bad_label_triton_single_pass(loss):
    mod = _backend("triton")
    tree = trees.load("cityscapes")
    x, y, is_bad = _inputs(tree, loss, -7, torch.float32)
    fn = getattr(mod, loss + "_and_grad")
    for reduction in ("mean", "sum"):
        out, grad = fn(x, y, tree, ignore_index=IGNORE, reduction=reduction)
        rows = grad.permute(0, 2, 3, 1)
        assert torch.isnan(out)
        assert torch.isnan(rows[is_bad]).all() and torch.isfinite(rows[~is_bad]).all()
