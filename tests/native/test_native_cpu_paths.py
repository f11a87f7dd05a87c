"""The native CPU loop's paths (csrc/cpu/loop.h): blocks of 64 pixels, read in place when they are whole
and contiguous, else gathered into a tile (across images, the last partial block, other layouts); float32
runs vectorised row passes, float64 the per-pixel code; OpenMP over blocks. Each against the reference
(on CUDA too, where they are plain comparisons), and thread counts that change nothing (the one test here
with two OpenMP threads: conftest gives every test one)."""
import pytest
import torch

from hss_kernels import native, trees

import helpers as H
from helpers import check, inputs

TREE_LOSSES = pytest.mark.parametrize("loss", H.NODE_LOSSES)


def test_hierarchical_softmax_blocks(backend, device):
    # 150 pixels an image: whole 64-pixel blocks are read from (and their gradient written to) the
    # tensors themselves, a block across two images and the partial last block go through the tile;
    # std 40 sends some in-place blocks to the per-pixel path, and random trees cover depths 1 to 4.
    for tree in (trees.load("vistas"), trees.load("helen"), H.random_tree(max_depth=5), H.random_tree(max_depth=5)):
        for std, eps in ((3.0, 0.0), (40.0, 1e-4)):
            x, y = inputs(tree, "hierarchical_softmax_loss", (2, 3, 50), std=std, device=device)
            check("hierarchical_softmax_loss", backend, x, y, tree, reduction="none", eps=eps)


@TREE_LOSSES
@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 9, 17), (1, 1, 131), (3, 2, 70)])
def test_tree_min_blocks(backend, device, loss, shape):
    """Every kind of block against the reference, with random and with tied logits; channels_last gives
    the same bits."""
    tree = trees.load("vistas")
    x, y = inputs(tree, loss, shape, device=device)
    check(loss, backend, x, y, tree, reduction="none")
    fn = H.api(loss, backend)
    a, ga, g = H.loss_and_grad(fn, x, y, tree, reduction="none")
    b, gb, _ = H.loss_and_grad(fn, x.contiguous(memory_format=torch.channels_last), y, tree, g, reduction="none")
    assert torch.equal(a, b) and torch.equal(ga, gb)
    x, y = inputs(tree, loss, shape, ties=True, device=device)
    check(loss, backend, x, y, tree, reduction="sum", gamma=2.0)
    deep = H.random_tree(min_depth=5)
    x, y = inputs(deep, loss, shape, ties=True, device=device)
    check(loss, backend, x, y, deep, gamma=0.5)


@TREE_LOSSES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_bad_labels_in_every_kind_of_block(backend, device, loss, dtype):
    """A label neither ignore_index nor in [0, L) gives a NaN loss (counted: the mean is NaN) and a NaN
    gradient row, every other pixel the reference's values, in blocks read from the input, gathered
    blocks and the last partial block (float32: the row passes; float64: the per-pixel code)."""
    tree = trees.load("vistas")
    x, y = inputs(tree, loss, (2, 9, 17), dtype)  # 153 pixels per image
    bad = torch.zeros(y.shape, dtype=torch.bool)
    for i, value in zip((0, 70, 140, 153 + 100, 2 * 153 - 1), (-1, tree.num_leaves, 1000, 254, -7)):
        y.view(-1)[i] = value
        bad.view(-1)[i] = True
    x, y, bad = x.to(device), y.to(device), bad.to(device)
    op = native.OPS[loss]  # the public API would reject the labels before any kernel runs

    out, gout, g = H.loss_and_grad(op, x, y, tree, reduction="none")
    ref, gref, _ = H.loss_and_grad(H.ref(loss), x, y.masked_fill(bad, 255), tree, g, reduction="none")
    assert torch.isnan(out[bad]).all() and not torch.isnan(out[~bad]).any()
    torch.testing.assert_close(out[~bad], ref[~bad], **H.TOL[dtype])
    rows, rows_ref = gout.permute(0, 2, 3, 1), gref.permute(0, 2, 3, 1)
    assert torch.isnan(rows[bad]).all()
    H.assert_grad_close(rows[~bad], rows_ref[~bad], dtype, H.upstream_size(g, y, "none"))
    mean, gmean, _ = H.loss_and_grad(op, x, y, tree, reduction="mean")
    assert torch.isnan(mean) and torch.isnan(gmean.permute(0, 2, 3, 1)[bad]).all()


@pytest.mark.parametrize("device", ["cpu"])  # OpenMP: the CPU's
@pytest.mark.parametrize("op", H.LOSSES + ("decode",))
def test_thread_counts_change_no_bit(backend, device, op):
    """One OpenMP thread or two: the same loss and gradient to the bit, mean and sum (the batch reduction
    sums per-block partials in a fixed order), and the same labels. Float64, several 64-pixel blocks;
    conftest runs every other test on one thread."""
    tree = trees.load("lip")
    threads = torch.get_num_threads()
    try:
        if op == "decode":
            x = H.random_logits(tree.num_nodes, (2, 33, 33))
            labels = []
            for n in (1, 2, 1, 2):
                torch.set_num_threads(n)
                labels.append(H.decoder(backend)(x, tree, "softmax", "mean"))
            assert all(torch.equal(a, labels[0]) for a in labels[1:])
            return
        x, y = inputs(tree, op, (2, 33, 33), torch.float64)
        fn = H.api(op, backend)
        one = torch.ones((), dtype=torch.float64)
        for reduction in ("mean", "sum"):
            runs = []
            for n in (1, 2):
                torch.set_num_threads(n)
                runs += [H.loss_and_grad(fn, x, y, tree, one, reduction=reduction) for _ in range(2)]
            for out, g, _ in runs[1:]:
                assert torch.equal(out, runs[0][0]) and torch.equal(g, runs[0][1]), reduction
    finally:
        torch.set_num_threads(threads)
