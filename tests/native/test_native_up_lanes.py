"""The CUDA hierarchical softmax with fused upsampling on the lanes, checked on the CPU.

On a GPU, float32 / float16 / bfloat16 logits (any layout) and a tree at most 4 deep (``kPackedDepth``) run
hierarchical_softmax_fwd_up_lanes_kernel and the banded backward's hierarchical_softmax_up_rows_lanes_kernel:
G = 4 (float32) or 8 (16-bit) destination pixels of one row per thread, each channel of the G lanes
interpolated through upsample_math.h's UpLanes, the V-pixel functions of hierarchical_softmax_math.h
(``hierarchical_softmax_forward_pixels`` / ``_backward_pixels``), the far lanes again one pixel at a time;
float64 and deeper trees take the one-pixel kernels. ``HSS_CPU_PIXEL_PATH=1`` runs the same functions on the
CPU (csrc/cpu/hierarchical_softmax.cpp up_forward_vec and the lanes rows of the banded backward), so that the
sizes below give rows that end in a partial group of lanes (W not a multiple of 4 or 8), one pixel, rows
longer than a CPU block of 64 pixels (groups that two blocks share) and odd and integer scales. Against the
composition ``hierarchical_softmax_loss(F.interpolate(logits), target)`` on fresh random inputs.
"""
import pytest
import torch

from hss_kernels import native, reference, tables, trees

import helpers as H

LOSS = "hierarchical_softmax_loss"
FLOATS = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# (N, h, w, H, W): odd scales and partial groups; integer 4x; one pixel; rows of 150 pixels (several CPU
# blocks a row, groups across blocks); a one-row target; one axis at the logits' size
SHAPES = [(2, 3, 5, 7, 11), (1, 4, 4, 16, 16), (1, 1, 1, 1, 1), (1, 2, 20, 3, 150), (1, 1, 3, 1, 13),
          (2, 5, 3, 5, 9)]


@pytest.fixture(autouse=True)
def pixel_path(monkeypatch):
    H.require("native", "cpu")
    monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")
    return monkeypatch


def _composed(x, y, tree, upsample=None, align_corners=False, reduction="mean", class_weight=None,
              pixel_weight=None, **kw):
    per_pixel = reference.hierarchical_softmax_loss(reference.upsample_logits(x, y.shape[-2:], align_corners), y,
                                                    tree, reduction="none", **kw)
    return reference.weigh_loss(per_pixel, y, reduction, class_weight, pixel_weight)


def _check(x, y, tree, grad_out=None, **kw):
    """The loss within helpers' tolerance; the gradient too, its allowance times the most destination pixels
    whose stencils hold one source pixel: each low-resolution logit's gradient sums their rows, and every row
    carries the V-pixel forward's fast_exp rounding (docs/MATH.md §2.9) through its statistics."""
    loss, grad, go = H.loss_and_grad(H.api(LOSS, "native"), x, y, tree, grad_out, upsample="bilinear", **kw)
    ref_loss, ref_grad, _ = H.loss_and_grad(_composed, x, y, tree, go, **kw)
    assert loss.dtype == ref_loss.dtype and loss.shape == ref_loss.shape
    assert grad.dtype == x.dtype and grad.shape == x.shape
    torch.testing.assert_close(loss, ref_loss, **H.loss_tolerance(LOSS, x, tree))
    (h, w), (Hh, W) = x.shape[-2:], y.shape[-2:]
    terms = (Hh // h + 2) * (W // w + 2)
    H.assert_grad_close(grad, ref_grad, x.dtype, H.upstream_size(go, y, kw.get("reduction", "mean")) * terms)


def _inputs(tree, shape, dtype=torch.float32, **kw):
    N, h, w, Hh, W = shape
    x, _ = H.inputs(tree, LOSS, (N, h, w), dtype, **{k: v for k, v in kw.items() if k in ("std", "ties")})
    _, y = H.inputs(tree, LOSS, (N, Hh, W), dtype, ignore_frac=kw.get("ignore_frac", 0.2), edges=kw.get("edges", True))
    return x, y


def _lane_trees():
    # depths 3 (Vistas), 2 (Cityscapes), and random ones of depth 1 to 4 (every packed slot in use)
    return [trees.load("vistas"), trees.load("cityscapes")] + [
        H.random_tree(min_nodes=3, max_nodes=20, min_depth=d, max_depth=d) for d in (1, 2, 4)]


@FLOATS
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_up_lanes_match_composition(dtype, align_corners, shape):
    for tree in _lane_trees():
        assert tree.depth <= 4
        x, y = _inputs(tree, shape, dtype)
        _check(x, y, tree, reduction="mean", align_corners=align_corners)
        _check(x, y, tree, reduction="sum", eps=1e-4, level_weights=[0.5 + d for d in range(tree.depth)],
               align_corners=align_corners)
        N, _, _, Hh, W = shape
        for go in H.grad_outs((N, Hh, W), transposed=Hh > 1):
            _check(x.contiguous(memory_format=torch.channels_last), y, tree, go, reduction="none",
                   align_corners=align_corners)


@FLOATS
def test_up_lanes_far_groups_and_ties(dtype):
    """Widely spread logits (std 40): groups far below a lane's max (the forward's far lanes) and levels whose
    factor exp(lse - b_d) is huge (the backward's); integer logits that tie everywhere."""
    tree = trees.load("vistas")
    for kw in (dict(std=40.0), dict(ties=True)):
        x, y = _inputs(tree, (2, 3, 5, 7, 11), dtype, **kw)
        for eps in (0.0, 1e-4):
            for go in H.grad_outs((2, 7, 11)):
                _check(x, y, tree, go, reduction="none", eps=eps)


@FLOATS
def test_up_lanes_all_ignored_bad_labels_and_nan(dtype):
    tree = trees.load("vistas")
    x, y = _inputs(tree, (2, 3, 5, 7, 11), dtype, ignore_frac=1.0, edges=False)
    _check(x, y, tree, reduction="sum")
    x[:, :, 0, 1] = float("nan")  # read only by ignored pixels: out of every sum and gradient
    loss, g, _ = H.loss_and_grad(H.api(LOSS, "native"), x, y, tree, upsample="bilinear", reduction="sum")
    assert loss == 0 and (g == 0).all()
    x, y = _inputs(tree, (2, 3, 5, 7, 11), dtype)
    bad = torch.zeros(y.shape, dtype=torch.bool)
    bad.view(-1)[[3, 8, 10, 76]] = True  # in a group, at a group's start, a row's last pixel, the last row
    y[bad] = torch.tensor([-1, tree.num_leaves, 1000, -7])
    go = torch.randn(y.shape)
    loss, g, _ = H.loss_and_grad(native.OPS[LOSS], x, y, tree, go, upsample="bilinear", reduction="none")
    assert torch.isnan(loss[bad]).all() and not torch.isnan(loss[~bad]).any()
    assert torch.isnan(g).any()
    # elsewhere the gradient of the same labels with the bad ones ignored, bit for bit (their rows add zeros)
    y2 = y.masked_fill(bad, 255)
    _, g2, _ = H.loss_and_grad(H.api(LOSS, "native"), x, y2, tree, go, upsample="bilinear", reduction="none")
    fin = ~torch.isnan(g)
    assert torch.equal(g[fin], g2[fin])
    _check(x, y2, tree, go, reduction="none")


def test_up_lanes_same_bits_for_every_band_height(pixel_path):
    """The lanes' rows go to the band scratch as the one-pixel rows did: the same bits for every band height,
    with class and pixel weights and a per-pixel upstream gradient."""
    tree = trees.load("vistas")
    x, y = _inputs(tree, (2, 4, 6, 13, 21))
    g = torch.Generator().manual_seed(1)
    cw = torch.rand(tree.num_leaves, generator=g) + 0.5
    pw = torch.rand(y.shape, generator=g) + 0.5
    go = torch.randn(y.shape, generator=g)
    for kw in ({}, {"class_weight": cw, "pixel_weight": pw}):
        out = {}
        for rows in (1, 2, 5, 13, 20):
            pixel_path.setenv("HSS_UP_BAND_ROWS", str(rows))
            out[rows] = H.loss_and_grad(H.api(LOSS, "native"), x, y, tree, go, upsample="bilinear",
                                        reduction="none", **kw)[:2]
        l1, g1 = out[1]
        for rows, (l, gr) in out.items():
            assert torch.equal(l, l1) and torch.equal(gr.view(torch.int32), g1.view(torch.int32)), rows
    pixel_path.delenv("HSS_UP_BAND_ROWS")
    # and the weighted loss against the composition's
    want, g_want, _ = H.loss_and_grad(_composed, x, y, tree, go, reduction="none", class_weight=cw, pixel_weight=pw)
    torch.testing.assert_close(out[5][0], want, **H.loss_tolerance(LOSS, x, tree))
    H.assert_grad_close(out[5][1], g_want, x.dtype, H.upstream_size(go, y, "none", 255))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_pixel_fallbacks(dtype):
    """Trees deeper than 4 levels (any dtype) and float64 logits (any tree) take the one-pixel kernels."""
    deep = H.random_tree(min_nodes=8, max_nodes=24, min_depth=5, max_depth=8)
    for tree in (deep, trees.load("vistas")):
        x, y = _inputs(tree, (2, 3, 5, 7, 11), dtype)
        for go in H.grad_outs((2, 7, 11)):
            _check(x, y, tree, go, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_up_lanes_run(dtype, pixel_path):
    """A property only the V-pixel forward has: level D's group is the label's leaf alone, so it saves
    lse_D = z_y, the interpolated logit itself, where the other paths save m + log(e^(z_y - m)), which
    rounds. With every interpolation weight a multiple of 1/64 and logits of few bits, z_y is exact whatever
    the order of the operations: the saved statistic equals F.interpolate's z_y bit for bit with the switch on
    (the tests above do run the lanes), and, for float32 logits, not everywhere with it off."""
    tree = trees.load("vistas")
    shape = (2, 3, 5, 9, 17)
    assert H.weights_exact(shape, True)
    x, y = _inputs(tree, shape, dtype, std=1.2)
    # every weight of this shape (align_corners) a multiple of 1/4 and the logits multiples of 2^-16 in (-4, 4):
    # every interpolated value a multiple of 2^-20 below 4, exact in float32 (and every group sum far above
    # e^-30: no lane recomputed); channel 0 at 25, the lanes' max, whose float32 grid (2^-19) loses such a
    # z_y's last bit in m + log(e^(z_y - m))
    x = (x.float().clamp(-3.9, 3.9) * 65536).round().div(65536)
    x[:, 0] = 25.0
    x = x.to(dtype)
    group = tables.leaf_group(tree, x.device)
    w = tables.level_weight_vector(tree, None, torch.float32, x.device)

    def saved_lse_d():
        _, stats, _, _ = torch.ops.hss_kernels.hierarchical_softmax_fwd(x, y, group, w, 0.0, 255, True, 1, True)
        valid = y != 255
        z = reference.upsample_logits(x, y.shape[-2:], True).float()
        zy = z.gather(1, y.clamp(max=tree.num_leaves - 1).unsqueeze(1)).squeeze(1)
        return stats[tree.depth][valid], zy[valid]

    got, zy = saved_lse_d()
    assert torch.equal(got, zy)
    if dtype == torch.float32:
        pixel_path.delenv("HSS_CPU_PIXEL_PATH")
        got, zy = saved_lse_d()
        assert not torch.equal(got, zy)
