"""The native backend's ops ``torch.ops.hss_kernels.*`` called directly, on every device: opcheck (schema,
fake kernels, autograd registration), the fake kernels' gradient strides, argument checks, decode with
any path table, and no double backward."""
import pytest
import torch

import hss_kernels
from hss_kernels import trees
from hss_kernels.tables import tree_index

import helpers as H

ops = torch.ops.hss_kernels


def _views(channels, device):
    base = torch.randn(2, channels, 6, 8).to(device)
    yield base  # NCHW
    yield base.contiguous(memory_format=torch.channels_last)  # dense channels_last
    yield base.contiguous(memory_format=torch.channels_last)[:, :, ::2, 1:]  # not dense
    yield base[:, :, 1:4, :7]  # not dense, NCHW-ordered


def _target(x, tree):
    return torch.randint(0, tree.num_leaves, (x.shape[0],) + tuple(x.shape[2:])).to(x.device)


# ------------------------------------------------------------------------------------- opcheck
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck_hierarchical_softmax(backend, device, dtype):
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, "hierarchical_softmax_loss", (2, 3, 4), dtype, device=device)
    w = torch.rand(tree.depth, dtype=dtype).to(device)
    group = tree.tables(device).leaf_group
    for per_pixel in (False, True):
        args = (x.requires_grad_(), y, group, w, 0.0, 255, per_pixel)
        torch.library.opcheck(ops.hierarchical_softmax_fwd.default, args)
        loss, stats, _ = ops.hierarchical_softmax_fwd(*args)
        torch.library.opcheck(ops.hierarchical_softmax_bwd.default,
                              (torch.randn_like(loss), x.detach(), y, stats.detach(), group, w, 0.0, 255))


@pytest.mark.parametrize("extrema", [True, False])
def test_opcheck_tree_min(backend, device, extrema):
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, "tree_min_loss", (2, 3, 4), device=device)
    k = torch.rand(tree.num_nodes).to(device)
    idx = tree_index(tree, device)
    for per_pixel in (False, True):
        args = (x.requires_grad_(), y, idx, k, tree.num_leaves, tree.depth, 2.0, 0.0, 255, per_pixel, extrema)
        torch.library.opcheck(ops.tree_min_fwd.default, args)
        loss, _ = ops.tree_min_fwd(*args)
        torch.library.opcheck(ops.tree_min_bwd.default,
                              (torch.randn_like(loss), x.detach(), y, idx, k, tree.num_leaves, tree.depth, 2.0, 0.0,
                               255, extrema))


def test_opcheck_decode(backend, device):
    tree = trees.load("cityscapes")
    x = H.random_logits(tree.num_nodes, (1, 2, 2), device=device)
    torch.library.opcheck(ops.decode.default, (x, tree.tables(device).path_nodes, 1, 1))


# ------------------------------------------------------------------------------------- fake strides
# The backward ops' fake kernels give the gradient the strides the real kernels give it (logits as
# checks.h's dense_logits walks them): a sliced channels_last view is walked as a contiguous NCHW copy. With
# a plain empty_like the fake said channels_last, and torch.compile's stride assertion failed.
def test_hierarchical_softmax_bwd_fake_strides(backend, device):
    tree = trees.load("cityscapes")
    group, w = tree.tables(device).leaf_group, torch.rand(tree.depth).to(device)
    for x in _views(tree.num_leaves, device):
        y = _target(x, tree)
        _, stats, _ = ops.hierarchical_softmax_fwd(x, y, group, w, 0.0, 255, True)
        torch.library.opcheck(ops.hierarchical_softmax_bwd.default,
                              (torch.randn(y.shape).to(device), x, y, stats, group, w, 0.0, 255),
                              test_utils=("test_faketensor",))


def test_tree_min_bwd_fake_strides(backend, device):
    tree = trees.load("cityscapes")
    index, k = tree_index(tree, device), torch.rand(tree.num_nodes).to(device)
    for x in _views(tree.num_nodes, device):
        y = _target(x, tree)
        torch.library.opcheck(ops.tree_min_bwd.default,
                              (torch.randn(y.shape).to(device), x, y, index, k, tree.num_leaves, tree.depth, 2.0, 0.0,
                               255, True), test_utils=("test_faketensor",))


# ------------------------------------------------------------------------------------- argument checks
def test_tree_min_checks_its_arguments(backend, device):
    # (a label outside the tree gives NaN, not an error: tests/test_bad_labels.py)
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, "tree_min_loss", ignore_frac=0.0, device=device)
    args = (tree_index(tree, device), torch.ones(tree.num_nodes).to(device), tree.num_leaves, tree.depth, 2.0,
            0.0, 255, False, True)
    with pytest.raises(RuntimeError, match="tree_index"):
        ops.tree_min_fwd(x[:, 1:], y, *args)


def test_decode_checks_its_arguments(backend, device):
    tree = trees.load("cityscapes")
    x = H.random_logits(tree.num_nodes, (1, 2, 2), device=device)
    path = tree.tables(device).path_nodes
    with pytest.raises(RuntimeError, match="int32"):
        ops.decode(x, path.long(), 0, 0)
    with pytest.raises(ValueError, match="activation"):  # options: checked in Python, not by the op
        hss_kernels.decode(x, tree, activation="logit", backend="native")
    with pytest.raises(RuntimeError, match=r"\(N, C, H, W\)"):
        ops.decode(x[0], path, 0, 0)
    # a table pointing past the channels ends the path there instead of reading out of bounds
    bad = path.clone()
    bad[:, -1] = 1000
    assert ops.decode(x, bad, 0, 0).shape == (1, 2, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_any_path_table(backend, device, dtype):
    """The op takes any (L, D) table, not only a tree's: paths that share prefixes or repeat a node,
    end early (-1) or at an entry outside [0, C), or are empty (score 0). Against a direct float64 sum
    per leaf, at 117 pixels per image (on the CPU: full and partial blocks of the loop; float32 runs its
    row passes, float64 the per-pixel code the CUDA kernel runs)."""
    C, L, D = 7, 12, 4
    path = torch.randint(-1, C + 2, (L, D), dtype=torch.int32)
    path[0] = torch.tensor([2, 2, 5, 1])  # a repeated node
    path[1] = path[0]  # the same path as leaf 0: always a tie that leaf 0 wins
    path[2] = torch.tensor([2, 2, 5, -1])  # a prefix of leaf 0's path
    path[3, 0] = -1  # empty
    path[4] = torch.tensor([3, C, 1, 1])  # ends at an out-of-range entry
    x = H.random_logits(C, (2, 9, 13), dtype)
    xd = x.double()
    for act, a in ((0, torch.sigmoid(xd)), (1, torch.softmax(xd, dim=1)), (2, xd)):
        for score in (0, 1):
            cols = []
            for l in range(L):
                s, n = torch.zeros_like(a[:, 0]), 0
                for d in range(D):
                    c = int(path[l, d])
                    if c < 0 or c >= C:
                        break
                    s, n = s + a[:, c], n + 1
                cols.append(s / n if score == 1 and n > 0 else s)
            S = torch.stack(cols, dim=1)
            want = S.argmax(dim=1)
            got = ops.decode(x.to(device), path.contiguous().to(device), act, score).cpu()
            assert not bool((got == 1).any())
            diff = got != want
            if bool(diff.any()):
                gap = (S.gather(1, got[:, None]) - S.gather(1, want[:, None]))[:, 0].abs()[diff]
                tol = 1e-9 if dtype == torch.float64 else 2e-5
                assert float(gap.max()) <= tol, f"{int(diff.sum())} labels differ by up to {float(gap.max())}"


# ------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("loss", H.LOSSES)
def test_double_backward_raises(backend, device, loss):
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, loss, (1, 2, 2), torch.float64, device=device)
    x.requires_grad_()
    (g,) = torch.autograd.grad(getattr(hss_kernels, loss)(x, y, tree, backend="native"), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
