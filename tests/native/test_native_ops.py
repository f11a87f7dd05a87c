"""The native backend's ops ``torch.ops.hss_kernels.*`` called directly, on every device: opcheck (schema,
fake kernels, autograd registration), the fake kernels' gradient strides, argument checks, decode with
any walk table, and no double backward."""
import pytest
import torch

import hss_kernels
from hss_kernels import trees
from hss_kernels.tables import decode_walk, tree_index

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
    cw = torch.rand(tree.num_leaves, dtype=dtype).to(device)
    pw = torch.rand(y.shape, dtype=dtype).to(device).transpose(1, 2).contiguous().transpose(1, 2)  # strided
    for per_pixel in (False, True):
        args = (x.requires_grad_(), y, group, w, 0.0, 255, per_pixel)
        torch.library.opcheck(ops.hierarchical_softmax_fwd.default, args)
        loss, stats, _, _ = ops.hierarchical_softmax_fwd(*args)
        torch.library.opcheck(ops.hierarchical_softmax_bwd.default,
                              (torch.randn_like(loss), x.detach(), y, stats.detach(), group, w, 0.0, 255))
        # with class and pixel weights (the last two arguments)
        wargs = args + (0, False, cw, pw)
        torch.library.opcheck(ops.hierarchical_softmax_fwd.default, wargs)
        loss, stats, _, _ = ops.hierarchical_softmax_fwd(*wargs)
        torch.library.opcheck(ops.hierarchical_softmax_bwd.default,
                              (torch.randn_like(loss), x.detach(), y, stats.detach(), group, w, 0.0, 255, 0, False,
                               cw, pw))


@pytest.mark.parametrize("extrema", [True, False])
def test_opcheck_tree_min(backend, device, extrema):
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, "tree_min_loss", (2, 3, 4), device=device)
    k = torch.rand(tree.num_nodes).to(device)
    idx = tree_index(tree, device)
    for per_pixel in (False, True):
        args = (x.requires_grad_(), y, idx, k, tree.num_leaves, tree.depth, 2.0, 0.0, 255, per_pixel, extrema)
        torch.library.opcheck(ops.tree_min_fwd.default, args)
        loss, _, _ = ops.tree_min_fwd(*args)
        torch.library.opcheck(ops.tree_min_bwd.default,
                              (torch.randn_like(loss), x.detach(), y, idx, k, tree.num_leaves, tree.depth, 2.0, 0.0,
                               255, extrema))


def test_opcheck_decode(backend, device):
    tree = trees.load("cityscapes")
    x = H.random_logits(tree.num_nodes, (1, 2, 2), device=device)
    walk, ordered = decode_walk(tree, device, False)
    torch.library.opcheck(ops.decode.default, (x, walk, ordered, 1, 1))


# ------------------------------------------------------------------------------------- fake strides
# The backward ops' fake kernels give the gradient the strides the real kernels give it (logits as
# checks.h's dense_logits walks them): a sliced channels_last view is walked as a contiguous NCHW copy. With
# a plain empty_like the fake said channels_last, and torch.compile's stride assertion failed.
def test_hierarchical_softmax_bwd_fake_strides(backend, device):
    tree = trees.load("cityscapes")
    group, w = tree.tables(device).leaf_group, torch.rand(tree.depth).to(device)
    for x in _views(tree.num_leaves, device):
        y = _target(x, tree)
        _, stats, _, _ = ops.hierarchical_softmax_fwd(x, y, group, w, 0.0, 255, True)
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
    walk, ordered = decode_walk(tree, device, False)
    with pytest.raises(RuntimeError, match="int32"):
        ops.decode(x, walk.long(), ordered, 0, 0)
    with pytest.raises(RuntimeError, match=r"\(3, C\)"):
        ops.decode(x, walk[:, 1:].contiguous(), ordered, 0, 0)
    with pytest.raises(ValueError, match="activation"):  # options: checked in Python, not by the op
        hss_kernels.decode(x, tree, activation="logit", backend="native")
    with pytest.raises(RuntimeError, match=r"\(N, C, H, W\)"):
        ops.decode(x[0], walk, ordered, 0, 0)
    bad = walk.clone()
    bad[0, -1] = 1000  # a channel past the logits'
    if device == "cpu":  # the CPU host reads the table and rejects it
        with pytest.raises(RuntimeError, match="channel"):
            ops.decode(x, bad, ordered, 0, 0)
    else:  # the CUDA kernel clamps it into range instead of reading out of bounds
        assert ops.decode(x, bad, ordered, 0, 0).shape == (1, 2, 2)
    if device == "cpu":
        for row, col, value, match in ((1, 0, 0, "depth"), (1, 3, 9, "depth"), (1, 1, 3, "pre-order"),
                                       (2, 1, 5, "leaf ids"), (2, 1, -1, "leaf ids")):
            bad = walk.clone()
            bad[row, col] = value
            with pytest.raises(RuntimeError, match=match):
                ops.decode(x, bad, False, 0, 0)


def _walk_paths(walk):
    """Per leaf id, the channels on its path: the pre-order walk's chains of open nodes."""
    chain, paths = {}, {}
    for c, d, l in walk.t().tolist():
        chain[d] = c
        if l >= 0:
            paths[l] = [chain[k] for k in range(1, d + 1)]
    return [paths[l] for l in range(len(paths))]


# A walk that is no tree: channels repeat (2 at depths 1 and 2 and twice as a leaf), leaf ids are not in
# pre-order, leaves 3 and 0 have the same path (an exact tie, met in that order: 0 must win), depth-1 leaves.
_ODD_WALK = [[2, 5, 5, 2, 7, 1, 0, 3, 2],
             [1, 2, 2, 2, 3, 1, 1, 2, 2],
             [-1, 3, 0, -1, 5, 1, -1, 4, 2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_decode_any_walk(backend, device, dtype):
    """The op takes any pre-order walk, not only a tree's: repeated channels, leaf ids in any order
    (a tie met in reverse id order still goes to the lowest id), depth-1 leaves, a chain 8 deep. Against a
    direct float64 sum per leaf, at 117 pixels per image (on the CPU: full and partial blocks of the loop;
    float32 runs its row passes, float64 the per-pixel walk the CUDA kernel runs)."""
    deep = [[4, 6, 0, 1, 5, 3, 2, 7, 8], list(range(1, 9)) + [2], [-1] * 7 + [1, 0]]  # a chain of 8, a leaf at 2
    for rows in (_ODD_WALK, deep):
        walk = torch.tensor(rows, dtype=torch.int32)
        C = walk.shape[1]
        paths = _walk_paths(walk)
        x = H.random_logits(C, (2, 9, 13), dtype)
        xd = x.double()
        for act, a in ((0, torch.sigmoid(xd)), (1, torch.softmax(xd, dim=1)), (2, xd)):
            for score in (0, 1):
                S = torch.stack([sum(a[:, c] for c in p) / (len(p) if score else 1) for p in paths], dim=1)
                want = S.argmax(dim=1)
                got = ops.decode(x.to(device), walk.to(device), False, act, score).cpu()
                if rows is _ODD_WALK:
                    assert not bool((got == 3).any())  # leaf 3 always ties with leaf 0
                diff = got != want
                if bool(diff.any()):
                    gap = (S.gather(1, got[:, None]) - S.gather(1, want[:, None]))[:, 0].abs()[diff]
                    tol = 1e-9 if dtype == torch.float64 else 2e-5
                    assert float(gap.max()) <= tol, f"{int(diff.sum())} labels differ by up to {float(gap.max())}"
    walk = torch.tensor(_ODD_WALK, dtype=torch.int32)
    if device == "cpu":  # the CPU checks the ordered flag; the CUDA kernel trusts it
        with pytest.raises(RuntimeError, match="ordered"):
            ops.decode(H.random_logits(9, (1, 2, 2), dtype), walk, True, 0, 0)


# ------------------------------------------------------------------------------------- autograd
@pytest.mark.parametrize("loss", H.LOSSES)
def test_double_backward_raises(backend, device, loss):
    tree = trees.load("cityscapes")
    x, y = H.inputs(tree, loss, (1, 2, 2), torch.float64, device=device)
    x.requires_grad_()
    (g,) = torch.autograd.grad(getattr(hss_kernels, loss)(x, y, tree, backend="native"), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
