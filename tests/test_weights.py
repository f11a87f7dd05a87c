"""Class and pixel weights (``class_weight``, ``pixel_weight``) on every loss and backend: a flat tree equals
``F.cross_entropy(weight=...)`` in every reduction, values and gradients; the node losses follow the same rule by
the pixel's leaf label (checked against their unweighted per-pixel losses); pixel weights as mmsegmentation's
weight map; with upsampling; gradcheck; the modules; bad weights."""
import pytest
import torch
import torch.nn.functional as F

import hss_kernels
from hss_kernels import reference
from hss_kernels.tree import Tree

import helpers as H


def _backends():
    return [b for b in ("reference", "native", "triton") if hss_kernels.backends.unavailable_reason(b, "cpu") is None]


@pytest.mark.parametrize("backend", ["reference", "native", "triton"])
def test_flat_tree_is_weighted_cross_entropy(backend):
    H.require(backend, "cpu")
    tree = Tree.from_parents([-1] * 6)
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64).float() * 3
    y = torch.randint(0, 6, (2, 5, 7))
    y[0, 1] = 255
    w = torch.rand(6) + 0.1
    for reduction in H.REDUCTIONS:
        a = x.clone().requires_grad_(True)
        got = hss_kernels.hierarchical_softmax_loss(a, y, tree, class_weight=w, reduction=reduction, backend=backend)
        b = x.clone().requires_grad_(True)
        want = F.cross_entropy(b, y, weight=w, reduction=reduction, ignore_index=255)
        go = torch.randn(want.shape)
        (ga,) = torch.autograd.grad(got, a, go)
        (gb,) = torch.autograd.grad(want, b, go)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=2e-6)
        torch.testing.assert_close(ga, gb, rtol=2e-4, atol=1e-6)


def _manual(loss, x, y, tree, reduction, cw=None, pw=None, **kw):
    """The rule written out on the unweighted per-pixel loss of the reference."""
    per = getattr(reference, loss)(x, y, tree, reduction="none", **kw)
    valid = y != 255
    w = cw[y.clamp(0, tree.num_leaves - 1)] * valid if cw is not None else valid.to(per.dtype)
    per = per * w * (pw if pw is not None else 1)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.sum() / w.sum() if valid.any() else per.sum() * 0


@pytest.mark.parametrize("loss", H.LOSSES)
def test_every_loss_backend_and_reduction(loss):
    tree = H.random_tree()
    x, y = H.inputs(tree, loss, (2, 5, 6))
    cw = torch.rand(tree.num_leaves) * 2
    pw = torch.rand(y.shape) * 3
    for backend in _backends():
        for reduction in H.REDUCTIONS:
            for c, p in ((cw, None), (None, pw), (cw, pw)):
                got, g, go = H.loss_and_grad(H.api(loss, backend), x, y, tree, reduction=reduction, class_weight=c,
                                             pixel_weight=p)
                want, g_want, _ = H.loss_and_grad(lambda a, t, tr, **k: _manual(loss, a, t, tr, reduction, c, p), x, y,
                                                  tree, go)
                torch.testing.assert_close(got, want, **H.loss_tolerance(loss, x, tree))
                H.assert_grad_close(g, g_want, x.dtype, float(go.abs().max()) * float(cw.max() * pw.max()))


def test_pixel_weight_is_mmseg_weight_map_and_all_ignored_is_zero():
    tree = hss_kernels.trees.load("cityscapes")
    x, y = H.inputs(tree, "tree_min_loss", (1, 4, 4))
    ones = torch.ones(y.shape)
    plain = hss_kernels.tree_min_loss(x, y, tree)
    torch.testing.assert_close(hss_kernels.tree_min_loss(x, y, tree, pixel_weight=ones), plain)
    torch.testing.assert_close(hss_kernels.tree_min_loss(x, y, tree, pixel_weight=2 * ones), 2 * plain)
    torch.testing.assert_close(hss_kernels.tree_min_loss(x, y, tree, class_weight=[3.0] * 19), plain)
    y_all = torch.full_like(y, 255)
    for reduction in ("mean", "sum"):
        out = hss_kernels.tree_min_loss(x, y_all, tree, class_weight=[3.0] * 19, pixel_weight=ones,
                                        reduction=reduction)
        assert out == 0
    # an ignored pixel's weight never matters, even an infinite one
    pw = ones.clone()
    pw[y == 255] = float("inf")
    if (y == 255).any():
        torch.testing.assert_close(hss_kernels.tree_min_loss(x, y, tree, pixel_weight=pw), plain)


def test_weights_with_upsampling_and_gradcheck():
    H.require("native", "cpu")
    tree = H.random_tree(max_nodes=8)
    x = torch.randn(1, tree.num_leaves, 2, 3, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, tree.num_leaves, (1, 5, 7))
    cw = torch.rand(tree.num_leaves, dtype=torch.float64)
    pw = torch.rand(1, 5, 7, dtype=torch.float64)
    got = hss_kernels.hierarchical_softmax_loss(x, y, tree, upsample="bilinear", class_weight=cw, pixel_weight=pw,
                                                backend="native")
    want = _manual("hierarchical_softmax_loss", reference.upsample_logits(x, (5, 7)), y, tree, "mean", cw, pw)
    torch.testing.assert_close(got, want)
    assert torch.autograd.gradcheck(
        lambda a: hss_kernels.hierarchical_softmax_loss(a, y, tree, upsample="bilinear", class_weight=cw,
                                                        pixel_weight=pw, backend="native"), (x,))


def test_modules_hold_class_weight_and_take_pixel_weight():
    tree = hss_kernels.trees.load("cityscapes")
    x, y = H.inputs(tree, "hierarchical_softmax_loss", (1, 4, 5))
    cw = torch.rand(19)
    pw = torch.rand(y.shape)
    m = hss_kernels.HierarchicalSoftmaxLoss(tree, class_weight=cw)
    assert "class_weight" in dict(m.named_buffers())
    torch.testing.assert_close(m(x, y, pixel_weight=pw),
                               _manual("hierarchical_softmax_loss", x, y, tree, "mean", cw, pw))
    xn, yn = H.inputs(tree, "tree_min_loss", (1, 4, 5))
    torch.testing.assert_close(hss_kernels.TreeMinLoss(tree, class_weight=cw.tolist())(xn, yn),
                               _manual("tree_min_loss", xn, yn, tree, "mean", cw, gamma=2.0))
    with pytest.raises(ValueError, match="one weight per leaf \\(19\\)"):
        hss_kernels.TreeBCELoss(tree, class_weight=[1.0, 2.0])


@pytest.mark.parametrize("kw, err, match", [
    (dict(class_weight=[1.0, 2.0]), ValueError, "one weight per leaf \\(19, by label id\\)"),
    (dict(class_weight=torch.ones(19, 1)), ValueError, "one weight per leaf"),
    (dict(class_weight=["a"] * 19), TypeError, "class_weight must be a tensor or a sequence"),
    (dict(class_weight=[float("nan")] * 19), ValueError, "non-finite"),
    (dict(pixel_weight=torch.ones(1, 4)), ValueError, "pixel_weight must have the target's shape \\(1, 4, 5\\)"),
    (dict(pixel_weight=torch.ones(1, 4, 5, dtype=torch.long)), TypeError, "floating-point tensor"),
])
def test_bad_weights(kw, err, match):
    tree = hss_kernels.trees.load("cityscapes")
    x, y = H.inputs(tree, "hierarchical_softmax_loss", (1, 4, 5))
    with pytest.raises(err, match=match):
        hss_kernels.hierarchical_softmax_loss(x, y, tree, **kw)


def test_compile_fullgraph_with_weights():
    H.require("native", "cpu")
    tree = hss_kernels.trees.load("cityscapes")
    x, y = H.inputs(tree, "tree_min_loss", (1, 4, 5))
    cw, pw = torch.rand(19), torch.rand(y.shape)
    f = torch.compile(lambda a, t: hss_kernels.tree_min_loss(a, t, tree, class_weight=cw, pixel_weight=pw,
                                                             backend="native"), fullgraph=True, backend="aot_eager")
    H.assert_matches(lambda a, t, _tree, **_: f(a, t),
                     lambda a, t, tr, **_: _manual("tree_min_loss", a, t, tr, "mean", cw, pw, gamma=2.0), x, y, tree)


@pytest.mark.parametrize("loss", H.LOSSES)
def test_weights_that_require_grad_get_the_references_gradient(loss):
    """No kernel differentiates the weights: weights that require a gradient take the composition on every
    backend, so their gradients (and the logits') equal the reference backend's. Two leaves at least: a one-leaf
    tree's hierarchical softmax loss is 0, and so are its weights' gradients."""
    tree = H.random_tree(min_leaves=2)
    x, y = H.inputs(tree, loss, (2, 3, 4), torch.float64)
    y[0, 0, 0] = 255
    cw0, pw0 = torch.rand(tree.num_leaves, dtype=torch.float64) + 0.5, torch.rand(y.shape, dtype=torch.float64)
    want = None
    for backend in ["reference"] + [b for b in _backends() if b != "reference"]:
        c, p, a = cw0.clone().requires_grad_(), pw0.clone().requires_grad_(), x.clone().requires_grad_()
        out = H.api(loss, backend)(a, y, tree, class_weight=c, pixel_weight=p)
        got = torch.autograd.grad(out, (a, c, p))
        if want is None:
            want = got
            assert got[1].abs().sum() > 0 and got[2].abs().sum() > 0
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)


def test_mean_denominator_is_cross_entropys_and_compiles():
    """The one "mean" rule (_checks.mean_denominator) every backend and the reference divide by: the weighted sum
    over it is F.cross_entropy's weighted mean on random flat cases (a zero weight sum over labelled pixels NaN in
    both); without class weights the labelled count; 1 when no pixel is labelled; the same under
    torch.compile(fullgraph=True)."""
    from hss_kernels._checks import mean_denominator
    compiled = torch.compile(mean_denominator, fullgraph=True, backend="eager")
    for trial in range(6):
        L = int(torch.randint(2, 7, ()))
        x = torch.randn(3, L, 4, 5, dtype=torch.float64)
        y = torch.randint(0, L, (3, 4, 5))
        y[torch.rand(y.shape) < 0.3] = 255
        w = torch.rand(L, dtype=torch.float64) + 0.1
        if trial == 5:  # labelled pixels whose class weights sum to 0
            w[y[y != 255].unique()] = 0
        valid = y != 255
        count = valid.sum()
        cw = torch.where(valid, w[y.clamp(0, L - 1)], torch.zeros((), dtype=w.dtype))
        per = F.cross_entropy(x, y, weight=w, reduction="none", ignore_index=255)
        want = F.cross_entropy(x, y, weight=w, ignore_index=255)
        for fn in (mean_denominator, compiled):
            torch.testing.assert_close(per.sum() / fn(count, cw.sum(), torch.float64), want, equal_nan=True)
            unweighted = F.cross_entropy(x, y, reduction="none", ignore_index=255)
            torch.testing.assert_close(unweighted.sum() / fn(count, None, torch.float64),
                                       F.cross_entropy(x, y, ignore_index=255))
            # the Triton ops' empty weight_sum without class weights reads as absent
            assert torch.equal(fn(count, torch.empty(0), torch.float32), count.float())
    none = torch.zeros((), dtype=torch.int64)
    for fn in (mean_denominator, compiled):
        assert fn(none, None, torch.float32).item() == 1 and fn(none, torch.tensor(0.), torch.float32).item() == 1
        assert fn(none, torch.tensor(0.), torch.float64).dtype == torch.float64
