"""What only the Triton backend offers, on every device: ``single_pass=True`` (the gradient written during
the forward, MATH.md §5, autograd intact) and the ``*_and_grad`` functions (loss and gradient outside
autograd), for the hierarchical softmax, tree-min and tree BCE."""
import pytest
import torch

import hss_kernels
from hss_kernels import trees

import helpers as H
from helpers import inputs

triton_mod = pytest.importorskip("hss_kernels.triton")

# (op, options) per loss: the options single_pass must honour
CASES = {
    "hierarchical_softmax_loss": [dict(eps=0.0), dict(eps=1e-4)],
    "tree_min_loss": [dict(gamma=2.0, scale=5.0)],
    "tree_bce_loss": [dict(gamma=2.0, scale=5.0)],
}


@pytest.mark.parametrize("loss", H.LOSSES)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_pass_equals_two_pass(backend, device, loss, reduction):
    """The same loss to the bit; the gradient to float32 rounding (the same terms, written by another
    kernel launch) and against the reference."""
    tree = trees.load("helen")
    x, y = inputs(tree, loss, device=device)
    fn = getattr(triton_mod, loss)
    for opts in CASES[loss]:
        kw = dict(reduction=reduction, **opts)
        loss2, grad2, go = H.loss_and_grad(fn, x, y, tree, **kw)
        loss1, grad1, _ = H.loss_and_grad(fn, x, y, tree, go, single_pass=True, **kw)
        torch.testing.assert_close(loss1, loss2, rtol=0, atol=0)
        torch.testing.assert_close(grad1, grad2, rtol=1e-6, atol=1e-8 if loss in H.NODE_LOSSES else 1e-7)
        _, ref_grad, _ = H.loss_and_grad(H.ref(loss), x, y, tree, go, **kw)
        H.assert_grad_close(grad1, ref_grad, x.dtype, H.upstream_size(go, y, reduction))


@pytest.mark.parametrize("loss, dtype, reductions, opts", [
    ("hierarchical_softmax_loss", torch.bfloat16, ("mean", "sum"), dict(eps=1e-4)),
    ("tree_min_loss", torch.float16, ("mean",), dict(gamma=1.0)),
    ("tree_bce_loss", torch.float16, ("mean",), dict(gamma=1.0)),
])
def test_loss_and_grad_equals_autograd(backend, device, loss, dtype, reductions, opts):
    tree = trees.load("vistas")
    x, y = inputs(tree, loss, dtype=dtype, device=device)
    for reduction in reductions:
        H.assert_one_pass_equals_autograd(getattr(triton_mod, loss + "_and_grad"), H.api(loss, "triton"), x, y, tree,
                                          reduction=reduction, **opts)


@pytest.mark.parametrize("loss, factor, opts", [("hierarchical_softmax_loss", 3.0, {}),
                                                ("tree_min_loss", -2.0, dict(reduction="sum"))])
def test_single_pass_autograd_is_not_corrupted(backend, device, loss, factor, opts):
    tree = trees.load("cityscapes")
    x, y = inputs(tree, loss, device=device)
    H.assert_saved_gradient_intact(getattr(triton_mod, loss), x, y, tree, factor, **opts)


@pytest.mark.parametrize("loss", H.LOSSES)
def test_inputs_are_not_mutated(backend, device, loss):
    tree = trees.load("cityscapes")
    x, y = inputs(tree, loss, (2, 4, 5), device=device)

    def run(logits, target):
        getattr(triton_mod, loss)(logits, target, tree, single_pass=True).backward()
        getattr(triton_mod, loss + "_and_grad")(logits, target, tree)

    H.assert_inputs_not_mutated(run, x, y)


def test_bad_calls(backend, device):
    tree = trees.load("cityscapes")
    x, y = inputs(tree, "hierarchical_softmax_loss", device=device)
    with pytest.raises(ValueError, match="single_pass"):
        triton_mod.hierarchical_softmax_loss(x, y, tree, reduction="none", single_pass=True)
    with pytest.raises(ValueError, match=r"\(N, L, H, W\)"):
        triton_mod.hierarchical_softmax_loss(x[0], y[0], tree)
    x, y = inputs(tree, "tree_min_loss", device=device)
    with pytest.raises(ValueError, match="single_pass"):
        triton_mod.tree_min_loss(x, y, tree, reduction="none", single_pass=True)
    with pytest.raises(ValueError, match="normalize"):  # checked by the public API, before the backend
        hss_kernels.tree_bce_loss(x, y, tree, normalize="depth", backend=backend)
    with pytest.raises(ValueError, match=r"\(N, V, H, W\)"):
        triton_mod.tree_min_loss(x[0], y[0], tree)


@pytest.mark.parametrize("loss", ["hierarchical_softmax_loss", "tree_min_loss"])
def test_compile_fullgraph_single_pass(backend, device, loss):
    # aot_eager: AOTAutograd traces forward and backward through the custom ops without Inductor
    hss_kernels.available_backends(device)
    tree = trees.load("cityscapes")
    x, y = inputs(tree, loss, device=device)
    fn = getattr(triton_mod, loss)
    for single_pass in (False, True):
        f = torch.compile(lambda a, t: fn(a, t, tree, single_pass=single_pass), fullgraph=True, backend="aot_eager")
        H.assert_traced_matches(f, loss, x, y, tree)
    torch._dynamo.reset()
