"""Non-finite logits, one rule on every backend and device: a NaN logit anywhere in a labelled pixel's
channels gives that pixel a NaN loss and a NaN gradient row; an ignored pixel stays 0 (loss and
gradient) whatever its logits; every other pixel is untouched. Compiled GPU code is where this can
break: PTX max.f32/min.f32 drop NaN (the interpreter's np.maximum keeps it), so a tree walk alone would
skip a NaN in an off-path subtree.

+inf is not a NaN: the losses follow their formulas (the reference's values and gradients), and the
tree-min's running min down the target path must start at the root-side node whatever its value (the
native backward once started from `z < +inf`, which +inf never passes, and wrote K[-1]).
"""
import pytest
import torch

import hss_kernels
from hss_kernels import reference, trees

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
# native-pixel: the native CPU ops through csrc/include's per-pixel float code (HSS_CPU_PIXEL_PATH=1), the
# arithmetic the CUDA kernels run
BACKENDS = ["reference", "native", "native-pixel", "triton"]
OPS = ["hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss"]


def _backend_or_skip(backend, device, op, monkeypatch=None):
    """The registry's name of `backend`, or a skip saying why it cannot run `op` on `device`."""
    if backend == "native-pixel":
        if device != "cpu":
            pytest.skip("the per-pixel path is a CPU switch")
        monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")
        backend = "native"
    why = hss_kernels.backends.unavailable_reason(backend, device, op)
    if why is not None:
        pytest.skip(why)
    return backend


def _inputs(tree, op, shape, dtype, device):
    channels = tree.num_leaves if op == "hierarchical_softmax_loss" else tree.num_nodes
    x = (torch.randn(shape[0], channels, *shape[1:], dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, tree.num_leaves, shape)
    y[torch.rand(shape) < 0.2] = 255
    return x.to(device), y.to(device)


def _loss_and_grad(op, x, y, tree, backend, reduction="none"):
    a = x.detach().clone().requires_grad_()
    loss = getattr(hss_kernels, op)(a, y, tree, reduction=reduction, backend=backend)
    (g,) = torch.autograd.grad(loss, a, torch.ones_like(loss))
    return loss.detach(), g


def _off_path_internal(tree, y):
    """For each pixel, an internal node off its target path (the case a compiled max drops), or -1."""
    path = tree.tables().path.bool()  # (V, L)
    internal = torch.tensor([not tree.is_leaf(v) for v in range(tree.num_nodes)])
    choice = torch.full(y.shape, -1, dtype=torch.long)
    for idx in range(y.numel()):
        label = int(y.view(-1)[idx])
        if label == 255:
            continue
        cands = (internal & ~path[:, label]).nonzero().view(-1)
        if cands.numel():
            choice.view(-1)[idx] = cands[torch.randint(cands.numel(), ())]
    return choice


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nan_logit_poisons_its_pixel_only(op, backend, device, dtype, monkeypatch):
    backend = _backend_or_skip(backend, device, op, monkeypatch)
    tree = trees.load("helen")  # depth 4: internal nodes off every path
    shape = (2, 9, 9)  # 162 pixels: full and partial 64-pixel CPU blocks, several Triton programs
    x, y = _inputs(tree, op, shape, dtype, device)
    clean_loss, clean_grad = _loss_and_grad(op, x, y, tree, "reference")
    hit = torch.rand(shape, device=device) < 0.25
    hit.view(-1)[:2] = True
    n, h, w = hit.nonzero(as_tuple=True)
    channel = torch.randint(0, x.shape[1], n.shape, device=device)
    if op != "hierarchical_softmax_loss":
        # half of the hits on an internal node off the target path: a max over its subtree must not drop it
        off = _off_path_internal(tree, y.cpu()).to(device)[n, h, w]
        use = (off >= 0) & (torch.rand(n.shape, device=device) < 0.5)
        channel = torch.where(use, off, channel)
    x[n, channel, h, w] = float("nan")

    loss, grad = _loss_and_grad(op, x, y, tree, backend)
    labelled = y != 255
    poisoned = hit & labelled
    assert torch.isnan(loss[poisoned]).all()
    assert (loss[hit & ~labelled] == 0).all()
    assert torch.isnan(grad.permute(0, 2, 3, 1)[poisoned]).all()
    assert (grad.permute(0, 2, 3, 1)[hit & ~labelled] == 0).all()
    # every other pixel as without the NaNs
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loss[~hit], clean_loss[~hit], **tol)
    torch.testing.assert_close(grad.permute(0, 2, 3, 1)[~hit].float(), clean_grad.permute(0, 2, 3, 1)[~hit].float(),
                               **tol)
    # and a reduction over a poisoned pixel is NaN
    for reduction in ("mean", "sum"):
        total, g = _loss_and_grad(op, x, y, tree, backend, reduction)
        assert torch.isnan(total)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["native", "native-pixel", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tree_min_inf_or_nan_at_the_path_root(backend, device, dtype, monkeypatch):
    backend = _backend_or_skip(backend, device, "tree_min_loss", monkeypatch)
    tree = trees.load("helen")
    shape = (1, 9, 9)  # 81 pixels: a full 64-pixel block (the CPU lane path) and a partial one
    x = torch.randn(1, tree.num_nodes, *shape[1:], dtype=torch.float64).to(dtype)
    y = torch.randint(0, tree.num_leaves, shape)
    roots = tree.tables().path_nodes[y, 0]  # (1, H, W): each pixel's depth-1 node
    hit = torch.rand(shape) < 0.3
    hit.view(-1)[0] = True
    n, h, w = hit.nonzero(as_tuple=True)
    x[n, roots[hit], h, w] = float("inf")
    x, y, hit = x.to(device), y.to(device), hit.to(device)
    loss, grad = _loss_and_grad("tree_min_loss", x, y, tree, backend)
    lref, gref = _loss_and_grad("tree_min_loss", x, y, tree, "reference")
    tol = dict(rtol=1e-9, atol=1e-11) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(loss, lref, **tol)
    torch.testing.assert_close(grad, gref, **tol)

    x[n, roots[hit.cpu()].to(device), h, w] = float("nan")
    loss, grad = _loss_and_grad("tree_min_loss", x, y, tree, backend)
    assert torch.isnan(loss[hit]).all() and torch.isnan(grad.permute(0, 2, 3, 1)[hit]).all()
    torch.testing.assert_close(loss[~hit], lref[~hit], **tol)


def test_reference_spec():
    """The rule as the reference states it, on a hand-made case: a flat tree is cross-entropy, and a NaN
    at one labelled pixel and one ignored pixel leaves the other two pixels' loss and gradient as
    cross-entropy's."""
    tree = hss_kernels.Tree.from_parents([-1] * 4)
    x = torch.randn(1, 4, 1, 4, dtype=torch.float64)
    y = torch.tensor([[[0, 1, 255, 3]]])
    x[0, 2, 0, 1] = float("nan")  # labelled pixel 1
    x[0, 0, 0, 2] = float("nan")  # ignored pixel 2
    a = x.clone().requires_grad_()
    loss = reference.hierarchical_softmax_loss(a, y, tree, reduction="none")
    (g,) = torch.autograd.grad(loss, a, torch.ones_like(loss))
    assert torch.isnan(loss[0, 0, 1]) and torch.isnan(g[0, :, 0, 1]).all()
    assert loss[0, 0, 2] == 0 and (g[0, :, 0, 2] == 0).all()
    for px in (0, 3):
        b = x[:, :, :, px:px + 1].clone().requires_grad_()
        ce = torch.nn.functional.cross_entropy(b, y[:, :, px:px + 1], reduction="none")
        (gce,) = torch.autograd.grad(ce, b, torch.ones_like(ce))
        torch.testing.assert_close(loss[0, 0, px], ce[0, 0, 0])
        torch.testing.assert_close(g[0, :, 0, px], gce[0, :, 0, 0])
