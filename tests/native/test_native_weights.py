"""Class and pixel weights fused into the native hierarchical softmax kernels (docs/MATH.md §6.6), against
the reference backend (whose per-pixel losses ``reference.weigh_loss`` weighs: the spec) on every path the
kernels have: the float lanes, the float64 / per-pixel code, ``HSS_CPU_PIXEL_PATH=1`` (the CUDA kernels'
arithmetic: the V-pixel NCHW path, the one-pixel kernels, the upsampled forward and the gathering backward),
fused upsampling; every dtype and layout, strided and expanded pixel weights, one pixel, all pixels
ignored, class weights summing to 0, bad labels, gradcheck, bitwise determinism, opcheck-level argument
checks and torch.compile."""
import pytest
import torch

import hss_kernels
from hss_kernels import native, trees

import helpers as H

LOSS = "hierarchical_softmax_loss"
ops = torch.ops.hss_kernels


@pytest.fixture
def path(cpu_path):
    """conftest.cpu_path: the CPU's own paths or HSS_CPU_PIXEL_PATH=1."""
    return cpu_path


def _weights(tree, y, dtype=torch.float32, device="cpu"):
    cw = (torch.rand(tree.num_leaves, dtype=torch.float64) * 2).to(dtype).to(device)
    pw = (torch.rand(y.shape, dtype=torch.float64) * 3).to(dtype).to(device)
    return cw, pw


def _pixel_weight_views(pw):
    """pw as given, transposed (non-contiguous, same values), and one value expanded (stride 0)."""
    yield pw
    N, Hh, W = pw.shape
    yield pw.transpose(1, 2).contiguous().transpose(1, 2)
    yield pw[:1, :1, :1].expand(N, Hh, W)


def _check(x, y, tree, grad_out=None, **kw):
    """The native loss and gradient against the reference backend's (the weights applied by weigh_loss), in
    the accumulation dtype (H.assert_matches's tolerances, the absolute ones times the largest weight)."""
    scale = 1.0
    for k in ("class_weight", "pixel_weight"):
        v = kw.get(k)
        v = v[torch.isfinite(v)] if v is not None else None  # (a NaN where no pixel is labelled: unread)
        if v is not None and v.numel():
            scale *= max(float(v.abs().max()), 1.0)
    loss, grad, go = H.loss_and_grad(H.api(LOSS, "native"), x, y, tree, grad_out, **kw)
    ref_loss, ref_grad, _ = H.loss_and_grad(H.api(LOSS, "reference"), x, y, tree, go, **kw)
    acc = H.acc_dtype(x.dtype)
    assert loss.dtype == acc == ref_loss.dtype and loss.shape == ref_loss.shape
    assert grad.dtype == x.dtype and grad.shape == x.shape
    tol = H.loss_tolerance(LOSS, x, tree)
    tol["atol"] *= scale
    torch.testing.assert_close(loss, ref_loss, **tol)
    upstream = H.upstream_size(go, y, kw.get("reduction", "mean"), kw.get("ignore_index", 255))
    H.assert_grad_close(grad, ref_grad, x.dtype, upstream * scale)
    return loss, grad


def test_native_hierarchical_softmax_takes_weights():
    H.require("native", "cpu")
    assert native.OPS["hierarchical_softmax_loss"].takes_weights is True
    assert not getattr(native.OPS["decode"], "takes_weights", False)


@pytest.mark.parametrize("dtype", H.DTYPES)
def test_every_dtype_reduction_and_weight(path, dtype):
    H.require("native", "cpu")
    # 70 pixels per image: a block across images and a partial last block; a random tree and a real one
    for tree in (H.random_tree(min_nodes=4, max_depth=5), trees.load("vistas")):
        x, y = H.inputs(tree, LOSS, (2, 5, 14), dtype, ignore_frac=0.15)
        cw, pw = _weights(tree, y)
        for reduction in H.REDUCTIONS:
            for c, p in ((cw, None), (None, pw), (cw, pw)):
                _check(x, y, tree, reduction=reduction, class_weight=c, pixel_weight=p)
        _check(x, y, tree, reduction="mean", class_weight=cw, pixel_weight=pw, eps=1e-4,
               level_weights=[0.5 + d for d in range(tree.depth)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_layouts_and_strided_pixel_weights(path, dtype):
    H.require("native", "cpu")
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, LOSS, (2, 9, 15), dtype, ignore_frac=0.15)
    cw, pw = _weights(tree, y, torch.float64)  # any float dtype: converted to the accumulation dtype
    views = (x, x.contiguous(memory_format=torch.channels_last),  # NCHW, channels_last
             x.contiguous(memory_format=torch.channels_last)[:, :, ::2, 1:],  # strided
             x[:, :, 1:8, :13])  # strided, NCHW-ordered
    for xv in views:
        yv = y[:, : xv.shape[2], : xv.shape[3]].contiguous()
        pv = pw[:, : xv.shape[2], : xv.shape[3]]
        for p in _pixel_weight_views(pv):
            for reduction in ("sum", "none"):
                _check(xv, yv, tree, reduction=reduction, class_weight=cw, pixel_weight=p)
        for go in H.grad_outs(yv.shape):  # strided and stride-0 upstream gradients, weighted
            _check(xv, yv, tree, grad_out=go, reduction="none", class_weight=cw, pixel_weight=pv)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_upsampled_with_weights(path, dtype, align_corners):
    H.require("native", "cpu")
    tree = H.random_tree(min_nodes=4, max_nodes=20)
    x, _ = H.inputs(tree, LOSS, (2, 4, 5), dtype)
    _, y = H.inputs(tree, LOSS, (2, 9, 13), ignore_frac=0.15)
    cw, pw = _weights(tree, y)
    for reduction in H.REDUCTIONS:
        for c, p in ((cw, None), (None, pw.transpose(1, 2).contiguous().transpose(1, 2)), (cw, pw)):
            _check(x, y, tree, reduction=reduction, class_weight=c, pixel_weight=p, upsample="bilinear",
                   align_corners=align_corners)


def test_one_pixel(path):
    H.require("native", "cpu")
    tree = H.random_tree(min_nodes=3)
    for dtype in (torch.float32, torch.float64):
        x, y = H.inputs(tree, LOSS, (1, 1, 1), dtype, ignore_frac=0.0)
        cw, pw = _weights(tree, y)
        for reduction in H.REDUCTIONS:
            _check(x, y, tree, reduction=reduction, class_weight=cw, pixel_weight=pw)
        _check(x[:, :, :1, :1].contiguous(), y, tree, class_weight=cw, pixel_weight=pw, upsample="bilinear")


def test_all_ignored_is_zero_and_ignored_weights_are_never_read(path):
    H.require("native", "cpu")
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, LOSS, (2, 5, 14), ignore_frac=0.3)
    cw, pw = _weights(tree, y)
    pw_bad = pw.clone()
    pw_bad[y == 255] = float("nan")  # at ignored pixels: never read
    for reduction in H.REDUCTIONS:
        _check(x, y, tree, reduction=reduction, class_weight=cw, pixel_weight=pw_bad)
    y_all = torch.full_like(y, 255)
    a = x.clone().requires_grad_(True)
    for reduction in H.REDUCTIONS:
        out = hss_kernels.hierarchical_softmax_loss(a, y_all, tree, class_weight=cw, pixel_weight=pw_bad,
                                                    reduction=reduction, backend="native")
        assert out.shape == (y.shape if reduction == "none" else ()) and (out == 0).all()
        (g,) = torch.autograd.grad(out.sum(), a)
        assert (g == 0).all()
    # an empty batch
    H.assert_empty_batch(lambda *args, **kw: hss_kernels.hierarchical_softmax_loss(
        *args, class_weight=cw, pixel_weight=torch.ones(0, 5, 14), backend="native", **kw),
        x[:0], y[:0], tree)


def test_class_weights_summing_to_zero_give_nan_mean_as_cross_entropy(path):
    H.require("native", "cpu")
    tree = hss_kernels.Tree.from_parents([-1] * 5)
    x, y = H.inputs(tree, LOSS, (1, 4, 6), ignore_frac=0.0)
    y[:] = torch.randint(0, 2, y.shape)  # labels 0 and 1 only, whose weights are 0
    cw = torch.tensor([0.0, 0.0, 1.0, 2.0, 3.0])
    got = hss_kernels.hierarchical_softmax_loss(x, y, tree, class_weight=cw, backend="native")
    want = torch.nn.functional.cross_entropy(x, y, weight=cw)
    assert torch.isnan(got) and torch.isnan(want)
    ref = hss_kernels.hierarchical_softmax_loss(x, y, tree, class_weight=cw, backend="reference")
    assert torch.isnan(ref)
    for reduction in ("sum", "none"):  # the other reductions: 0
        _check(x, y, tree, reduction=reduction, class_weight=cw)


def test_bad_labels_keep_nan_and_never_index_the_class_weights(path):
    H.require("native", "cpu")
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, LOSS, (1, 5, 14), ignore_frac=0.1)
    y[0, 2, 3] = tree.num_leaves + 1000  # far out of range: reading cw there would be out of bounds
    y[0, 4, 0] = -7
    cw, pw = _weights(tree, y)
    group = tree.tables("cpu").leaf_group
    w = torch.ones(tree.depth)
    for upsample in (0, 1):
        xs = x[:, :, :3, :7].contiguous() if upsample else x
        loss, stats, count, wsum = ops.hierarchical_softmax_fwd(xs, y, group, w, 0.0, 255, True, upsample, False, cw,
                                                                pw)
        bad = (y != 255) & ((y < 0) | (y >= tree.num_leaves))
        assert torch.isnan(loss[bad]).all() and not torch.isnan(loss[~bad]).any()
        grad = ops.hierarchical_softmax_bwd(torch.ones_like(loss), xs, y, stats, group, w, 0.0, 255, upsample, False,
                                            cw, pw)
        if not upsample:
            assert torch.isnan(grad.permute(0, 2, 3, 1)[bad]).all()
            assert not torch.isnan(grad.permute(0, 2, 3, 1)[~bad]).any()
        else:
            assert torch.isnan(grad).any()


def test_weight_sum_output():
    """The forward's fourth output: the sum of the labelled pixels' class weights, the count without them."""
    H.require("native", "cpu")
    tree = H.random_tree(min_nodes=3)
    group = tree.tables("cpu").leaf_group
    for dtype in (torch.float32, torch.float64):
        x, y = H.inputs(tree, LOSS, (2, 7, 41), dtype, ignore_frac=0.2)
        cw, pw = _weights(tree, y, H.acc_dtype(dtype))
        w = torch.ones(tree.depth, dtype=H.acc_dtype(dtype))
        valid = y != 255
        _, _, count, wsum = ops.hierarchical_softmax_fwd(x, y, group, w, 0.0, 255, False, 0, False, cw, pw)
        assert wsum.dtype == H.acc_dtype(dtype) and wsum.shape == ()
        torch.testing.assert_close(wsum, cw[y[valid]].sum(dtype=torch.float64).to(wsum.dtype))
        assert int(count) == int(valid.sum())
        for c, p in ((None, pw), (None, None)):
            _, _, count, wsum = ops.hierarchical_softmax_fwd(x, y, group, w, 0.0, 255, False, 0, False, c, p)
            assert float(wsum) == int(count) == int(valid.sum())


@pytest.mark.parametrize("upsample", [None, "bilinear"])
def test_gradcheck(path, upsample):
    H.require("native", "cpu")
    tree = H.random_tree(max_nodes=10)
    shape = (1, 3, 4) if upsample else (2, 3, 5)
    x = torch.randn(shape[0], tree.num_leaves, *shape[1:], dtype=torch.float64, requires_grad=True)
    _, y = H.inputs(tree, LOSS, (shape[0], 5, 7) if upsample else shape, ignore_frac=0.2)
    cw, pw = _weights(tree, y, torch.float64)
    for reduction in H.REDUCTIONS:
        for c, p in ((cw, pw), (None, pw.transpose(1, 2).contiguous().transpose(1, 2))):
            assert torch.autograd.gradcheck(
                lambda a: hss_kernels.hierarchical_softmax_loss(a, y, tree, class_weight=c, pixel_weight=p,
                                                                reduction=reduction, upsample=upsample, eps=1e-3,
                                                                backend="native"), (x,))


@pytest.mark.parametrize("upsample", [None, "bilinear"])
def test_weighted_sum_is_bitwise_deterministic_across_threads(path, upsample):
    H.require("native", "cpu")
    tree = trees.load("vistas")
    x, _ = H.inputs(tree, LOSS, (2, 17, 23) if upsample else (2, 33, 70))
    _, y = H.inputs(tree, LOSS, (2, 33, 70), ignore_frac=0.1)
    cw, pw = _weights(tree, y)
    kw = dict(class_weight=cw, pixel_weight=pw, upsample=upsample, reduction="sum")
    fn = H.api(LOSS, "native")
    H.assert_bitwise_deterministic(fn, x, y, tree, **kw)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = H.loss_and_grad(fn, x, y, tree, **kw)
        torch.set_num_threads(2)
        two = H.loss_and_grad(fn, x, y, tree, grad_out=one[2], **kw)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])


def test_compile_fullgraph_with_weights(path):
    H.require("native", "cpu")
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, LOSS, (2, 5, 6))
    cw, pw = _weights(tree, y)
    for upsample, xs in ((None, x), ("bilinear", x[:, :, :3, :4].contiguous())):
        f = torch.compile(lambda a, t: hss_kernels.hierarchical_softmax_loss(
            a, t, tree, class_weight=cw, pixel_weight=pw, upsample=upsample, backend="native"),
            fullgraph=True, backend="aot_eager")
        H.assert_matches(lambda a, t, _tree, **_: f(a, t),
                         H.api(LOSS, "reference"), xs, y, tree, loss_tol=H.loss_tolerance(LOSS, xs, tree),
                         class_weight=cw, pixel_weight=pw, upsample=upsample)


def test_weights_that_require_grad_get_their_gradient():
    """The kernels give the weights no gradient: weights that require one take the composition (the
    unweighted kernels, then reference.weigh_loss), so their gradients equal the reference backend's."""
    H.require("native", "cpu")
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, LOSS, (2, 5, 6), torch.float64)
    cw, pw = _weights(tree, y, torch.float64)
    grads = []
    for backend in ("native", "reference"):
        c, p, a = cw.clone().requires_grad_(), pw.clone().requires_grad_(), x.clone().requires_grad_()
        out = hss_kernels.hierarchical_softmax_loss(a, y, tree, class_weight=c, pixel_weight=p, backend=backend)
        grads.append(torch.autograd.grad(out, (a, c, p)))
    for g, want in zip(*grads):
        torch.testing.assert_close(g, want)
    c, p = cw.clone().requires_grad_(), pw.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda c, p: hss_kernels.hierarchical_softmax_loss(
        x, y, tree, class_weight=c, pixel_weight=p, reduction="sum", backend="native"), (c, p))


def test_ops_reject_bad_weights():
    """The ops called directly: a pixel_weight or class_weight of the wrong dtype, shape or device is a
    clear error, never an out-of-bounds read."""
    H.require("native", "cpu")
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, LOSS, (1, 4, 5))
    group, w = tree.tables("cpu").leaf_group, torch.ones(tree.depth)
    cw, pw = _weights(tree, y)
    loss, stats, _, _ = ops.hierarchical_softmax_fwd(x, y, group, w, 0.0, 255, True, 0, False, cw, pw)
    go = torch.ones_like(loss)
    cases = [
        ((cw, pw.double()), "pixel_weight must be Float, got Double"),
        ((cw, pw[:, :3]), r"pixel_weight must have the target's shape \[1, 4, 5\]"),
        ((cw, pw.reshape(1, 1, 4, 5)), "pixel_weight must have the target's shape"),
        ((cw.double(), pw), "class_weight must be Float, got Double"),
        ((cw[:5].contiguous(), pw), "class_weight must be contiguous with 19 elements"),
        ((torch.ones(19, 2)[:, 0], pw), "class_weight must be contiguous"),
    ]
    for (c, p), match in cases:
        with pytest.raises(RuntimeError, match=match):
            ops.hierarchical_softmax_fwd(x, y, group, w, 0.0, 255, True, 0, False, c, p)
        with pytest.raises(RuntimeError, match=match):
            ops.hierarchical_softmax_bwd(go, x, y, stats, group, w, 0.0, 255, 0, False, c, p)


@pytest.mark.gpu
def test_ops_reject_weights_on_another_device():
    H.require("native", "cuda")
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, LOSS, (1, 4, 5), device="cuda")
    group, w = tree.tables("cuda").leaf_group, torch.ones(tree.depth, device="cuda")
    with pytest.raises(RuntimeError, match="pixel_weight is on cpu"):
        ops.hierarchical_softmax_fwd(x, y, group, w, 0.0, 255, True, 0, False, None, torch.ones(1, 4, 5))
    with pytest.raises(RuntimeError, match="class_weight is on cpu"):
        ops.hierarchical_softmax_fwd(x, y, group, w, 0.0, 255, True, 0, False, torch.ones(19), None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", H.DTYPES)
def test_cuda_kernels_with_weights(dtype):
    """Every CUDA kernel (NCHW lanes, one pixel per thread on channels_last, the upsampled forward and
    gathering backward) against the reference on the GPU."""
    H.require("native", "cuda")
    tree = trees.load("vistas")
    x, y = H.inputs(tree, LOSS, (2, 16, 24), dtype, ignore_frac=0.15, device="cuda")
    cw, pw = _weights(tree, y, device="cuda")
    for xv in (x, x.contiguous(memory_format=torch.channels_last)):
        for reduction in H.REDUCTIONS:
            for c, p in ((cw, None), (None, pw.transpose(1, 2).contiguous().transpose(1, 2)), (cw, pw)):
                _check(xv, y, tree, reduction=reduction, class_weight=c, pixel_weight=p)
    for align_corners in (False, True):
        _check(x[:, :, :5, :7].contiguous(), y, tree, class_weight=cw, pixel_weight=pw, upsample="bilinear",
               align_corners=align_corners)
    H.assert_bitwise_deterministic(H.api(LOSS, "native"), x, y, tree, class_weight=cw, pixel_weight=pw)
