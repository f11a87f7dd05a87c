"""Low-resolution logits (``upsample="bilinear"``, ``decode(size=...)``): every backend against the composition
``loss(F.interpolate(logits.float(), size, mode="bilinear", align_corners), target)`` on fresh random inputs
and trees (values, and gradients with respect to the low-resolution logits), a flat tree against
``F.interpolate`` + ``F.cross_entropy``, gradcheck in float64, the ops' schemas (opcheck), torch.compile,
determinism across thread counts, and the errors for bad sizes and modes. The native CPU kernels, the Triton
losses and every backend's decode (Triton here under its interpreter on the CPU) fuse the interpolation; the
reference interpolates first."""
import pytest
import torch
import torch.nn.functional as F

import hss_kernels
from hss_kernels import reference, tables, trees
from hss_kernels.tables import decode_walk, tree_index
from hss_kernels.tree import Tree

import helpers as H

ops = torch.ops.hss_kernels

# (N, h, w, H, W): odd non-integer scales, integer 4x, equal size, one source pixel, one axis only,
# a scale below 2 in one axis and above in the other.
SHAPES = [(2, 3, 5, 7, 11), (1, 4, 4, 16, 16), (2, 5, 6, 5, 6), (1, 1, 1, 3, 4), (1, 2, 3, 2, 9), (2, 4, 3, 9, 5)]


def _inputs(tree, loss, shape, dtype=torch.float32, device="cpu", ignore_frac=0.1):
    N, h, w, Hh, W = shape
    x, _ = H.inputs(tree, loss, (N, h, w), dtype, device=device)
    _, y = H.inputs(tree, loss, (N, Hh, W), dtype, device=device, ignore_frac=ignore_frac)
    return x, y


def _composed(loss):
    """The spec: interpolate in the accumulation dtype, then the reference loss."""
    def f(x, y, tree, upsample=None, align_corners=False, **kw):
        return getattr(reference, loss)(reference.upsample_logits(x, y.shape[-2:], align_corners), y, tree, **kw)
    return f


def _check(loss, backend, x, y, tree, **kw):
    tol = H.loss_tolerance(loss, x, tree)
    return H.assert_matches(H.api(loss, backend), _composed(loss), x, y, tree, loss_tol=tol, upsample="bilinear",
                            **kw)


@pytest.fixture
def native():
    H.require("native", "cpu")


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", H.LOSSES)
def test_native_matches_composition(native, loss, shape, align_corners):
    """Every dtype. Half-precision logits take few values, so two nodes' interpolated logits are often
    equal in exact arithmetic yet differ in their last float32 bit, by the order of the operations (the
    fused kernel's and F.interpolate's differ): the tree-min's ancestor-min/descendant-max may then pick
    either, with a different gradient. So the tree-min takes half dtypes only where every weight is
    exact (float32 and float64 logits on every shape; its half dtypes on the shapes below)."""
    tree = H.random_tree()
    for dtype in H.DTYPES:
        if loss == "tree_min_loss" and dtype in H.HALF and not H.weights_exact(shape, align_corners):
            continue
        x, y = _inputs(tree, loss, shape, dtype)
        _check(loss, "native", x, y, tree, align_corners=align_corners)


@pytest.mark.parametrize("shape", [(2, 3, 4, 12, 16), (1, 5, 3, 17, 5), (2, 4, 4, 8, 16)],
                         ids=lambda s: "x".join(map(str, s)))
def test_native_tree_min_half_exact_weights(native, shape):
    """The tree-min in half dtypes where the weights are exact (integer scales, and align_corners with
    (h - 1) / (H - 1) = 1/4)."""
    tree = H.random_tree()
    for align_corners in (False, True):
        if not H.weights_exact(shape, align_corners):
            continue
        for dtype in H.HALF:
            x, y = _inputs(tree, "tree_min_loss", shape, dtype)
            _check("tree_min_loss", "native", x, y, tree, align_corners=align_corners)


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", [(1, 3, 29, 5, 150), (2, 2, 20, 4, 160), (1, 2, 70, 3, 131)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("loss", H.LOSSES)
def test_native_rows_longer_than_a_block(native, loss, shape, align_corners):
    """Destination rows wider than the CPU kernels' block (64 pixels), so that the backward's runs start
    mid-row and the source column at a run's edge takes terms from two runs: a non-integer scale, an
    integer 8x and a scale below 2; float32 and float64."""
    tree = H.random_tree()
    for dtype in (torch.float32, torch.float64):
        x, y = _inputs(tree, loss, shape, dtype)
        _check(loss, "native", x, y, tree, align_corners=align_corners)


@pytest.mark.parametrize("loss", H.LOSSES)
def test_native_options_and_reductions(native, loss):
    tree = H.random_tree(min_depth=2)
    x, y = _inputs(tree, loss, (2, 3, 4, 10, 9))
    extra = [dict(eps=1e-4)] if loss == "hierarchical_softmax_loss" else [
        dict(gamma=0.0), dict(gamma=1.0), dict(gamma=2.5, eps=1e-6), dict(normalize="node", scale=5.0)]
    for kw in [{}] + extra:
        for reduction in H.REDUCTIONS:
            _check(loss, "native", x, y, tree, reduction=reduction, **kw)
    if loss == "hierarchical_softmax_loss":
        _check(loss, "native", x, y, tree, level_weights=[0.5 + i for i in range(tree.depth)])


@pytest.mark.parametrize("loss", H.LOSSES)
def test_native_layouts(native, loss):
    """NCHW, channels_last, and strided views of the low-resolution logits; a strided target; an upstream
    gradient of any strides (reduction none)."""
    tree = H.random_tree()
    C = H.channels(tree, loss)
    base = torch.randn(2, C, 6, 10, dtype=torch.float64).float() * 3
    views = [base, base.contiguous(memory_format=torch.channels_last), base[:, :, 1:5, ::3],
             base.contiguous(memory_format=torch.channels_last)[:, :, ::2, 2:7]]
    for x in views:
        y = torch.randint(0, tree.num_leaves, (2, 2 * x.shape[3] + 1, x.shape[2] * 3)).transpose(1, 2)
        y[:, 0, 0] = 255
        for go in H.grad_outs(tuple(y.shape)):
            _check(loss, "native", x, y, tree, grad_out=go, reduction="none")


def test_flat_tree_is_cross_entropy(native):
    """A flat tree: the hierarchical softmax is F.cross_entropy of the interpolated logits."""
    tree = Tree.from_parents([-1] * 7)
    x = torch.randn(2, 7, 5, 6, requires_grad=True)
    y = torch.randint(0, 7, (2, 17, 13))
    y[0, :3] = 255
    for align_corners in (False, True):
        got = hss_kernels.hierarchical_softmax_loss(x, y, tree, backend="native", upsample="bilinear",
                                                    align_corners=align_corners)
        up = F.interpolate(x, size=(17, 13), mode="bilinear", align_corners=align_corners)
        want = F.cross_entropy(up, y, ignore_index=255)
        (g,) = torch.autograd.grad(got, x)
        (g_want,) = torch.autograd.grad(want, x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g, g_want, rtol=1e-4, atol=1e-7)


def _all_ignored_and_empty_batch(backend, loss, tree):
    """Every pixel ignored (as the composition, every reduction), and a batch of no image: zeros, and a
    gradient of the low-resolution shape."""
    x, y = _inputs(tree, loss, (2, 3, 3, 7, 8))
    y.fill_(255)
    for reduction in H.REDUCTIONS:
        _check(loss, backend, x, y, tree, reduction=reduction)
    x0, y0 = x[:0].clone(), y[:0].clone()
    for reduction in H.REDUCTIONS:
        a = x0.requires_grad_(True)
        out = getattr(hss_kernels, loss)(a, y0, tree, backend=backend, upsample="bilinear", reduction=reduction)
        assert out.shape == ((0, 7, 8) if reduction == "none" else ()) and (out == 0).all()
        (g,) = torch.autograd.grad(out.sum(), a)
        assert g.shape == a.shape


@pytest.mark.parametrize("loss", H.LOSSES)
def test_all_ignored_and_empty_batch(native, loss):
    _all_ignored_and_empty_batch("native", loss, H.random_tree())


@pytest.mark.parametrize("loss", H.LOSSES)
def test_nan_and_bad_labels(native, loss):
    """A NaN low-resolution logit poisons the pixels whose stencil reads it, a label out of range its pixel:
    as in the composition (the label check is off for the bad label)."""
    tree = H.random_tree()
    x, y = _inputs(tree, loss, (1, 3, 4, 7, 9), ignore_frac=0.0)
    x[0, 0, 1, 2] = float("nan")
    got, g, go = H.loss_and_grad(H.api(loss, "native"), x, y, tree, upsample="bilinear", reduction="none")
    want, g_want, _ = H.loss_and_grad(_composed(loss), x, y, tree, go, reduction="none")
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).any()
    assert torch.equal(torch.isnan(g), torch.isnan(g_want))
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], **H.loss_tolerance(loss, x, tree))
    hss_kernels.set_label_check(False)
    try:
        x2, y2 = _inputs(tree, loss, (1, 2, 2, 5, 5), ignore_frac=0.0)
        y2[0, 4, 4] = tree.num_leaves
        out = getattr(hss_kernels, loss)(x2, y2, tree, backend="native", upsample="bilinear", reduction="none")
        assert torch.isnan(out[0, 4, 4]) and torch.isfinite(out.flatten()[:-1]).all()
    finally:
        hss_kernels.set_label_check(True)


@pytest.mark.parametrize("loss", H.LOSSES)
def test_gradcheck_float64(native, loss):
    tree = H.random_tree(max_nodes=8)
    x, y = _inputs(tree, loss, (1, 2, 3, 5, 7))
    x = x.double().requires_grad_(True)
    fn = getattr(hss_kernels, loss)
    for align_corners in (False, True):
        assert torch.autograd.gradcheck(
            lambda a: fn(a, y, tree, backend="native", upsample="bilinear", align_corners=align_corners,
                         reduction="sum"), (x,))


@pytest.mark.parametrize("loss", H.LOSSES)
def test_backward_deterministic_across_threads(native, loss):
    """Bitwise the same gradient with 1 and 2 threads and on repeated calls (no atomics: a fixed order)."""
    tree = H.random_tree()
    x, y = _inputs(tree, loss, (2, 9, 7, 37, 29))
    fn = H.api(loss, "native")
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = H.loss_and_grad(fn, x, y, tree, upsample="bilinear")
        torch.set_num_threads(2)
        two = H.loss_and_grad(fn, x, y, tree, grad_out=one[2], upsample="bilinear")
        again = H.loss_and_grad(fn, x, y, tree, grad_out=one[2], upsample="bilinear")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1]) and torch.equal(two[1], again[1])


def test_saves_no_full_size_logits(native):
    """Autograd keeps the low-resolution logits and the per-pixel statistics, never a full-resolution
    tensor of the logits' channels."""
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, "hierarchical_softmax_loss", (1, 4, 4, 32, 32))
    x = x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = hss_kernels.hierarchical_softmax_loss(x, y, tree, backend="native", upsample="bilinear")
    full = tree.num_leaves * y.numel()
    assert saved and max(t.numel() for t in saved) < full, [tuple(t.shape) for t in saved]
    out.backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("loss", H.LOSSES)
def test_cuda_form_on_the_cpu(native, loss, align_corners, monkeypatch):
    """HSS_CPU_PIXEL_PATH=1: the per-pixel code the CUDA kernels run (csrc/include/upsample_math.h): the
    forward reading four source values per channel, the backward one source pixel at a time gathering its
    window of destination pixels; against the composition, with ignored pixels, a bad label's NaN, a NaN
    logit, every dtype, odd and integer scales, strided logits."""
    monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")
    tree = H.random_tree()
    for shape in SHAPES:
        for dtype in H.DTYPES:
            if loss == "tree_min_loss" and dtype in H.HALF and not H.weights_exact(shape, align_corners):
                continue
            x, y = _inputs(tree, loss, shape, dtype)
            _check(loss, "native", x, y, tree, align_corners=align_corners, reduction="sum")
    C = H.channels(tree, loss)
    x = (torch.randn(2, C, 5, 9, dtype=torch.float64) * 3).float().contiguous(memory_format=torch.channels_last)
    x = x[:, :, 1:, ::2]
    y = torch.randint(0, tree.num_leaves, (2, 11, 13))
    y[0, :2] = 255
    _check(loss, "native", x, y, tree, align_corners=align_corners, reduction="none")
    x[1, 0, 2, 3] = float("nan")
    got, g, go = H.loss_and_grad(H.api(loss, "native"), x, y, tree, upsample="bilinear", reduction="none",
                                 align_corners=align_corners)
    want, g_want, _ = H.loss_and_grad(_composed(loss), x, y, tree, go, reduction="none", align_corners=align_corners)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).any()
    assert torch.equal(torch.isnan(g), torch.isnan(g_want))


@pytest.mark.parametrize("align_corners", [False, True])
def test_cuda_form_decode_on_the_cpu(native, align_corners, monkeypatch):
    """HSS_CPU_PIXEL_PATH=1: decode_math.h's walk reading each channel through BilinearCol, what the CUDA
    kernel's kUp instantiation runs: every shape, dtype, activation and score, node and leaf logits, strided
    logits and NaN, against the reference (and the CPU's float path)."""
    monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")
    tree = H.random_tree(min_depth=2)
    for N, h, w, Hh, W in SHAPES:
        for C in (tree.num_nodes, tree.num_leaves):
            for dtype in H.DTYPES:
                x = H.random_logits(C, (N, h, w), dtype)
                for act in H.ACTIVATIONS:
                    for score in H.SCORES:
                        got = hss_kernels.decode(x, tree, act, score, backend="native", size=(Hh, W),
                                                 align_corners=align_corners)
                        H.assert_decode_size_like_reference(got, x, tree, act, score, (Hh, W), align_corners)
    x = H.random_logits(tree.num_nodes, (2, 5, 9)).contiguous(memory_format=torch.channels_last)[:, :, 1:, ::2]
    x[1, tree.num_nodes - 1, 1, 3] = float("nan")  # (random trees may have 2 nodes)
    got = hss_kernels.decode(x, tree, "softmax", backend="native", size=(8, 13), align_corners=align_corners)
    H.assert_decode_size_like_reference(got, x, tree, "softmax", "sum", (8, 13), align_corners)
    monkeypatch.delenv("HSS_CPU_PIXEL_PATH")
    fast = hss_kernels.decode(x, tree, "softmax", backend="native", size=(8, 13), align_corners=align_corners)
    H.assert_decode_size_like_reference(fast, x, tree, "softmax", "sum", (8, 13), align_corners)


# ------------------------------------------------------------------------------------- decode
@pytest.mark.parametrize("align_corners", [False, True])
def test_decode_size(native, align_corners):
    tree = H.random_tree()
    for C in (tree.num_nodes, tree.num_leaves):
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            x = H.random_logits(C, (2, 3, 5), dtype)
            for act in H.ACTIVATIONS:
                got = hss_kernels.decode(x, tree, activation=act, backend="native", size=(8, 13),
                                         align_corners=align_corners)
                want = reference.decode(x, tree, activation=act, size=(8, 13), align_corners=align_corners)
                assert got.shape == (2, 8, 13) and got.dtype == torch.int64
                # ties between path scores within a rounding step may go either way
                scores = reference.path_scores(reference.upsample_logits(x, (8, 13), align_corners), tree, act)
                best = scores.max(dim=1).values
                picked = scores.gather(1, got[:, None]).squeeze(1)
                assert torch.all(picked >= best - 1e-5 * best.abs().clamp(min=1)), (got != want).sum()
                assert (got == want).float().mean() > 0.95


@pytest.mark.parametrize("align_corners", [False, True])
def test_decode_fused_every_backend(backend, device, align_corners, monkeypatch):
    """decode(size=) fused in every backend's kernel (native CPU and CUDA, Triton: the upsampled logits never
    exist, reference.upsample_logits is never called): odd non-integer, integer and equal scales, one source
    pixel, node and leaf logits, every activation and score, dtypes, channels_last and a strided view, NaN."""
    tree = H.random_tree(H.sized(device, 14, 30), min_depth=2)
    impl = hss_kernels.backends.resolve("decode", backend, torch.device(device))
    assert getattr(impl, "takes_upsample", False)
    shapes = H.sized(device, [SHAPES[0], SHAPES[1], SHAPES[3], SHAPES[5]], SHAPES + [(2, 17, 9, 67, 40)])
    dtypes = H.sweep(backend, device, H.DTYPES, (torch.float32, torch.bfloat16, torch.float64))
    for N, h, w, Hh, W in shapes:
        for C in (tree.num_nodes, tree.num_leaves):
            for dtype in dtypes:
                x = H.random_logits(C, (N, h, w), dtype, device=device)
                for act in H.ACTIVATIONS:
                    for score in H.sweep(backend, device, H.SCORES, ("mean",)):
                        with monkeypatch.context() as m:
                            m.setattr(reference, "upsample_logits", _not_called)
                            got = hss_kernels.decode(x, tree, act, score, backend=backend, size=(Hh, W),
                                                     align_corners=align_corners)
                        H.assert_decode_size_like_reference(got, x, tree, act, score, (Hh, W), align_corners)
                    if C == tree.num_leaves:
                        break  # activation and score do not apply to leaf logits
    x = H.random_logits(tree.num_nodes, (2, 9, 7), device=device)
    cl = x.contiguous(memory_format=torch.channels_last)
    view = H.random_logits(tree.num_nodes, (2, 12, 10), device=device)[:, :, 1::2, ::2]
    x[1, 3, 2, 4] = float("nan")
    cl[1, 3, 2, 4] = float("nan")
    for a in (x, cl, view):
        got = hss_kernels.decode(a, tree, "softmax", "sum", backend=backend, size=(20, 19), align_corners=align_corners,
                                 ignore_index=-1)
        H.assert_decode_size_like_reference(got, a, tree, "softmax", "sum", (20, 19), align_corners, -1)
    assert int((hss_kernels.decode(x, tree, backend=backend, size=(20, 19)) == 255).sum()) >= 4  # the stencil


def _not_called(*args, **kwargs):
    raise AssertionError("the logits were interpolated outside the kernel")


# ------------------------------------------------------------------------------------- Triton, fused
HS = "hierarchical_softmax_loss"


@pytest.fixture
def triton_hs():
    H.require("triton", "cpu", HS)
    from hss_kernels.triton import hierarchical_softmax
    return hierarchical_softmax


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_composition(triton_hs, device, shape, align_corners):
    """The fused forward and backward against the composition, every dtype."""
    H.require("triton", device, HS)
    tree = H.random_tree()
    for dtype in H.DTYPES:
        x, y = _inputs(tree, HS, shape, dtype, device=device)
        _check(HS, "triton", x, y, tree, align_corners=align_corners)


@pytest.mark.parametrize("align_corners", [False, True])
def test_triton_chunks_and_tiles(triton_hs, align_corners):
    """The backward's leaf chunks (20 leaves: 8 + 8 + 4, float64 4 at a time) and its tiles (under the
    interpreter 4 x 4 runs with a one-run halo: 3 x 2 tiles per image here), both eps forms, per-pixel
    grad_output."""
    tree = trees.load("lip")
    for dtype, kw in ((torch.float32, {}), (torch.float64, dict(eps=0.05)), (torch.bfloat16, {})):
        x, y = _inputs(tree, HS, (2, 7, 5, 20, 17), dtype)
        go = torch.rand(y.shape, dtype=H.acc_dtype(dtype))
        _check(HS, "triton", x, y, tree, align_corners=align_corners, reduction="none", grad_out=go, **kw)


@pytest.mark.parametrize("align_corners", [False, True])
def test_triton_forward_gpu_tiles(triton_hs, align_corners, monkeypatch):
    """The upsampled forward with the tiles a GPU launch takes (hierarchical_softmax._up_blocks compiled: chunks
    of 16 leaves, 256 pixels per program), under the interpreter: 20 leaves (a full chunk and a last one of 4),
    two images of several programs each, the last one partial (its pixels clamped to the image's last), a pixel
    whose groups underflow next to its max (the cold branch), float32 NCHW and channels_last, bfloat16."""
    monkeypatch.setattr(triton_hs, "_up_blocks", lambda logits: (16, 256, 4))
    tree = trees.load("lip")
    for dtype in (torch.float32, torch.bfloat16):
        x, y = _inputs(tree, HS, (2, 7, 5, 19, 21), dtype)
        x[0, :, 2, 3] = -200.0
        x[0, 0, 2, 3] = 200.0
        layouts = (x, x.contiguous(memory_format=torch.channels_last)) if dtype == torch.float32 else (x,)
        for xx in layouts:
            _check(HS, "triton", xx, y, tree, align_corners=align_corners, reduction="none")


def test_triton_is_fused(triton_hs):
    """functional.py hands every Triton loss the low-resolution logits."""
    from hss_kernels import triton as T
    assert T.hierarchical_softmax_loss.takes_upsample
    assert T.tree_min_loss.takes_upsample and T.tree_bce_loss.takes_upsample


def test_triton_channel_stride_compiled_in_or_read(triton_hs, monkeypatch):
    """_common.up_sxc compiles the low-resolution logits' channel stride into the fused kernels (SXC) for the
    first UP_SXC_LIMIT distinct strides of a process and reads it at run time after them, for a stride of 1 and
    for one channel; every fused Triton kernel (the three losses' forwards, the tree losses' rows kernel and the
    hierarchical softmax's backward, decode) matches the composition both ways, on NCHW logits of two sizes
    (channel strides 15 and 18)."""
    from hss_kernels.triton import _common as TC
    seen = set()
    monkeypatch.setattr(TC, "_up_sxc_seen", seen)
    monkeypatch.setattr(TC, "UP_SXC_LIMIT", 2)
    assert TC.up_sxc(torch.empty(1, 3, 4, 5)) == 20 and TC.up_sxc(torch.empty(2, 3, 4, 5)) == 20
    assert TC.up_sxc(torch.empty(1, 3, 2, 5)) == 10
    assert TC.up_sxc(torch.empty(1, 3, 2, 7)) == 0 and seen == {20, 10}  # a third stride: read at run time
    assert TC.up_sxc(torch.empty(1, 3, 4, 5)) == 20  # still compiled in
    assert TC.up_sxc(torch.empty(1, 3, 4, 5).contiguous(memory_format=torch.channels_last)) == 0
    assert TC.up_sxc(torch.empty(1, 1, 4, 5)) == 0
    calls = []
    monkeypatch.setattr(TC, "up_sxc", lambda logits, _f=TC.up_sxc: calls.append(_f(logits)) or calls[-1])
    tree = H.random_tree(min_depth=2, min_leaves=2)  # one leaf: the hierarchical softmax's one channel reads it
    for limit in (0, 8):
        monkeypatch.setattr(TC, "UP_SXC_LIMIT", limit)
        seen.clear()
        del calls[:]
        for loss in H.LOSSES:
            x, y = _inputs(tree, loss, (2, 3, 5, 9, 14))
            wide = torch.randn(2, x.shape[1], 3, 6, dtype=torch.float64).float() * 3
            for xx in (x, wide):
                _check(loss, "triton", xx, y, tree, reduction="none")
        for act in ("sigmoid", "softmax"):
            xv = H.random_logits(tree.num_nodes, (2, 3, 5))
            got = hss_kernels.decode(xv, tree, act, backend="triton", size=(9, 14))
            H.assert_decode_size_like_reference(got, xv, tree, act, "sum", (9, 14), False)
        assert calls and (set(calls) == {0} if limit == 0 else set(calls) == {15, 18}), set(calls)


def test_triton_options_and_reductions(triton_hs):
    tree = H.random_tree(min_depth=2)
    x, y = _inputs(tree, HS, (2, 3, 4, 10, 9))
    weights = [0.5 + i for i in range(tree.depth)]
    for kw in ({}, dict(eps=1e-4), dict(level_weights=weights), dict(eps=0.1, level_weights=weights)):
        for reduction in H.REDUCTIONS:
            _check(HS, "triton", x, y, tree, reduction=reduction, align_corners=reduction == "sum", **kw)


def test_triton_layouts(triton_hs):
    """NCHW, channels_last, strided views of the low-resolution logits (the gradient in their layout); a
    strided target; an upstream gradient of any strides (reduction none)."""
    tree = H.random_tree()
    C = tree.num_leaves
    base = torch.randn(2, C, 6, 10, dtype=torch.float64).float() * 3
    views = [base, base.contiguous(memory_format=torch.channels_last), base[:, :, 1:5, ::3],
             base.contiguous(memory_format=torch.channels_last)[:, :, ::2, 2:7]]
    for k, x in enumerate(views):
        y = torch.randint(0, tree.num_leaves, (2, 2 * x.shape[3] + 1, x.shape[2] * 3)).transpose(1, 2)
        y[:, 0, 0] = 255
        for go in H.grad_outs(tuple(y.shape)):
            _check(HS, "triton", x, y, tree, grad_out=go, reduction="none", align_corners=k % 2 == 1)
        _check(HS, "triton", x, y, tree, eps=1e-4)
    a = base.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = torch.randint(0, tree.num_leaves, (2, 13, 21))
    hss_kernels.hierarchical_softmax_loss(a, y, tree, backend="triton", upsample="bilinear").backward()
    assert a.grad.stride() == a.stride()


def test_triton_all_ignored_and_empty_batch(triton_hs):
    tree = H.random_tree()
    x, y = _inputs(tree, HS, (2, 3, 3, 7, 8))
    y.fill_(255)
    for reduction in H.REDUCTIONS:
        _check(HS, "triton", x, y, tree, reduction=reduction)
    x0, y0 = x[:0].clone(), y[:0].clone()
    for reduction in H.REDUCTIONS:
        a = x0.requires_grad_(True)
        out = hss_kernels.hierarchical_softmax_loss(a, y0, tree, backend="triton", upsample="bilinear",
                                                    reduction=reduction)
        assert out.shape == ((0, 7, 8) if reduction == "none" else ()) and (out == 0).all()
        (g,) = torch.autograd.grad(out.sum(), a)
        assert g.shape == a.shape


def _triton_nan_like_composition(loss, x, y, tree, align_corners):
    """The Triton loss with a NaN among the low-resolution logits: the same NaN pixels and gradient elements
    as the composition, the other values close; with the NaN pixels' labels ignored, all finite."""
    kw = dict(reduction="none", align_corners=align_corners)
    got, g, go = H.loss_and_grad(H.api(loss, "triton"), x, y, tree, upsample="bilinear", **kw)
    want, g_want, _ = H.loss_and_grad(_composed(loss), x, y, tree, go, **kw)
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isnan(got).any()
    assert torch.equal(torch.isnan(g), torch.isnan(g_want))
    ok = ~torch.isnan(want)
    torch.testing.assert_close(got[ok], want[ok], **H.loss_tolerance(loss, x, tree))
    y_ign = y.clone()
    y_ign[torch.isnan(want)] = 255
    got, g, _ = H.loss_and_grad(H.api(loss, "triton"), x, y_ign, tree, upsample="bilinear", **kw)
    assert torch.isfinite(got).all() and torch.isfinite(g).all()


@pytest.mark.parametrize("align_corners", [False, True])
def test_triton_nan_and_bad_labels(triton_hs, align_corners):
    """A NaN low-resolution logit poisons the pixels whose stencil reads it and, through the backward, every
    low-resolution element those pixels' stencils hold (weight 0 included), as in the composition; an
    ignored pixel's NaN logits reach nothing; a label out of range poisons its pixel."""
    tree = H.random_tree()
    x, y = _inputs(tree, HS, (1, 3, 4, 7, 9), ignore_frac=0.0)
    x[0, 0, 1, 2] = float("nan")
    _triton_nan_like_composition(HS, x, y, tree, align_corners)
    hss_kernels.set_label_check(False)
    try:
        x2, y2 = _inputs(tree, HS, (1, 2, 2, 5, 5), ignore_frac=0.0)
        y2[0, 4, 4] = tree.num_leaves
        out = hss_kernels.hierarchical_softmax_loss(x2, y2, tree, backend="triton", upsample="bilinear",
                                                    reduction="none")
        assert torch.isnan(out[0, 4, 4]) and torch.isfinite(out.flatten()[:-1]).all()
    finally:
        hss_kernels.set_label_check(True)


def test_triton_offsets_past_2_31(triton_hs):
    """Low-resolution logits whose offsets pass 2^31 (H.far_views: a batch stride putting image 2 past it, a
    channel stride putting the last leaves past it: the forward's 64-bit path within an image), upsampled: loss
    and gradient equal the composition's on a compact copy."""
    tree = trees.load("cityscapes")
    for view in H.far_views(tree.num_leaves):
        compact = (torch.randn(view.shape) * 3).to(torch.bfloat16)
        view.copy_(compact)
        y = torch.randint(0, tree.num_leaves, (view.shape[0], 4, 6))
        a = view.requires_grad_(True)
        got = hss_kernels.hierarchical_softmax_loss(a, y, tree, backend="triton", upsample="bilinear",
                                                    reduction="none")
        go = torch.randn(got.shape)
        (g,) = torch.autograd.grad(got, a, go)
        want, g_want, _ = H.loss_and_grad(_composed(HS), compact, y, tree, go, reduction="none")
        torch.testing.assert_close(got, want, **H.loss_tolerance(HS, compact, tree))
        H.assert_grad_close(g, g_want, torch.bfloat16, H.upstream_size(go, y, "none"))
        del view, a, got, g


def test_triton_gradcheck_float64(triton_hs):
    tree = H.random_tree(max_nodes=8, min_depth=2)
    x, y = _inputs(tree, HS, (1, 2, 3, 5, 7))
    x = x.double().requires_grad_(True)
    for align_corners, kw in ((False, dict(reduction="sum")), (True, dict(reduction="mean", eps=0.1))):
        assert torch.autograd.gradcheck(
            lambda a: hss_kernels.hierarchical_softmax_loss(a, y, tree, backend="triton", upsample="bilinear",
                                                            align_corners=align_corners, **kw), (x,))


def test_triton_backward_bitwise_deterministic(triton_hs):
    """Repeated calls give the same loss and gradient to the bit (float64: a reordered sum would show);
    several programs of the gathering backward, and of the mean's partial sums (reduction none's per-pixel
    upstream gradient: test_triton_chunks_and_tiles)."""
    tree = trees.load("lip")
    x, y = _inputs(tree, HS, (2, 9, 13, 19, 27), torch.float64)
    H.assert_bitwise_deterministic(H.api(HS, "triton"), x, y, tree, runs=2, upsample="bilinear", reduction="mean")


def test_triton_saves_no_full_size_logits(triton_hs):
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, HS, (1, 4, 4, 16, 16))
    x = x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = hss_kernels.hierarchical_softmax_loss(x, y, tree, backend="triton", upsample="bilinear")
    full = tree.num_leaves * y.numel()
    assert saved and max(t.numel() for t in saved) < full, [tuple(t.shape) for t in saved]
    out.backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_triton_rejects_single_pass_and_bad_modes(triton_hs):
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, HS, (1, 3, 3, 9, 9))
    with pytest.raises(ValueError, match="single_pass does not take upsample"):
        triton_hs.hierarchical_softmax_loss(x, y, tree, single_pass=True, upsample="bilinear")
    with pytest.raises(ValueError, match="upsample must be None or 'bilinear'"):
        triton_hs.hierarchical_softmax_loss(x, y, tree, upsample="nearest")
    with pytest.raises(ValueError, match="H >= h, W >= w"):
        triton_hs.hierarchical_softmax_loss(x, y[:, :2], tree, upsample="bilinear")


def test_triton_opcheck(triton_hs):
    """The new ops' schemas, fakes and autograd registration: NCHW float32 mean, channels_last float32 sum with
    eps and align_corners, a non-dense float64 view with reduction none and a stride-0 grad_output."""
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, HS, (2, 3, 4, 7, 9))
    views = [x, x.contiguous(memory_format=torch.channels_last), x.double()[:, :, :, 1:]]
    for k, (xv, reduction, eps) in enumerate(zip(views, ("mean", "sum", "none"), (0.0, 1e-4, 0.0))):
        group, w = triton_hs._tables(tree, [1.0, 0.5, 2.0], H.acc_dtype(xv.dtype), "cpu")
        args = (xv.clone().requires_grad_(), y, group, w, eps, 255, reduction, k == 1)
        torch.library.opcheck(torch.ops.hss_triton.hierarchical_softmax_up_fwd.default, args)
        loss, stats, count, _ = torch.ops.hss_triton.hierarchical_softmax_up_fwd(*args)
        go = torch.randn(loss.shape, dtype=loss.dtype)
        if reduction == "none":
            go = go[:, :1].expand(loss.shape)
        torch.library.opcheck(torch.ops.hss_triton.hierarchical_softmax_up_bwd.default,
                              (go, xv, y, group, w, stats.detach(), count, eps, 255, reduction, k == 1))


def test_triton_compile_fullgraph(triton_hs):
    assert "triton" in hss_kernels.available_backends("cpu")  # Dynamo cannot trace the registry's lazy import
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, HS, (1, 3, 4, 9, 10))
    for reduction in ("mean", "none"):
        f = torch.compile(lambda a, t: hss_kernels.hierarchical_softmax_loss(
            a, t, tree, backend="triton", upsample="bilinear", align_corners=True, reduction=reduction),
            fullgraph=True, backend="aot_eager")
        H.assert_matches(lambda a, t, _tree, **_: f(a, t), _composed(HS), x, y, tree, reduction=reduction,
                         align_corners=True, loss_tol=H.loss_tolerance(HS, x, tree))
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------- Triton tree-min and BCE, fused
# Under the interpreter the gathering backward walks the whole tree once per window pixel: small trees and
# images (SHAPES but the 4x one), each dtype on some of the shapes.
NODE_SHAPES = [s for s in SHAPES if s != (1, 4, 4, 16, 16)]


@pytest.fixture
def triton_node():
    H.require("triton", "cpu", "tree_min_loss")
    from hss_kernels.triton import tree_min
    return tree_min


def _node_dtype(loss, shape, align_corners, k):
    """The k-th dtype of the sweep; the tree-min's half dtypes only where the weights are exact (see
    test_native_matches_composition), float32 in their place elsewhere."""
    dtype = H.DTYPES[k % len(H.DTYPES)]
    if loss == "tree_min_loss" and dtype in H.HALF and not H.weights_exact(shape, align_corners):
        return torch.float32
    return dtype


@pytest.mark.parametrize("align_corners", [False, True])
@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_triton_node_matches_composition(triton_node, device, loss, align_corners):
    """The fused forward and the gathering backward against the composition: every shape of NODE_SHAPES, the
    dtypes in turn (float64 and float32 on every loss, the half dtypes where exact for the tree-min)."""
    H.require("triton", device, loss)
    tree = H.random_tree(min_nodes=9, max_nodes=11)  # two node groups of the kernels
    for k, shape in enumerate(NODE_SHAPES):
        x, y = _inputs(tree, loss, shape, _node_dtype(loss, shape, align_corners, k + align_corners), device=device)
        _check(loss, "triton", x, y, tree, align_corners=align_corners, reduction=H.REDUCTIONS[k % 3])


def test_triton_tree_min_half_exact_weights(triton_node):
    tree = H.random_tree(max_nodes=10)
    for dtype, shape, align_corners in ((torch.bfloat16, (2, 2, 3, 8, 12), False),
                                        (torch.float16, (1, 3, 2, 9, 5), True)):
        assert H.weights_exact(shape, align_corners)
        x, y = _inputs(tree, "tree_min_loss", shape, dtype)
        _check("tree_min_loss", "triton", x, y, tree, align_corners=align_corners)


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_triton_node_options_and_reductions(triton_node, loss):
    """Focal gamma 0 / 2 / other, eps, node normalisation and scale, every reduction, ties in the logits
    (the tree-min's argmin/argmax routing: integer logits at exact weights)."""
    tree = H.random_tree(min_depth=2, max_nodes=9)
    x, y = _inputs(tree, loss, (1, 3, 3, 7, 8))
    cases = [dict(reduction="mean"), dict(gamma=0.0, reduction="sum"), dict(gamma=1.0, reduction="none"),
             dict(gamma=2.5, eps=1e-6, reduction="mean", align_corners=True),
             dict(normalize="node", scale=5.0, reduction="sum", eps=0.1)]
    for kw in cases:
        _check(loss, "triton", x, y, tree, **kw)
    xt, _ = H.inputs(tree, loss, (1, 2, 3), ties=True)
    _, yt = _inputs(tree, loss, (1, 2, 3, 8, 12))
    _check(loss, "triton", xt, yt, tree, reduction="none")


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_triton_node_layouts(triton_node, loss):
    """NCHW, channels_last, strided views of the low-resolution logits (the gradient in their layout); a
    strided target; an upstream gradient of any strides (reduction none)."""
    tree = H.random_tree(max_nodes=9)
    C = tree.num_nodes
    base = torch.randn(2, C, 4, 6, dtype=torch.float64).float() * 3
    views = [base, base.contiguous(memory_format=torch.channels_last), base[:, :, 1:3, ::2],
             base.contiguous(memory_format=torch.channels_last)[:, :, ::2, 1:5]]
    for k, x in enumerate(views):
        y = torch.randint(0, tree.num_leaves, (2, 2 * x.shape[3] + 1, x.shape[2] * 3)).transpose(1, 2)
        y[:, 0, 0] = 255
        go = list(H.grad_outs(tuple(y.shape)))[k % 3]
        _check(loss, "triton", x, y, tree, grad_out=go, reduction="none", align_corners=k % 2 == 1)
    a = base.contiguous(memory_format=torch.channels_last).requires_grad_(True)
    y = torch.randint(0, tree.num_leaves, (2, 7, 9))
    getattr(hss_kernels, loss)(a, y, tree, backend="triton", upsample="bilinear").backward()
    assert a.grad.stride() == a.stride()


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_triton_node_all_ignored_and_empty_batch(triton_node, loss):
    _all_ignored_and_empty_batch("triton", loss, H.random_tree(max_nodes=10))


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_triton_node_nan_and_bad_labels(triton_node, loss):
    """A NaN low-resolution logit poisons the pixels whose stencil reads it (their whole row, as the NaN rule
    says) and, through the backward, every low-resolution element those pixels' stencils hold, as in the
    composition; an ignored pixel's NaN logits reach nothing; a label out of range poisons its pixel."""
    tree = H.random_tree(max_nodes=10)
    x, y = _inputs(tree, loss, (1, 3, 4, 7, 9), ignore_frac=0.0)
    x[0, tree.num_nodes - 1, 1, 2] = float("nan")
    for align_corners in (False, True):
        _triton_nan_like_composition(loss, x, y, tree, align_corners)
    hss_kernels.set_label_check(False)
    try:
        x2, y2 = _inputs(tree, loss, (1, 2, 2, 5, 5), ignore_frac=0.0)
        y2[0, 4, 4] = tree.num_leaves
        out, g2, _ = H.loss_and_grad(H.api(loss, "triton"), x2, y2, tree, upsample="bilinear", reduction="none")
        assert torch.isnan(out[0, 4, 4]) and torch.isfinite(out.flatten()[:-1]).all()
        assert torch.isnan(g2[0, :, 1, 1]).all() and torch.isfinite(g2[0, :, 0, 0]).all()
    finally:
        hss_kernels.set_label_check(True)


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_triton_node_gradcheck_float64(triton_node, loss):
    tree = H.random_tree(max_nodes=6, min_depth=2)
    x, y = _inputs(tree, loss, (1, 2, 2, 3, 4))
    x = x.double().requires_grad_(True)
    fn = getattr(hss_kernels, loss)
    for align_corners, kw in ((False, dict(reduction="sum")), (True, dict(reduction="mean", gamma=1.5, eps=0.1))):
        assert torch.autograd.gradcheck(
            lambda a: fn(a, y, tree, backend="triton", upsample="bilinear", align_corners=align_corners, **kw), (x,))


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_triton_node_several_programs(triton_node, loss, monkeypatch):
    """Blocks of 16 pixels: several programs per image in both kernels (the forward's partial sums; the
    backward's blocks of low-resolution pixels cutting through rows, the last one partly masked)."""
    monkeypatch.setattr(triton_node, "_up_blocks", lambda logits, backward=False: (16, 4))
    tree = H.random_tree(max_nodes=9)
    x, y = _inputs(tree, loss, (2, 5, 7, 9, 11))
    for reduction in ("mean", "none"):
        _check(loss, "triton", x, y, tree, reduction=reduction, align_corners=reduction == "none")


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_triton_node_bands(triton_node, loss, monkeypatch):
    """The backward in bands of 1 to 5 full-resolution rows (several bands per image, low-resolution
    rows whose window spans two or more bands: their partial sums carried between the gathers), with blocks
    of 16 pixels: against the composition, and bitwise equal to one band over the whole image (float64, each
    element's terms summed in the same order whatever the bands), for both align_corners, integer and
    non-integer scales, weights and a per-pixel grad_output."""
    from hss_kernels.triton import _upsample as U
    tree = H.random_tree(max_nodes=9)
    monkeypatch.setattr(triton_node, "_up_blocks", lambda logits, backward=False: (16, 4))
    fn = H.api(loss, "triton")
    for k, (shape, align_corners) in enumerate((((2, 3, 4, 7, 9), False), ((1, 3, 2, 12, 8), True),
                                                ((1, 2, 2, 9, 4), False))):
        x, y = _inputs(tree, loss, shape, torch.float64)
        kw = dict(upsample="bilinear", align_corners=align_corners, reduction=H.REDUCTIONS[k % 3])
        if k == 1:
            kw.update(class_weight=torch.rand(tree.num_leaves, dtype=torch.float64) + 0.5,
                      pixel_weight=torch.rand(y.shape, dtype=torch.float64))
        monkeypatch.setattr(U, "up_band_rows", lambda N, V, Hh, W, a, b: Hh)
        ref = H.loss_and_grad(fn, x, y, tree, **kw)
        go = ref[2]
        assert len(U.up_bands(shape[1], shape[3], shape[3], align_corners, torch.float64)[0]) == 1
        for rows in ((1, 3), (2, 5), (1, 4))[k]:
            monkeypatch.setattr(U, "up_band_rows", lambda N, V, Hh, W, a, b, rows=rows: rows)
            assert len(U.up_bands(shape[1], shape[3], rows, align_corners, torch.float64)[0]) > 1
            _, g, _ = H.loss_and_grad(fn, x, y, tree, go, **kw)
            assert torch.equal(g, ref[1]), (rows, (g - ref[1]).abs().max())
        if k != 1:  # the composition takes no weights (tests/triton/test_triton_weights.py has them)
            monkeypatch.setattr(U, "up_band_rows", lambda N, V, Hh, W, a, b: 2)
            _check(loss, "triton", x.float(), y, tree, grad_out=go.float(), align_corners=align_corners,
                   reduction=kw["reduction"])


def test_triton_node_gather_channel_steps(triton_node, monkeypatch):
    """A tree wider than one step of the gather (Vistas, 80 nodes: 5 steps of 16 channels in float64; 3 of 32 in
    float32, the last one half past V) in bands of 1 and 2 rows: bitwise equal to one band (float64) and against
    the composition (float32), with a per-pixel grad_output."""
    from hss_kernels.triton import _upsample as U
    tree = trees.load("vistas")
    assert tree.num_nodes > 2 * U.gather_step(4) and tree.num_nodes % U.gather_step(4) != 0
    fn = H.api("tree_bce_loss", "triton")
    x, y = _inputs(tree, "tree_bce_loss", (1, 3, 4, 9, 11), torch.float64)
    kw = dict(upsample="bilinear", reduction="none")
    monkeypatch.setattr(U, "up_band_rows", lambda N, V, Hh, W, a, b: Hh)
    ref = H.loss_and_grad(fn, x, y, tree, **kw)
    for rows in (1, 2):
        monkeypatch.setattr(U, "up_band_rows", lambda N, V, Hh, W, a, b, rows=rows: rows)
        _, g, _ = H.loss_and_grad(fn, x, y, tree, ref[2], **kw)
        assert torch.equal(g, ref[1]), (rows, (g - ref[1]).abs().max())
    _check("tree_bce_loss", "triton", x.float(), y, tree, grad_out=ref[2].float(), reduction="none")


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_triton_node_backward_bitwise_deterministic(triton_node, loss):
    """Repeated calls give the same loss and gradient to the bit (float64: a reordered sum would show)."""
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, loss, (2, 3, 4, 7, 9), torch.float64)
    H.assert_bitwise_deterministic(H.api(loss, "triton"), x, y, tree, runs=1, upsample="bilinear",
                                   reduction="none")


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_triton_node_saves_no_full_size_logits(triton_node, loss):
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, loss, (1, 2, 2, 8, 8))
    x = x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = getattr(hss_kernels, loss)(x, y, tree, backend="triton", upsample="bilinear")
    assert saved and max(t.numel() for t in saved) < tree.num_nodes * y.numel(), [tuple(t.shape) for t in saved]
    out.backward()
    assert x.grad.shape == x.shape and torch.isfinite(x.grad).all()


def test_triton_node_rejects_single_pass_and_bad_modes(triton_node):
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, "tree_min_loss", (1, 3, 3, 9, 9))
    for fn in (triton_node.tree_min_loss, triton_node.tree_bce_loss):
        with pytest.raises(ValueError, match="single_pass does not take upsample"):
            fn(x, y, tree, single_pass=True, upsample="bilinear")
        with pytest.raises(ValueError, match="upsample must be None or 'bilinear'"):
            fn(x, y, tree, upsample="nearest")
        with pytest.raises(ValueError, match="H >= h, W >= w"):
            fn(x, y[:, :2], tree, upsample="bilinear")


def test_triton_node_offsets_past_2_31(triton_node):
    """Low-resolution logits whose offsets pass 2^31 (H.far_views: a batch stride putting image 2 past it, a
    channel stride putting the last channels past it), upsampled: loss and gradient equal the composition's
    on a compact copy."""
    tree = trees.load("cityscapes")
    for loss, view in zip(H.NODE_LOSSES, H.far_views(tree.num_nodes)):  # one view each: the interpreter is slow
        compact = (torch.randn(view.shape) * 3).to(torch.bfloat16)
        view.copy_(compact)
        y = torch.randint(0, tree.num_leaves, (view.shape[0], 4, 6))
        a = view.requires_grad_(True)  # the view itself: loss_and_grad would copy it
        got = getattr(hss_kernels, loss)(a, y, tree, backend="triton", upsample="bilinear", reduction="none")
        go = torch.randn(got.shape)
        (g,) = torch.autograd.grad(got, a, go)
        want, g_want, _ = H.loss_and_grad(_composed(loss), compact, y, tree, go, reduction="none")
        torch.testing.assert_close(got, want, **H.loss_tolerance(loss, compact, tree))
        H.assert_grad_close(g, g_want, torch.bfloat16, H.upstream_size(go, y, "none"))
        del view, a, got, g


def test_triton_node_opcheck(triton_node):
    """The ops' schemas, fakes and autograd registration: NCHW float32 tree-min mean, a non-dense float64
    BCE view with reduction none, align_corners and a stride-0 grad_output."""
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, "tree_min_loss", (1, 2, 3, 3, 4))  # small: opcheck runs each op many times
    tab = tables.tree_min_table(tree, "cpu")
    sizes = triton_node._tree_sizes(tree)
    for k, (xv, reduction, use_extrema) in enumerate(((x, "mean", True), (x.double()[:, :, :, 1:], "none", False))):
        kw = tables.node_weight_vector(tree, 1.0, "level", H.acc_dtype(xv.dtype), "cpu")
        args = (xv.clone().requires_grad_(), y, tab, kw, sizes, 2.0, 0.0, 255, reduction, use_extrema, k == 1)
        torch.library.opcheck(torch.ops.hss_triton.tree_min_up_fwd.default, args)
        loss, count, _ = torch.ops.hss_triton.tree_min_up_fwd(*args)
        go = torch.randn(loss.shape, dtype=loss.dtype)
        if reduction == "none":
            go = go[:, :1].expand(loss.shape)
        torch.library.opcheck(torch.ops.hss_triton.tree_min_up_bwd.default,
                              (go, xv, y, tab, kw, count, sizes, 2.0, 0.0, 255, reduction, use_extrema, k == 1))


@pytest.mark.parametrize("loss", H.NODE_LOSSES)
def test_triton_node_compile_fullgraph(triton_node, loss):
    assert "triton" in hss_kernels.available_backends("cpu")
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, loss, (1, 2, 3, 5, 7))
    f = torch.compile(lambda a, t: getattr(hss_kernels, loss)(
        a, t, tree, backend="triton", upsample="bilinear", align_corners=True, reduction="none"),
        fullgraph=True, backend="aot_eager")
    H.assert_matches(lambda a, t, _tree, **_: f(a, t), _composed(loss), x, y, tree, reduction="none",
                     align_corners=True, loss_tol=H.loss_tolerance(loss, x, tree))
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------- other backends
def test_reference_and_auto(native):
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, "tree_min_loss", (1, 3, 3, 9, 9))
    for backend in ("reference", "auto"):
        _check("tree_min_loss", backend, x, y, tree)


def test_modules_take_upsample(native):
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, "hierarchical_softmax_loss", (1, 3, 3, 9, 9))
    m = hss_kernels.HierarchicalSoftmaxLoss(tree, upsample="bilinear", align_corners=True)
    assert "upsample='bilinear'" in repr(m)
    torch.testing.assert_close(m(x, y), _composed("hierarchical_softmax_loss")(x, y, tree, align_corners=True))
    xn, yn = _inputs(tree, "tree_min_loss", (1, 3, 3, 9, 9))
    for cls, loss in ((hss_kernels.TreeMinLoss, "tree_min_loss"), (hss_kernels.TreeBCELoss, "tree_bce_loss")):
        got = cls(tree, upsample="bilinear")(xn, yn)
        torch.testing.assert_close(got, _composed(loss)(xn, yn, tree, gamma=cls(tree).gamma), rtol=2e-5, atol=2e-6)


# ------------------------------------------------------------------------------------- errors
@pytest.mark.parametrize("loss", H.LOSSES)
def test_bad_sizes_and_modes(loss):
    tree = trees.load("cityscapes")
    fn = getattr(hss_kernels, loss)
    x, y = _inputs(tree, loss, (1, 4, 4, 8, 8))
    with pytest.raises(ValueError, match="upsample must be None or 'bilinear', got 'nearest'"):
        fn(x, y, tree, upsample="nearest")
    with pytest.raises(ValueError, match=r"H >= 4, W >= 4 .*got \(1, 3, 8\)"):
        fn(x, y[:, :3], tree, upsample="bilinear")
    with pytest.raises(ValueError, match="must be"):
        fn(x, y[:, :, :0], tree, upsample="bilinear")
    with pytest.raises(ValueError, match="h, w >= 1"):
        fn(x[:, :, :0], y, tree, upsample="bilinear")
    with pytest.raises(ValueError, match="N = 1"):
        fn(x, torch.cat([y, y]), tree, upsample="bilinear")
    with pytest.raises(ValueError, match=r"upsampling takes logits \(N, C, h, w\)"):
        fn(x[..., None], y, tree, upsample="bilinear")
    with pytest.raises(ValueError, match="upsample='bilinear' takes low-resolution logits"):
        fn(x, y, tree)  # a size mismatch without upsample stays an error
    with pytest.raises(ValueError, match=r"size must be \(H, W\)|H >= 4"):
        hss_kernels.decode(H.random_logits(tree.num_nodes, (1, 4, 4)), tree, size=(3, 8))


def test_op_argument_checks(native):
    """The ops called directly: upsample must be 0 or 1 and the target at least the logits' size."""
    tree = trees.load("cityscapes")
    x = torch.randn(1, tree.num_leaves, 4, 4)
    group, w = tree.tables("cpu").leaf_group, torch.ones(tree.depth)
    y = torch.zeros(1, 3, 8, dtype=torch.long)
    with pytest.raises(RuntimeError, match="H >= 4 and W >= 4"):
        ops.hierarchical_softmax_fwd(x, y, group, w, 0.0, 255, False, 1, False)
    with pytest.raises(RuntimeError, match="upsample must be 0"):
        ops.hierarchical_softmax_fwd(x, torch.zeros(1, 8, 8, dtype=torch.long), group, w, 0.0, 255, False, 2, False)
    xn = torch.randn(1, tree.num_nodes, 4, 4)
    walk, ordered = decode_walk(tree, "cpu", False)
    with pytest.raises(RuntimeError, match="size must be"):
        ops.decode(xn, walk, ordered, 0, 0, [2, 8], False)


# ------------------------------------------------------------------------------------- schemas, compile
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(native, dtype):
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, "hierarchical_softmax_loss", (2, 3, 4, 7, 9), dtype)
    w, group = torch.rand(tree.depth, dtype=dtype), tree.tables("cpu").leaf_group
    for per_pixel in (False, True):
        args = (x.clone().requires_grad_(), y, group, w, 0.0, 255, per_pixel, 1, True)
        torch.library.opcheck(ops.hierarchical_softmax_fwd.default, args)
        loss, stats, _, _ = ops.hierarchical_softmax_fwd(*args)
        torch.library.opcheck(ops.hierarchical_softmax_bwd.default,
                              (torch.randn_like(loss), x, y, stats.detach(), group, w, 0.0, 255, 1, True))
        cw, pw = torch.rand(tree.num_leaves, dtype=dtype), torch.rand(y.shape, dtype=dtype)  # the weights
        torch.library.opcheck(ops.hierarchical_softmax_fwd.default, args + (cw, pw))
        torch.library.opcheck(ops.hierarchical_softmax_bwd.default,
                              (torch.randn_like(loss), x, y, stats.detach(), group, w, 0.0, 255, 1, True, cw, pw))
    xn, yn = _inputs(tree, "tree_min_loss", (2, 3, 4, 7, 9), dtype)
    k, idx = torch.rand(tree.num_nodes, dtype=dtype), tree_index(tree, "cpu")
    for per_pixel in (False, True):
        args = (xn.clone().requires_grad_(), yn, idx, k, tree.num_leaves, tree.depth, 2.0, 0.0, 255, per_pixel,
                True, 1, False)
        torch.library.opcheck(ops.tree_min_fwd.default, args)
        loss, _, _ = ops.tree_min_fwd(*args)
        torch.library.opcheck(ops.tree_min_bwd.default, (torch.randn_like(loss), xn, yn, idx, k, tree.num_leaves,
                                                         tree.depth, 2.0, 0.0, 255, True, 1, False))
    walk, ordered = decode_walk(tree, "cpu", False)
    torch.library.opcheck(ops.decode.default, (xn, walk, ordered, 0, 0, [7, 9], False))


@pytest.mark.parametrize("loss", H.LOSSES)
def test_compile_fullgraph(native, loss):
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, loss, (1, 3, 4, 9, 10))
    fn = getattr(hss_kernels, loss)
    f = torch.compile(lambda a, t: fn(a, t, tree, backend="native", upsample="bilinear"), fullgraph=True,
                      backend="aot_eager")
    tol = H.loss_tolerance(loss, x, tree)
    H.assert_matches(lambda a, t, _tree, **_: f(a, t), _composed(loss), x, y, tree, loss_tol=tol)
