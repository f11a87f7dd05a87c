"""Tree-min with a +inf or NaN logit at the root-side node of a pixel's target path (fp16 overflow, a
diverging run). The running min down the path must start at that node whatever its value: the native
backward used to start from `z < +inf`, which a +inf or NaN never passes, and wrote its weight to K[-1]
(outside the thread's shared memory on a GPU). +inf: the reference's loss and gradient; NaN: a NaN loss.
"""
import pytest
import torch

from hss_kernels import reference, trees

from _helpers import backend_or_skip


def _backend(name):
    return backend_or_skip(name)


def _loss_and_grad(fn, x, y, tree):
    x = x.detach().clone().requires_grad_()
    loss = fn(x, y, tree, reduction="none")
    (g,) = torch.autograd.grad(loss, x, torch.ones_like(loss))
    return loss.detach(), g


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf * 0, masked
@pytest.mark.parametrize("backend", ["native", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tree_min_nonfinite_path_root(backend, dtype):
    fn = _backend(backend).OPS["tree_min_loss"]
    tree = trees.load("helen")
    shape = (1, 9, 9)  # 81 pixels: a full 64-pixel block (the CPU lane path) and a partial one
    x = torch.randn(1, tree.num_nodes, *shape[1:], dtype=torch.float64).to(dtype)
    y = torch.randint(0, tree.num_leaves, shape)
    roots = tree.tables().path_nodes[y, 0]  # (1, H, W): each pixel's depth-1 node
    hit = torch.rand(shape) < 0.3
    hit.view(-1)[0] = True
    n, h, w = hit.nonzero(as_tuple=True)
    x[n, roots[hit], h, w] = float("inf")
    loss, grad = _loss_and_grad(fn, x, y, tree)
    lref, gref = _loss_and_grad(reference.tree_min_loss, x, y, tree)
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss, lref, **tol)
    torch.testing.assert_close(grad, gref, **tol)

    x[n, roots[hit], h, w] = float("nan")
    loss, grad = _loss_and_grad(fn, x, y, tree)
    assert torch.isnan(loss[hit]).all()
    torch.testing.assert_close(loss[~hit], lref[~hit], **tol)
