"""Class and pixel weights fused into the Triton loss kernels (docs/MATH.md §6.6), on every device: the
hierarchical softmax, tree-min and tree BCE against the rule written out on the reference's unweighted
per-pixel loss, in every dtype, layout (NCHW, channels_last, strided logits; a contiguous, strided or expanded
pixel_weight), reduction, with the fused upsampling (both align_corners) and the single pass; one pixel, all
pixels ignored, class weights summing to 0; gradcheck in float64; the weighted mean bit for bit on every run;
torch.compile(fullgraph=True); the custom ops' schemas and fakes with weights (opcheck) and their errors for
bad weights."""
import pytest
import torch

import hss_kernels
from hss_kernels import reference, tables, trees

import helpers as H

triton_mod = pytest.importorskip("hss_kernels.triton")
from hss_kernels.triton import hierarchical_softmax as HS, tree_min as TM  # noqa: E402

HSL = "hierarchical_softmax_loss"
OPTS = {HSL: dict(eps=1e-4), "tree_min_loss": dict(gamma=2.0), "tree_bce_loss": dict(gamma=1.0, eps=1e-4)}


def _rule(loss, x, y, tree, reduction, cw=None, pw=None, upsample=None, align_corners=False, **kw):
    """The weighted loss written out on the reference's unweighted per-pixel loss (as test_weights._manual):
    w_p = cw[y_p] * pw[p] at labelled pixels, "mean" over the sum of their class weights (their count)."""
    if upsample is not None:
        x = reference.upsample_logits(x, y.shape[-2:], align_corners)
    per = getattr(reference, loss)(x, y, tree, reduction="none", **kw)
    valid = y != 255
    w = cw.to(per.dtype)[y.clamp(0, tree.num_leaves - 1)] * valid if cw is not None else valid.to(per.dtype)
    per = per * w * (pw.to(per.dtype) if pw is not None else 1)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / w.sum() if valid.any() else per.sum() * 0


def _upstream(go, y, reduction, cw, pw):
    """The largest d(loss)/d(unweighted per-pixel loss): grad_output times the largest weight, over the
    denominator for a mean."""
    valid = y != 255
    w = cw.double()[y.clamp(0, cw.numel() - 1)] if cw is not None else torch.ones(y.shape, dtype=torch.float64,
                                                                                     device=y.device)
    if pw is not None:
        w = w * pw.double()
    g = float(go.abs().max()) * float(torch.where(valid, w, 0).max()) if valid.any() else 0.0
    if reduction == "mean":
        den = (cw.double()[y.clamp(0, cw.numel() - 1)] * valid).sum() if cw is not None else valid.sum()
        g /= max(float(den), 1e-30)
    return g


def _check(loss, backend, x, y, tree, reduction, cw, pw, grad_out=None, **kw):
    """The backend's weighted loss and gradient against :func:`_rule` (H.TOL, the gradient's allowance scaled
    by the weights)."""
    got, g, go = H.loss_and_grad(H.api(loss, backend), x, y, tree, grad_out, reduction=reduction, class_weight=cw,
                                 pixel_weight=pw, **kw)
    want, g_want, _ = H.loss_and_grad(lambda a, t, tr, **k: _rule(loss, a, t, tr, reduction, cw, pw, **kw), x, y,
                                      tree, go)
    xl = reference.upsample_logits(x, y.shape[-2:], kw.get("align_corners", False)) if kw.get("upsample") else x
    acc = H.acc_dtype(x.dtype)
    assert got.dtype == acc and got.shape == want.shape and g.dtype == x.dtype and g.shape == x.shape
    torch.testing.assert_close(got, want.to(acc), **H.loss_tolerance(loss, xl, tree))
    H.assert_grad_close(g, g_want, x.dtype, _upstream(go, y, reduction, cw, pw))
    return got, g


def _layouts(x, y, pw):
    """(logits, target, pixel_weight) as NCHW with a contiguous pixel_weight, channels_last with a transposed
    one, and strided views of all three (every other row, the first column dropped) with an expanded one."""
    N, _, Hh, W = x.shape
    yield x, y, pw
    pwt = pw.transpose(1, 2).contiguous().transpose(1, 2)
    yield x.contiguous(memory_format=torch.channels_last), y, pwt
    ys = y[:, ::2, 1:]
    pwe = pw[:, :1, 1:].expand(ys.shape)
    yield x[:, :, ::2, 1:], ys, pwe


@pytest.mark.parametrize("dtype", H.DTYPES)
@pytest.mark.parametrize("loss", H.LOSSES)
def test_weights_every_dtype_layout_and_reduction(backend, device, loss, dtype):
    tree = H.random_tree(max_nodes=H.sized(device, 10, 24))
    x, y = H.inputs(tree, loss, (2, 6, 5), dtype=dtype, device=device)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    cw = (torch.rand(tree.num_leaves, dtype=wdt) * 2).to(device)
    pw = (torch.rand(y.shape) * 3).to(dtype).to(device)  # pixel weights in the logits' dtype: read as they are
    for k, (xv, yv, pv) in enumerate(_layouts(x, y, pw)):
        for reduction in H.REDUCTIONS:
            c, p = [(cw, pv), (cw, None), (None, pv)][(k + H.REDUCTIONS.index(reduction)) % 3]
            _check(loss, backend, xv, yv, tree, reduction, c, p, **OPTS[loss])


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("loss", H.LOSSES)
def test_weights_with_fused_upsampling(backend, device, loss, align_corners):
    tree = H.random_tree(max_nodes=8)
    x = (torch.randn(1, H.channels(tree, loss), 3, 4, dtype=torch.float64) * 3).float().to(device)
    _, y = H.inputs(tree, loss, (1, 7, 9), device=device)
    cw = (torch.rand(tree.num_leaves) * 2).to(device)
    pw = (torch.rand(y.shape) * 3).to(device)
    for reduction in H.REDUCTIONS:
        for c, p in ((cw, pw), (cw, None), (None, pw[:, :1].expand(y.shape))):
            _check(loss, backend, x, y, tree, reduction, c, p, upsample="bilinear", align_corners=align_corners)


@pytest.mark.parametrize("loss", H.LOSSES)
def test_weights_one_pixel_all_ignored_and_zero_class_weights(backend, device, loss):
    tree = H.random_tree(max_nodes=10)
    L = tree.num_leaves
    cw = (torch.rand(L) + 0.5).to(device)
    x, y = H.inputs(tree, loss, (1, 1, 1), device=device)
    pw = (torch.rand(y.shape) * 3).to(device)
    for reduction in H.REDUCTIONS:
        _check(loss, backend, x, y, tree, reduction, cw, pw)
    # every pixel ignored: 0 in every reduction, a zero gradient, whatever the weights (an infinite one too)
    x, y = H.inputs(tree, loss, (2, 3, 4), device=device)
    y = torch.full_like(y, 255)
    pw = torch.full(y.shape, float("inf"), device=device)
    for reduction in H.REDUCTIONS:
        out, g, _ = H.loss_and_grad(H.api(loss, backend), x, y, tree, reduction=reduction, class_weight=cw,
                                    pixel_weight=pw)
        assert (out == 0).all() and (g == 0).all()
    # class weights summing to 0 over the labelled pixels: "mean" is 0 / 0 = NaN (as F.cross_entropy), "sum" 0
    x, y = H.inputs(tree, loss, (1, 3, 4), device=device)
    zero = torch.zeros(L, device=device)
    for reduction in ("mean", "sum"):
        got, g, go = H.loss_and_grad(H.api(loss, backend), x, y, tree, reduction=reduction, class_weight=zero)
        want, g_want, _ = H.loss_and_grad(lambda a, t, tr, **k: _rule(loss, a, t, tr, reduction, zero), x, y, tree,
                                          go)
        assert got.isnan().item() == (reduction == "mean") and want.isnan().item() == (reduction == "mean")
        if reduction == "sum":
            torch.testing.assert_close(g, g_want)  # every weight 0: a zero gradient
        else:  # the NaN reaches each labelled pixel's gradient row (where it flows), never an ignored pixel's
            labelled = y != 255
            assert g.isnan().any(1)[labelled].all() and (g.permute(0, 2, 3, 1)[~labelled] == 0).all()


@pytest.mark.parametrize("loss", H.LOSSES)
def test_weights_gradcheck_float64(backend, device, loss):
    tree = H.random_tree(max_nodes=6)
    x, y = H.inputs(tree, loss, (1, 2, 3), dtype=torch.float64, device=device, std=1.0)
    cw = (torch.rand(tree.num_leaves, dtype=torch.float64) + 0.5).to(device)
    pw = (torch.rand(y.shape, dtype=torch.float64) * 2).to(device)
    fn = H.api(loss, backend)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda a: fn(a, y, tree, reduction=reduction, class_weight=cw,
                                                     pixel_weight=pw, **OPTS[loss]),
                                        (x.clone().requires_grad_(True),), fast_mode=True)
    xl = x[:, :, :, :2].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: fn(a, y, tree, class_weight=cw, pixel_weight=pw, upsample="bilinear"),
                                    (xl,), fast_mode=True)


@pytest.mark.parametrize("loss", H.LOSSES)
def test_weighted_mean_is_bitwise_deterministic(backend, device, loss):
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, loss, (2, 9, 13), device=device)
    cw = (torch.rand(tree.num_leaves) * 2).to(device)
    pw = torch.rand(y.shape).to(device)
    H.assert_bitwise_deterministic(H.api(loss, backend), x, y, tree, runs=2, class_weight=cw, pixel_weight=pw)


@pytest.mark.parametrize("loss", H.LOSSES)
def test_weights_single_pass_and_loss_and_grad(backend, device, loss):
    """single_pass and ``*_and_grad`` take the weights too: the same loss as the two-pass op to the bit, the
    gradient to rounding (its "mean" scale is summed before the kernel, not from its partials)."""
    tree = trees.load("helen")
    x, y = H.inputs(tree, loss, device=device)
    cw = (torch.rand(tree.num_leaves) * 2).to(device)
    pw = (torch.rand(y.shape) * 3).to(device)
    fn = getattr(triton_mod, loss)
    for reduction in ("mean", "sum"):
        kw = dict(reduction=reduction, class_weight=cw, pixel_weight=pw)
        loss2, grad2, go = H.loss_and_grad(fn, x, y, tree, **kw)
        loss1, grad1, _ = H.loss_and_grad(fn, x, y, tree, go, single_pass=True, **kw)
        torch.testing.assert_close(loss1, loss2, rtol=0, atol=0)
        torch.testing.assert_close(grad1, grad2, rtol=1e-6, atol=1e-7)
        want, g_want, _ = H.loss_and_grad(lambda a, t, tr: _rule(loss, a, t, tr, reduction, cw, pw), x, y, tree, go)
        torch.testing.assert_close(loss1, want, **H.loss_tolerance(loss, x, tree))
        H.assert_grad_close(grad1, g_want, x.dtype, _upstream(go, y, reduction, cw, pw))
    ones = torch.ones((), device=device)
    one_loss, one_grad = getattr(triton_mod, loss + "_and_grad")(x, y, tree, class_weight=cw, pixel_weight=pw)
    want, g_want, _ = H.loss_and_grad(fn, x, y, tree, ones, single_pass=True, class_weight=cw, pixel_weight=pw)
    assert torch.equal(one_loss, want) and torch.equal(one_grad, g_want)


def test_weights_compile_fullgraph(backend, device):
    tree = trees.load("cityscapes")
    for loss in (HSL, "tree_min_loss"):
        x, y = H.inputs(tree, loss, (1, 4, 5), device=device)
        cw = torch.rand(tree.num_leaves).to(device)
        pw = torch.rand(y.shape).to(device)
        fn = getattr(hss_kernels, loss)
        f = torch.compile(lambda a, t: fn(a, t, tree, class_weight=cw, pixel_weight=pw, backend="triton"),
                          fullgraph=True, backend="aot_eager")
        got, g, go = H.loss_and_grad(lambda a, t, _tree: f(a, t), x, y, tree)
        want, g_want, _ = H.loss_and_grad(lambda a, t, tr: _rule(loss, a, t, tr, "mean", cw, pw), x, y, tree, go)
        torch.testing.assert_close(got, want, **H.loss_tolerance(loss, x, tree))
        H.assert_grad_close(g, g_want, x.dtype, _upstream(go, y, "mean", cw, pw))
    torch._dynamo.reset()


def _hs_args(device, reduction="mean", single_pass=False, up=False):
    tree = trees.load("pascal_person_part")
    x, y = H.inputs(tree, HSL, (2, 3, 5), device=device)
    if up:
        x = x[:, :, :2, :3].contiguous()
    group, w = HS._tables(tree, [1.0, 0.5, 2.0], torch.float32, x.device)
    cw = torch.rand(tree.num_leaves).to(device)
    pw = torch.rand(y.shape).to(device)
    opts = (0.0, 255, reduction, up if up else single_pass)
    return x, y, group, w, opts, cw, pw


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_weighted_ops_opcheck(backend, device, reduction):
    """The ops' schemas, fakes and autograd registration with class and pixel weights (and with pixel weights
    alone: the weight_sum output is then empty), forward and backward, plain and upsampled."""
    for up in (False, True):
        x, y, group, w, opts, cw, pw = _hs_args(device, reduction, up=up)
        fwd = HS._hierarchical_softmax_up_fwd if up else HS._hierarchical_softmax_fwd
        bwd = HS._hierarchical_softmax_up_bwd if up else HS._hierarchical_softmax_bwd
        for c in (cw, None):
            args = (x.clone().requires_grad_(True), y, group, w, *opts, c, pw)
            torch.library.opcheck(fwd, args)
            out = fwd(*args)
            loss, stats, count, wsum = out[:4]
            assert wsum.shape == ((0,) if c is None else ())
            go = torch.randn(loss.shape).to(device)
            tail = opts[3:] if up else ()
            torch.library.opcheck(bwd, (go, x, y, group, w, stats.detach(), count, *opts[:3], *tail, wsum.detach(), c,
                                        pw))
    tree = trees.load("pascal_person_part")
    x, y = H.inputs(tree, "tree_min_loss", (1, 3, 4), device=device)
    tab, sizes = tables.tree_min_table(tree, x.device), tables.tree_min_sizes(tree)
    k = tables.node_weight_vector(tree, 1.0, "level", torch.float32, x.device)
    cw = torch.rand(tree.num_leaves).to(device)
    pw = torch.rand(y.shape).to(device)
    for extrema in (True, False):
        opts = (2.0, 0.0, 255, reduction, extrema)
        args = (x.clone().requires_grad_(True), y, tab, k, sizes, *opts, False, cw, pw)
        torch.library.opcheck(TM._tree_min_fwd, args)
        loss, count, wsum, _ = TM._tree_min_fwd(*args)
        torch.library.opcheck(TM._tree_min_bwd, (torch.randn(loss.shape).to(device), x, y, tab, k, count, sizes,
                                                 *opts, wsum.detach(), cw, pw))
    xl = x[:, :, :2, :3].contiguous().requires_grad_(True)
    args = (xl, y, tab, k, sizes, *opts, True, cw, pw)
    torch.library.opcheck(TM._tree_min_up_fwd, args)
    loss, count, wsum = TM._tree_min_up_fwd(*args)
    torch.library.opcheck(TM._tree_min_up_bwd, (torch.randn(loss.shape).to(device), xl.detach(), y, tab, k, count,
                                                sizes, *opts, True, wsum.detach(), cw, pw))


def test_weighted_ops_refuse_bad_weights(backend, device):
    """Weights passed straight to the ops: a clear TypeError / ValueError for a pixel_weight of another dtype,
    shape or device or not contiguous, and for a class_weight not in the accumulation dtype or of another
    length."""
    x, y, group, w, opts, cw, pw = _hs_args(device)
    tree = trees.load("pascal_person_part")
    tab, sizes = tables.tree_min_table(tree, x.device), tables.tree_min_sizes(tree)
    k = tables.node_weight_vector(tree, 1.0, "level", torch.float32, x.device)
    xn, _ = H.inputs(tree, "tree_min_loss", (2, 3, 5), device=device)
    calls = [lambda c, p: HS._hierarchical_softmax_fwd(x, y, group, w, *opts, c, p),
             lambda c, p: HS._hierarchical_softmax_bwd(torch.ones(()).to(device), x, y, group, w,
                                                       torch.zeros(4, 30).to(device), torch.ones((), dtype=torch.long),
                                                       *opts[:3], None, c, p),
             lambda c, p: TM._tree_min_fwd(xn, y, tab, k, sizes, 2.0, 0.0, 255, "mean", True, False, c, p),
             lambda c, p: TM._tree_min_up_fwd(xn[:, :, :2], y, tab, k, sizes, 2.0, 0.0, 255, "mean", True, False,
                                              c, p)]
    bad = [(None, pw.long(), TypeError, "pixel_weight must be a floating-point tensor, got torch.int64"),
           (None, pw[:, :2], ValueError, r"pixel_weight must have the target's shape \(2, 3, 5\)"),
           (None, torch.rand(2, 3, 5, device="meta"), ValueError, "pixel_weight must have the target's shape .* on"),
           (None, pw.transpose(1, 2).contiguous().transpose(1, 2), ValueError, "pixel_weight must be contiguous"),
           (cw.double(), None, TypeError, "class_weight must be a torch.float32 tensor"),
           (cw[:-1], None, ValueError, f"class_weight must be {tree.num_leaves} contiguous values")]
    for call in calls:
        for c, p, err, match in bad:
            with pytest.raises(err, match=match):
                call(c, p)
