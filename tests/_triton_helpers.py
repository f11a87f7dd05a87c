"""Shared pieces of the Triton backend tests: random inputs, random trees, comparison with the reference."""
import random

import torch

from hss_kernels import Tree

# Tolerances on (loss, gradient) per logits dtype. bf16/fp16: the gradient is rounded once to the input
# dtype by both sides, from float32 values that may differ in the last bits, so allow about one ulp.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-4),
}


def random_tree(num_nodes: int) -> Tree:
    """A random unbalanced tree (leaves anywhere in channel order, chains, uneven depths)."""
    rng = random.Random(torch.randint(0, 2**31, ()).item())
    parents = [-1] + [rng.randrange(-1, i) for i in range(1, num_nodes)]
    return Tree.from_parents(parents)


def inputs(tree: Tree, channels: int, shape=(2, 5, 7), dtype=torch.float32, std=3.0, ignore_frac=0.1,
           ignore_index=255, memory_format=torch.contiguous_format):
    """Random logits and labels; the first two labels are the first and the last leaf."""
    N, H, W = shape
    x = (torch.randn(N, channels, H, W, dtype=torch.float64) * std).to(dtype)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, tree.num_leaves, shape)
    flat = y.view(-1)
    flat[0] = 0
    if flat.numel() > 1:
        flat[1] = tree.num_leaves - 1
    drop = torch.rand(shape) < ignore_frac
    drop.view(-1)[:2] = False
    y[drop] = ignore_index
    return x, y


def loss_and_grad(fn, x, y, tree, grad_out=None, **kw):
    """(loss, d loss·grad_out / dx) with a random grad_out when none is given."""
    a = x.detach().clone().requires_grad_(True)
    loss = fn(a, y, tree, **kw)
    if grad_out is None:
        grad_out = torch.randn(loss.shape, dtype=loss.dtype)
    loss.backward(grad_out)
    return loss.detach(), a.grad, grad_out


def assert_matches(fn, ref, x, y, tree, grad_out=None, **kw):
    """The backend's loss and gradient equal the reference's (same grad_out), in the expected dtypes."""
    loss, grad, go = loss_and_grad(fn, x, y, tree, grad_out=grad_out, **kw)
    ref_loss, ref_grad, _ = loss_and_grad(ref, x, y, tree, grad_out=go, **kw)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    assert loss.dtype == acc and ref_loss.dtype == acc
    assert grad.dtype == x.dtype and grad.shape == x.shape
    tol = TOL[x.dtype]
    torch.testing.assert_close(loss, ref_loss, **tol)
    scale = ref_grad.abs().max().to(torch.float64).item()
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=tol["rtol"],
                               atol=tol["atol"] + tol["rtol"] * scale)
    return loss, grad


def assert_traced_matches(f, ref, x, y, tree, **kw):
    """`f(logits, target)` (a compiled closure over the tree) against `ref(logits, target, tree, **kw)`."""
    loss, grad, go = loss_and_grad(lambda a, t, _tree: f(a, t), x, y, tree)
    ref_loss, ref_grad, _ = loss_and_grad(ref, x, y, tree, grad_out=go, **kw)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def assert_bitwise_deterministic(fn, x, y, tree, runs=3):
    """Repeated calls give the same loss and gradient to the bit (same grad_out)."""
    first = loss_and_grad(fn, x, y, tree)
    for _ in range(runs):
        again = loss_and_grad(fn, x, y, tree, grad_out=first[2])
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def assert_tail_rows_match(fn, ref, x, y, tree, atol):
    """On a (1, C, H, W) input too large for the reference, the last two rows (past 2^31 elements) of the
    per-pixel loss and of the gradient equal the reference's on those rows alone."""
    H = x.shape[2]
    x.requires_grad_(True)
    loss = fn(x, y, tree, reduction="none")
    go = torch.randn_like(loss)
    loss.backward(go)
    tail = slice(H - 2, H)
    xs = x.detach()[:, :, tail].contiguous()
    ref_loss, ref_grad, _ = loss_and_grad(ref, xs, y[:, tail].contiguous(), tree, reduction="none",
                                          grad_out=go[:, tail].contiguous())
    torch.testing.assert_close(loss[:, tail], ref_loss)
    torch.testing.assert_close(x.grad[:, :, tail].float(), ref_grad.float(), rtol=1.6e-2, atol=atol)


def assert_empty_batch(fn, x, y, tree):
    """With no pixel, every reduction gives 0 (an empty map for "none") and a gradient of x's shape."""
    for reduction in ("mean", "sum", "none"):
        loss = fn(x, y, tree, reduction=reduction)
        assert loss.shape == (y.shape if reduction == "none" else ()) and (loss == 0).all()
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert g.shape == x.shape


def assert_one_pass_equals_autograd(one_pass, fn, x, y, tree, **kw):
    """`one_pass(x, y, tree, **kw)` → (loss, gradient) equals to the bit fn's loss and autograd gradient
    (grad_out 1), the gradient in x's dtype and outside autograd."""
    loss, grad = one_pass(x, y, tree, **kw)
    ref_loss, ref_grad, _ = loss_and_grad(fn, x, y, tree, grad_out=torch.ones((), dtype=torch.float32), **kw)
    assert grad.dtype == x.dtype and not grad.requires_grad
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


def assert_saved_gradient_intact(loss_fn, x, y, tree, factor, **kw):
    """Two backward passes through one single-pass loss (retain_graph), the first scaled by `factor`: the
    gradient saved by the forward is not written to."""
    a = x.clone().requires_grad_(True)
    loss = loss_fn(a, y, tree, single_pass=True, **kw)
    (g1,) = torch.autograd.grad(loss * factor, a, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, a)
    torch.testing.assert_close(g1, factor * g2)
    assert a.grad is None
