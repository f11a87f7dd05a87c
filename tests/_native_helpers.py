"""Shared pieces of the native (C++/CUDA) backend tests: random trees and inputs, comparison with the reference
through the public API (`backend="reference"` against `backend="native"`)."""
import random

import torch

from hss_kernels import Tree

TOL = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=2e-5, atol=2e-6),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=5e-3, atol=5e-3)}


def random_tree(max_depth=5) -> Tree:
    """An unbalanced random tree: each node hangs under the root or an earlier node."""
    while True:
        V = random.randint(2, 24)
        parents = [-1] + [random.choice([-1] + list(range(i))) for i in range(1, V)]
        tree = Tree.from_parents(parents)
        if tree.depth <= max_depth:
            return tree


def make_inputs(tree, shape=(2, 5, 7), dtype=torch.float32, std=3.0, ignore_frac=0.2, device="cpu", ties=False,
                nodes=True):
    """Random (N, C, H, W) logits, C = tree.num_nodes (or num_leaves when not `nodes`), and (N, H, W) labels
    with about `ignore_frac` of them 255."""
    N, H, W = shape
    C = tree.num_nodes if nodes else tree.num_leaves
    if ties:  # few distinct values: many ties in the mins and maxes
        x = torch.randint(-2, 3, (N, C, H, W)).to(dtype)
    else:
        x = (torch.randn(N, C, H, W, dtype=torch.float64) * std).to(dtype)
    y = torch.randint(0, tree.num_leaves, (N, H, W))
    y[torch.rand(N, H, W) < ignore_frac] = 255
    return x.to(device), y.to(device)


def loss_and_grad(fn, x, y, tree, backend, reduction="mean", grad_out=None, **kw):
    """(loss, d loss·g / dx, g) of `fn(..., backend=backend)`, g random unless `grad_out` is given."""
    x = x.detach().clone().requires_grad_()
    loss = fn(x, y, tree, reduction=reduction, backend=backend, **kw)
    g = torch.randn_like(loss) if grad_out is None else grad_out
    (gx,) = torch.autograd.grad(loss, x, g)
    return loss.detach(), gx, g


def check_against_reference(fn, x, y, tree, reduction="mean", grad_out=None, tol=None, **kw):
    """The native loss and gradient equal the reference's (same grad_out), in the same dtypes and shapes."""
    ref, gref, g = loss_and_grad(fn, x, y, tree, "reference", reduction, grad_out, **kw)
    out, gout, _ = loss_and_grad(fn, x, y, tree, "native", reduction, g, **kw)
    tol = tol or TOL[x.dtype]
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert gout.dtype == x.dtype and gout.shape == x.shape
    torch.testing.assert_close(out, ref, **tol)
    # float32 gradients are sums of terms up to the gradient's largest size that cancel: allow rounding
    # relative to that size, as for the reference itself against float64
    scale = float(gref.abs().max()) if gref.numel() else 0.0
    torch.testing.assert_close(gout, gref, rtol=tol["rtol"], atol=tol["atol"] + tol["rtol"] * scale)
