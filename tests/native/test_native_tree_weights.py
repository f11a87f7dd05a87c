"""Class and pixel weights fused into the native tree-min / tree BCE kernels (``tree_min_fwd`` /
``tree_min_bwd`` with ``class_weight`` / ``pixel_weight``), against the reference's composition
(``hss_kernels.reference.weigh_loss`` on the unweighted per-pixel loss, docs/MATH.md §6.6): every dtype and
layout (NCHW, channels_last, a strided view; pixel weights dense, transposed and expanded), every path of the
CPU (the float lanes, and with ``HSS_CPU_PIXEL_PATH=1`` the per-pixel code the CUDA kernels run: the
G-pixel groups, the one-pixel backward, the kUp forward and the gathering backward), fused upsampling at both
``align_corners``, one pixel, no labelled pixel, class weights summing to 0, gradcheck, bitwise determinism
(repeats and thread counts), opcheck of the ops with weights, torch.compile and bad weights passed straight to
the ops."""
import pytest
import torch

import hss_kernels
from hss_kernels import trees
from hss_kernels.tables import tree_index

import helpers as H

ops = torch.ops.hss_kernels


@pytest.fixture
def path(cpu_path):
    """conftest.cpu_path: the CPU's own paths or HSS_CPU_PIXEL_PATH=1."""
    return cpu_path


def _weights(tree, shape, dtype=torch.float32, device="cpu"):
    """Class weights and a dense pixel weight map in [0.25, 1.75]: big enough to matter, small enough for
    the gradient tolerance (helpers.assert_grad_close scales with the upstream gradient, not the weights)."""
    cw = (torch.rand(tree.num_leaves, dtype=torch.float64) * 1.5 + 0.25).to(dtype).to(device)
    pw = (torch.rand(shape, dtype=torch.float64) * 1.5 + 0.25).to(dtype).to(device)
    return cw, pw


def _pixel_weight_views(shape, device="cpu"):
    """Dense, transposed (non-contiguous) and expanded (stride 0 along H) pixel weight maps."""
    N, Hh, W = shape
    yield "dense", torch.rand(shape, device=device) * 1.5 + 0.25
    yield "transposed", (torch.rand(N, W, Hh, device=device) * 1.5 + 0.25).transpose(1, 2)
    yield "expanded", (torch.rand(N, 1, W, device=device) * 1.5 + 0.25).expand(shape)


def _check(loss, x, y, tree, **kw):
    """The native loss and gradient against the reference's composition, same weights and options, as
    helpers.assert_matches compares them, with the upstream gradient of a pixel scaled by its weight (over the
    weight sum for a mean) and, for float16, one subnormal step more (gradients below 6e-5 round to
    multiples of 6e-8 in either order of the products)."""
    got, g, go = H.loss_and_grad(H.api(loss, "native"), x, y, tree, **kw)
    want, g_want, _ = H.loss_and_grad(H.api(loss, "reference"), x, y, tree, go, **kw)
    acc = H.acc_dtype(x.dtype)
    assert got.dtype == acc and want.dtype == acc and got.shape == want.shape and got.device == x.device
    assert g.dtype == x.dtype and g.shape == x.shape and g.device == x.device
    torch.testing.assert_close(got, want, **H.loss_tolerance(loss, x, tree))
    labelled = y != 255
    w = torch.ones(y.shape, dtype=torch.float64)
    if kw.get("class_weight") is not None:
        w = w * kw["class_weight"].double().cpu()[y.clamp(0, tree.num_leaves - 1).cpu()]
    wsum = float(w[labelled].sum())
    if kw.get("pixel_weight") is not None:
        w = w * kw["pixel_weight"].double().cpu()
    wmax = float(w[labelled].max()) if labelled.any() else 0.0
    upstream = float(go.abs().max()) * wmax
    if kw.get("reduction", "mean") == "mean":
        upstream /= max(wsum, 1e-30)
    tol = H.TOL[x.dtype]
    scale = float(g_want.abs().max()) if g_want.numel() else 0.0
    atol = tol["atol"] * upstream + H.TOL[acc]["rtol"] * scale
    if x.dtype == torch.float16:
        atol += torch.finfo(x.dtype).tiny * torch.finfo(x.dtype).eps
    torch.testing.assert_close(g.double(), g_want.double(), rtol=tol["rtol"], atol=atol)
    return got, g


def _logit_views(x):
    """NCHW, channels_last and a strided (sliced, not dense) view with its target shape."""
    yield "nchw", x
    yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    yield "strided", x[:, :, 1:, ::2]


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("loss", H.NODE_LOSSES)
@pytest.mark.parametrize("dtype", H.DTYPES, ids=str)
def test_every_dtype_layout_and_path(backend, device, loss, dtype, path):
    tree = H.random_tree(min_nodes=4, max_depth=6)
    # 2 x 7 x 67 pixels: partial 64-pixel blocks and partial G-pixel groups for every G
    x0, _ = H.inputs(tree, loss, (2, 7, 67), dtype)
    for name, x in _logit_views(x0):
        shape = (x.shape[0],) + tuple(x.shape[2:])
        _, y = H.inputs(tree, loss, shape, ignore_frac=0.2)
        cw, _ = _weights(tree, shape)
        for pw_name, pw in _pixel_weight_views(shape):
            for reduction in H.REDUCTIONS:
                for c, p in ((cw, None), (None, pw), (cw, pw)):
                    _check(loss, x, y, tree, reduction=reduction, class_weight=c, pixel_weight=p)


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("loss", H.NODE_LOSSES)
@pytest.mark.parametrize("opts", [dict(gamma=2.0), dict(gamma=0.0), dict(gamma=1.5, eps=1e-6)], ids=["g2", "g0", "any"])
def test_focal_modes(backend, device, loss, opts, path):
    tree = trees.load("vistas_v2")
    x, y = H.inputs(tree, loss, (1, 5, 9), ignore_frac=0.3)
    cw, pw = _weights(tree, y.shape)
    for reduction in H.REDUCTIONS:
        _check(loss, x, y, tree, reduction=reduction, class_weight=cw, pixel_weight=pw, **opts)


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("loss", H.NODE_LOSSES)
@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_upsampled(backend, device, loss, align_corners, dtype, path):
    """pixel_weight is read at the target's (full-resolution) pixel: the forward's kUp reads and the
    gathering backward's rows. The tree-min in a half dtype takes sizes whose interpolation weights are
    multiples of 1/64 (tests/test_upsample.py: otherwise two nodes' interpolated logits that tie exactly may
    differ in their last bit by the order of the operations, and the min/max pick either)."""
    tree = H.random_tree(min_nodes=4, max_depth=5)
    x, _ = H.inputs(tree, loss, (2, 3, 5), dtype)
    size = (7, 11)
    if loss == "tree_min_loss" and dtype in H.HALF:
        size = (9, 17) if align_corners else (12, 20)  # scales 1/4 and 1/4, exact
    _, y = H.inputs(tree, loss, (2,) + size, ignore_frac=0.2)
    cw, _ = _weights(tree, y.shape)
    for pw_name, pw in _pixel_weight_views(y.shape):
        for reduction in H.REDUCTIONS:
            for c, p in ((cw, None), (None, pw), (cw, pw)):
                _check(loss, x, y, tree, reduction=reduction, class_weight=c, pixel_weight=p, upsample="bilinear",
                       align_corners=align_corners)
    xc = x.contiguous(memory_format=torch.channels_last)
    _check(loss, xc, y, tree, class_weight=cw, pixel_weight=pw, upsample="bilinear", align_corners=align_corners)


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_one_pixel_and_no_labelled_pixel(backend, device, loss, path):
    tree = H.random_tree(min_nodes=3)
    for dtype in (torch.float32, torch.float64):
        x, y = H.inputs(tree, loss, (1, 1, 1), dtype, ignore_frac=0.0)
        cw, pw = _weights(tree, y.shape)
        for reduction in H.REDUCTIONS:
            _check(loss, x, y, tree, reduction=reduction, class_weight=cw, pixel_weight=pw)
        # no labelled pixel: 0 in every reduction, a zero gradient, whatever the weights (an ignored pixel's
        # weight is never read: inf or NaN there changes nothing)
        x, y = H.inputs(tree, loss, (2, 3, 5), dtype, ignore_frac=1.0, edges=False)
        pw = torch.full(y.shape, float("inf"), dtype=dtype)
        pw[0, 0, 0] = float("nan")
        for reduction in H.REDUCTIONS:
            out, g, _ = H.loss_and_grad(H.api(loss, "native"), x, y, tree, reduction=reduction, class_weight=cw,
                                        pixel_weight=pw)
            assert (out == 0).all() and (g == 0).all(), reduction
    # the same on upsampled logits
    x, _ = H.inputs(tree, loss, (1, 2, 2))
    y = torch.full((1, 5, 6), 255)
    for reduction in H.REDUCTIONS:
        out, g, _ = H.loss_and_grad(H.api(loss, "native"), x, y, tree, reduction=reduction, class_weight=cw,
                                    pixel_weight=torch.full(y.shape, float("inf")), upsample="bilinear")
        assert (out == 0).all() and (g == 0).all(), reduction


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_class_weights_summing_to_zero(backend, device, loss, path):
    """Labelled pixels whose class weights sum to 0: the mean is NaN (0 / 0, as F.cross_entropy), the sum 0;
    the reference says the same."""
    tree = H.random_tree(min_nodes=3)
    x, y = H.inputs(tree, loss, (1, 4, 6), ignore_frac=0.2)
    cw = torch.zeros(tree.num_leaves)
    for upsample in (None, "bilinear"):
        xx = x[:, :, :2, :3] if upsample else x
        want = H.api(loss, "reference")(xx, y, tree, class_weight=cw, upsample=upsample)
        got = H.api(loss, "native")(xx, y, tree, class_weight=cw, upsample=upsample)
        assert torch.isnan(want) and torch.isnan(got)
        _check(loss, xx, y, tree, reduction="sum", class_weight=cw, upsample=upsample)
        _check(loss, xx, y, tree, reduction="none", class_weight=cw, upsample=upsample)


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_bad_labels_keep_their_nan_and_read_no_weight(backend, device, loss, path):
    """A label outside [0, L) (the label check off) keeps its NaN loss and NaN gradient row and never indexes
    class_weight; the other pixels get their weighted values."""
    tree = H.random_tree(min_nodes=3)
    x, y = H.inputs(tree, loss, (1, 3, 9), ignore_frac=0.2)
    y[0, 1, 2] = tree.num_leaves + 1000
    y[0, 2, 4] = -7
    cw, pw = _weights(tree, y.shape)
    fn = getattr(hss_kernels, loss)
    bad = (y != 255) & ((y < 0) | (y >= tree.num_leaves))
    hss_kernels.set_label_check(False)
    try:
        a = x.clone().requires_grad_(True)
        out = fn(a, y, tree, reduction="none", class_weight=cw, pixel_weight=pw, backend="native")
        (g,) = torch.autograd.grad(out.sum(), a)
        for reduction in ("mean", "sum"):
            assert torch.isnan(fn(x, y, tree, reduction=reduction, class_weight=cw, pixel_weight=pw,
                                  backend="native"))
    finally:
        hss_kernels.set_label_check(True)
    assert torch.isnan(out[bad]).all() and not torch.isnan(out[~bad]).any()
    assert torch.isnan(g.permute(0, 2, 3, 1)[bad]).all() and not torch.isnan(g.permute(0, 2, 3, 1)[~bad]).any()
    good = y.masked_fill(bad, 255)
    want = H.api(loss, "reference")(x, good, tree, reduction="none", class_weight=cw, pixel_weight=pw)
    torch.testing.assert_close(out.detach()[~bad], want[~bad])


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_gradcheck(backend, device, loss, path):
    tree = H.random_tree(max_nodes=10)
    cw = torch.rand(tree.num_leaves, dtype=torch.float64) + 0.5
    x, y = H.inputs(tree, loss, (1, 3, 5), torch.float64)
    pw = torch.rand(y.shape, dtype=torch.float64) + 0.5
    fn = getattr(hss_kernels, loss)
    for reduction in H.REDUCTIONS:
        assert torch.autograd.gradcheck(
            lambda a: fn(a, y, tree, reduction=reduction, class_weight=cw, pixel_weight=pw, backend="native"),
            (x.clone().requires_grad_(True),))
    xl = x[:, :, :2, :3].clone().requires_grad_(True)
    for align_corners in (False, True):
        assert torch.autograd.gradcheck(
            lambda a: fn(a, y, tree, class_weight=cw, pixel_weight=pw.transpose(1, 2).contiguous().transpose(1, 2),
                         upsample="bilinear", align_corners=align_corners, backend="native"), (xl,))


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_weighted_sum_is_bitwise_deterministic(backend, device, loss):
    """The weighted loss, its weight sum (the mean's denominator) and the gradient: the same bits on every
    run and on one or two OpenMP threads (per-block partials in a fixed order)."""
    tree = trees.load("lip")
    x, y = H.inputs(tree, loss, (2, 33, 33), torch.float32)
    cw, pw = _weights(tree, y.shape)
    fn = H.api(loss, "native")
    threads = torch.get_num_threads()
    try:
        for upsample, xx in ((None, x), ("bilinear", x[:, :, :9, :8])):
            for reduction in ("mean", "sum"):
                runs = []
                for n in (1, 2, 1, 2):
                    torch.set_num_threads(n)
                    runs.append(H.loss_and_grad(fn, xx, y, tree, torch.ones(()), reduction=reduction,
                                                class_weight=cw, pixel_weight=pw, upsample=upsample))
                for out, g, _ in runs[1:]:
                    assert torch.equal(out, runs[0][0]) and torch.equal(g, runs[0][1]), (upsample, reduction)
    finally:
        torch.set_num_threads(threads)


def _op_args(tree, x, y, per_pixel, extrema, cw, pw, upsample=0):
    k = torch.rand(tree.num_nodes, dtype=H.acc_dtype(x.dtype)).to(x.device)
    return (x, y, tree_index(tree, x.device), k, tree.num_leaves, tree.depth, 2.0, 0.0, 255, per_pixel, extrema,
            upsample, False, cw, pw)


@pytest.mark.parametrize("extrema", [True, False])
def test_opcheck_with_weights(backend, device, extrema):
    tree = trees.load("cityscapes")
    for dtype in (torch.float32, torch.float64):
        x, y = H.inputs(tree, "tree_min_loss", (2, 3, 4), dtype, device=device)
        cw, pw = _weights(tree, y.shape, H.acc_dtype(dtype), device)
        for c, p in ((cw, None), (None, pw.transpose(1, 2).contiguous().transpose(1, 2)), (cw, pw)):
            for per_pixel in (False, True):
                args = _op_args(tree, x.clone().requires_grad_(), y, per_pixel, extrema, c, p)
                torch.library.opcheck(ops.tree_min_fwd.default, args)
                loss, count, weight_sum = ops.tree_min_fwd(*args)
                # the weight sum: class weights over the labelled pixels, the count without them
                labelled = y != 255
                want = cw[y[labelled]].sum() if c is not None else labelled.sum().to(weight_sum.dtype)
                assert weight_sum.dtype == H.acc_dtype(dtype) and weight_sum.shape == ()
                torch.testing.assert_close(weight_sum, want)
                assert int(count) == int(labelled.sum())
                bwd = (torch.randn_like(loss),) + tuple(a.detach() if torch.is_tensor(a) else a for a in args[:9]) + \
                    (extrema, 0, False, c, p)
                torch.library.opcheck(ops.tree_min_bwd.default, bwd)
        # fused upsampling, the weights at the target's size
        xl = x[:, :, :2, :3].contiguous()
        args = _op_args(tree, xl.clone().requires_grad_(), y, True, extrema, cw, pw, upsample=1)
        torch.library.opcheck(ops.tree_min_fwd.default, args)


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_compile_fullgraph(backend, device, loss):
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, loss, (1, 4, 5))
    cw, pw = torch.rand(19) + 0.25, torch.rand(y.shape) + 0.25
    for upsample, xx in ((None, x), ("bilinear", x[:, :, :2, :3].contiguous())):
        f = torch.compile(lambda a, t: getattr(hss_kernels, loss)(a, t, tree, class_weight=cw, pixel_weight=pw,
                                                                  upsample=upsample, backend="native"),
                          fullgraph=True, backend="aot_eager")
        H.assert_matches(lambda a, t, _tree, **_: f(a, t),
                         lambda a, t, tr, **_: H.api(loss, "reference")(a, t, tr, class_weight=cw, pixel_weight=pw,
                                                                        upsample=upsample), xx, y, tree)


def test_bad_weights_to_the_ops(backend, device):
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, "tree_min_loss", (2, 3, 4), device=device)
    cw, pw = _weights(tree, y.shape, device=device)
    cases = [
        (cw, pw.double(), "pixel_weight must be Float, got Double"),
        (cw, pw.long(), "pixel_weight must be Float, got Long"),
        (cw, pw[:, :2], "pixel_weight must have the target's shape \\[2, 3, 4\\], got \\[2, 2, 4\\]"),
        (cw, pw.reshape(2, 12), "pixel_weight must have the target's shape"),
        (cw[:5], pw, "class_weight must be contiguous with 19 elements"),
        (cw.double(), pw, "class_weight must be Float, got Double"),
    ]
    if device != "cpu":
        cases += [(cw, pw.cpu(), "pixel_weight is on cpu"), (cw.cpu(), pw, "class_weight is on cpu")]
    for c, p, match in cases:
        for per_pixel in (False, True):
            with pytest.raises(RuntimeError, match=match):
                ops.tree_min_fwd(*_op_args(tree, x, y, per_pixel, True, c, p))
        g = torch.randn(y.shape, device=device)
        with pytest.raises(RuntimeError, match=match):
            ops.tree_min_bwd(g, *_op_args(tree, x, y, True, True, c, p)[:9], True, 0, False, c, p)


@pytest.mark.parametrize("device", ["cpu"])
@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_weights_that_require_grad_get_it(backend, device, loss):
    """The fused kernels give the weights no gradient: weights that require one go through the composition,
    and get the reference's gradient."""
    tree = H.random_tree(min_nodes=3)
    x, y = H.inputs(tree, loss, (1, 3, 4))
    cw0, pw0 = _weights(tree, y.shape)
    grads = []
    for b in ("native", "reference"):
        cw, pw = cw0.clone().requires_grad_(True), pw0.clone().requires_grad_(True)
        out = getattr(hss_kernels, loss)(x, y, tree, class_weight=cw, pixel_weight=pw, backend=b)
        grads.append(torch.autograd.grad(out, (cw, pw)))
    for g, want in zip(*grads):
        torch.testing.assert_close(g, want)
