"""The banded upsampled backward the CUDA kernels of every loss run (csrc/include/upsample_math.h up_band_plan,
up_gather_band; csrc/cuda/upsample.cuh), checked on the CPU through its mirror (HSS_CPU_PIXEL_PATH=1, csrc/cpu/loop.h
up_backward_bands): every destination pixel's gradient row once into a scratch per band of destination rows,
gathered onto the low-resolution logits with partial sums carried across bands. HSS_UP_BAND_ROWS forces the
band height: the gradient must be the same bits for every band height (one row per band up to the whole image)
and equal the composition ``loss(F.interpolate(...))``'s, on fresh random inputs: odd and integer scales, both
align_corners, every dtype, weights, reductions, layouts, ignored labels, NaN logits."""
import pytest
import torch

from hss_kernels import reference

import helpers as H


# (N, h, w, H, W): odd non-integer scales, integer 4x, equal size, one source pixel, a one-row target, a scale
# below 2 in one axis and above in the other, a tall one (many bands).
SHAPES = [(2, 3, 5, 7, 11), (1, 4, 4, 16, 16), (2, 5, 6, 5, 6), (1, 1, 1, 3, 4), (1, 1, 3, 1, 7), (2, 4, 3, 9, 5),
          (1, 6, 2, 23, 3)]


@pytest.fixture
def pixel_path(monkeypatch):
    H.require("native", "cpu")
    monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")
    return monkeypatch


def _composed(loss):
    def f(x, y, tree, upsample=None, align_corners=False, **kw):
        return getattr(reference, loss)(reference.upsample_logits(x, y.shape[-2:], align_corners), y, tree, **kw)
    return f


def _grads_over_bands(monkeypatch, loss, x, y, tree, go, Hh, **kw):
    """{band rows: (loss, grad)} of the native backend, for one row per band up to more rows than the target."""
    out = {}
    for rows in sorted({1, 2, 3, 5, max(Hh - 1, 1), Hh + 4}):
        monkeypatch.setenv("HSS_UP_BAND_ROWS", str(rows))
        out[rows] = H.loss_and_grad(H.api(loss, "native"), x, y, tree, go, upsample="bilinear", **kw)[:2]
    monkeypatch.delenv("HSS_UP_BAND_ROWS")
    out[0] = H.loss_and_grad(H.api(loss, "native"), x, y, tree, go, upsample="bilinear", **kw)[:2]  # the default
    return out


def _assert_bitwise_same(out):
    rows0, (l0, g0) = next(iter(out.items()))
    for rows, (l, g) in out.items():
        assert torch.equal(l.isnan(), l0.isnan()) and torch.equal(l.nan_to_num(), l0.nan_to_num()), (rows0, rows)
        assert torch.equal(g.isnan(), g0.isnan()), (rows0, rows)
        bits, bits0 = (t.nan_to_num().contiguous().view(torch.uint8) for t in (g, g0))
        assert torch.equal(bits, bits0), (rows0, rows)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("loss", H.LOSSES)
def test_same_bits_for_every_band_height(pixel_path, loss, align_corners):
    tree = H.random_tree()
    for shape in SHAPES:
        N, h, w, Hh, W = shape
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x, _ = H.inputs(tree, loss, (N, h, w), dtype)
            _, y = H.inputs(tree, loss, (N, Hh, W), dtype, ignore_frac=0.2)
            go = torch.randn(y.shape, dtype=H.acc_dtype(dtype))
            out = _grads_over_bands(pixel_path, loss, x, y, tree, go, Hh, reduction="none", align_corners=align_corners)
            _assert_bitwise_same(out)
            # and the composition's gradient (the default bands; every band height gave the same bits)
            if loss == "tree_min_loss" and dtype in H.HALF and not H.weights_exact(shape, align_corners):
                continue
            H.assert_matches(H.api(loss, "native"), _composed(loss), x, y, tree, go,
                             loss_tol=H.loss_tolerance(loss, x, tree), upsample="bilinear", reduction="none",
                             align_corners=align_corners)


@pytest.mark.parametrize("loss", H.LOSSES)
def test_bands_with_weights_layouts_and_bad_values(pixel_path, loss):
    """Class and pixel weights, every reduction, channels_last and strided logits, a NaN logit (NaN rows of
    the destination pixels that read it), a fully ignored image: equal bits for every band height, and the
    composition's values without weights."""
    tree = H.random_tree()
    C = H.channels(tree, loss)
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(2, C, 7, 11, generator=g, dtype=torch.float64) * 3).float()
    views = [base[:, :, :5, :6].contiguous(), base.contiguous(memory_format=torch.channels_last)[:, :, 1:6, ::2]]
    for x in views:
        Hh, W = 13, 9
        y = torch.randint(0, tree.num_leaves, (2, Hh, W), generator=g)
        y[0, 3:5] = 255
        y[1] = 255  # an image with every pixel ignored
        cw = torch.rand(tree.num_leaves, generator=g) + 0.5
        pw = torch.rand(2, Hh, W, generator=g) + 0.5
        for reduction in ("mean", "sum", "none"):
            for kw in ({}, {"class_weight": cw}, {"pixel_weight": pw}, {"class_weight": cw, "pixel_weight": pw}):
                go = torch.randn(y.shape) if reduction == "none" else torch.randn(())
                out = _grads_over_bands(pixel_path, loss, x, y, tree, go, Hh, reduction=reduction, **kw)
                _assert_bitwise_same(out)
                if not kw:  # (the weighted default bands against the reference: test_native_tree_weights.py)
                    H.assert_matches(H.api(loss, "native"), _composed(loss), x, y, tree, go,
                                     loss_tol=H.loss_tolerance(loss, x, tree), upsample="bilinear",
                                     reduction=reduction)
    x = views[0].clone()
    y = torch.randint(0, tree.num_leaves, (2, 13, 9), generator=g)
    x[1, 0, 2, 3] = float("nan")
    go = torch.randn(y.shape)
    out = _grads_over_bands(pixel_path, loss, x, y, tree, go, 13, reduction="none")
    _assert_bitwise_same(out)
    got, grad = out[0]
    want, g_want, _ = H.loss_and_grad(_composed(loss), x, y, tree, go, reduction="none")
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).any()
    assert torch.equal(torch.isnan(grad), torch.isnan(g_want)) and torch.isnan(grad).any()


@pytest.mark.parametrize("loss", H.LOSSES)
def test_bands_gradcheck_float64(pixel_path, loss):
    tree = H.random_tree(max_nodes=8)
    C = H.channels(tree, loss)
    x = torch.randn(1, C, 3, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, tree.num_leaves, (1, 7, 9))
    y[0, 0, :3] = 255
    pixel_path.setenv("HSS_UP_BAND_ROWS", "2")
    fn = H.api(loss, "native")
    assert torch.autograd.gradcheck(lambda a: fn(a, y, tree, upsample="bilinear", reduction="sum"), (x,),
                                    eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("loss", H.LOSSES)
def test_bad_band_rows_setting_is_ignored(pixel_path, loss):
    """HSS_UP_BAND_ROWS that is not a positive integer leaves the default bands."""
    tree = H.random_tree()
    x, _ = H.inputs(tree, loss, (1, 3, 4))
    _, y = H.inputs(tree, loss, (1, 9, 10))
    go = torch.randn(y.shape)
    _, want, _ = H.loss_and_grad(H.api(loss, "native"), x, y, tree, go, upsample="bilinear", reduction="none")
    for bad in ("0", "-3", "x", ""):
        pixel_path.setenv("HSS_UP_BAND_ROWS", bad)
        _, got, _ = H.loss_and_grad(H.api(loss, "native"), x, y, tree, go, upsample="bilinear", reduction="none")
        assert torch.equal(got, want)


_HEAP_CHECK = r"""
import os, sys, torch
sys.path.insert(0, sys.argv[1])
import helpers as H
from hss_kernels import trees
tree = trees.load("vistas_v2")  # 147 nodes: 10 words of node bits per lane group
for it, (N, h, w, Hh, W) in enumerate([(2, 3, 5, 7, 11), (1, 4, 4, 16, 16), (1, 6, 2, 23, 3)] * 3):
    torch.manual_seed(it)
    x, _ = H.inputs(tree, "tree_min_loss", (N, h, w), torch.float64)
    _, y = H.inputs(tree, "tree_min_loss", (N, Hh, W), torch.float64, ignore_frac=0.2)
    go = torch.randn(y.shape, dtype=torch.float64)
    H.loss_and_grad(H.api("tree_min_loss", "native"), x, y, tree, go, upsample="bilinear", reduction="none")
print("OK")
"""


def test_bands_scratch_fits_every_lane_width(tmp_path):
    """The tree-min rows' per-thread scratch (depth slots and node bits, whole 16-byte Lanes) holds float64's two
    lanes too: under glibc's checking allocator (libc_malloc_debug, every free checked) a write past it aborts
    the process. It did (node bits sized 2 x 4 bytes per word, Lanes<uint32_t, 2> is 16)."""
    import glob
    import os
    import subprocess
    import sys

    H.require("native", "cpu")
    debug = sorted(glob.glob("/usr/lib/*/libc_malloc_debug.so.0") + glob.glob("/lib/*/libc_malloc_debug.so.0"))
    if not debug:
        pytest.skip("no libc_malloc_debug.so.0 (glibc's checking allocator) on this machine")
    env = dict(os.environ, HSS_CPU_PIXEL_PATH="1", HSS_UP_BAND_ROWS="1", LD_PRELOAD=debug[0],
               GLIBC_TUNABLES="glibc.malloc.check=3", PYTHONMALLOC="malloc", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", _HEAP_CHECK, os.path.dirname(os.path.dirname(__file__))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (proc.returncode, proc.stderr[-2000:])
