"""The CUDA hierarchical softmax's NCHW path (V pixels per thread), checked on the CPU.

On a GPU, float32 / float16 / bfloat16 logits with contiguous, aligned channel planes and a tree at most
4 deep (``kPackedDepth``) go through ``hierarchical_softmax_forward_pixels`` and
``hierarchical_softmax_backward_pixels`` of csrc/include/hierarchical_softmax_math.h, V = 4 (float32) or
8 (16-bit) pixels per thread. ``HSS_CPU_PIXEL_PATH=1`` runs the same functions on the CPU over each block's
pixels, V at a time, so the last group of a block is partial when the block's size is not a multiple
of V: the sizes below make sure of that (one pixel; 21 or 65 pixels per image), whatever the layout.
"""
import pytest
import torch

from hss_kernels import native, tables, trees

import helpers as H
from helpers import inputs

pytestmark = pytest.mark.parametrize("device", ["cpu"])
LOSS = "hierarchical_softmax_loss"
FLOATS = pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
# (N, H, W): one pixel; 42 pixels (groups of 4 and of 8 end partial); 65 per image (a second block of 1
# pixel, then a block across the images)
SHAPES = [(1, 1, 1), (2, 3, 7), (2, 5, 13)]


@pytest.fixture(autouse=True)
def pixel_path(monkeypatch):
    monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")


def _trees():
    # depths 3 (Vistas), 2 (Cityscapes), and random ones of depth 1 to 4 (every packed slot in use)
    return [trees.load("vistas"), trees.load("cityscapes")] + [
        H.random_tree(min_nodes=3, max_nodes=20, min_depth=d, max_depth=d, seed=d) for d in (1, 2, 4)]


@FLOATS
@pytest.mark.parametrize("shape", SHAPES)
def test_vec_path_matches_reference(backend, device, dtype, shape):
    for tree in _trees():
        assert tree.depth <= 4
        x, y = inputs(tree, LOSS, shape, dtype, ignore_frac=0.2)
        H.check(LOSS, "native", x, y, tree, reduction="mean")
        H.check(LOSS, "native", x, y, tree, reduction="sum", eps=1e-4, level_weights=[0.5 + d for d in range(tree.depth)])
        for go in H.grad_outs(shape, transposed=shape[1] > 1):
            H.check(LOSS, "native", x.contiguous(memory_format=torch.channels_last), y, tree, grad_out=go,
                    reduction="none")


@FLOATS
def test_vec_path_far_groups_and_ties(backend, device, dtype):
    tree = trees.load("vistas")
    for kw in (dict(std=40.0), dict(ties=True)):
        x, y = inputs(tree, LOSS, (2, 3, 7), dtype, ignore_frac=0.15, **kw)
        for eps in (0.0, 1e-4):
            H.check(LOSS, "native", x, y, tree, reduction="none", eps=eps)


@FLOATS
def test_vec_path_all_ignored_and_bad_labels(backend, device, dtype):
    tree = trees.load("vistas")
    x, y = inputs(tree, LOSS, (2, 3, 7), dtype, ignore_frac=1.0, edges=False)
    H.check(LOSS, "native", x, y, tree, reduction="sum")
    x[:, :, 0, 1] = float("nan")  # an ignored pixel's NaN logits stay out of every sum and gradient
    loss, g, _ = H.loss_and_grad(H.api(LOSS, "native"), x, y, tree, reduction="sum")
    assert loss == 0 and (g == 0).all()
    x, y = inputs(tree, LOSS, (2, 3, 7), dtype, ignore_frac=0.2)
    bad = torch.zeros(y.shape, dtype=torch.bool)
    bad.view(-1)[[3, 8, 41]] = True  # in a group with good pixels, at a group's start, in the last group
    y[bad] = torch.tensor([-1, tree.num_leaves, 1000])
    good = y != 255
    loss, g, _ = H.loss_and_grad(native.OPS[LOSS], x, y, tree, reduction="none")  # past the label check
    assert torch.isnan(loss[bad]).all() and not torch.isnan(loss[~bad]).any()
    rows = g.permute(0, 2, 3, 1)
    assert torch.isnan(rows[bad]).all() and not torch.isnan(rows[~bad]).any()
    assert (rows[~good] == 0).all()


def test_vec_path_is_bitwise_deterministic(backend, device):
    tree = trees.load("vistas")
    x, y = inputs(tree, LOSS, (2, 5, 13), ignore_frac=0.1)
    H.assert_bitwise_deterministic(H.api(LOSS, "native"), x, y, tree, reduction="mean")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_vec_path_runs(backend, device, dtype, monkeypatch):
    """A property only the V-pixel forward has: level D's group is the label's leaf alone, so it saves
    lse_D = z_y itself, where the one-pixel function and the row pass save m + log(e^(z_y - m)), which
    rounds. So the saved statistic equals the label's logit bit for bit with the switch on (the tests
    above do run the V-pixel code), and, for float32 logits, not everywhere with it off."""
    tree = trees.load("vistas")
    x, y = inputs(tree, LOSS, (2, 5, 13), dtype, ignore_frac=0.1)
    group = tables.leaf_group(tree, x.device)
    w = tables.level_weight_vector(tree, None, torch.float32, x.device)

    def saved_lse_d():
        _, stats, _, _ = torch.ops.hss_kernels.hierarchical_softmax_fwd(x, y, group, w, 0.0, 255, True, 0, False)
        valid = y != 255
        zy = x.float().gather(1, y.clamp(max=tree.num_leaves - 1).unsqueeze(1)).squeeze(1)
        return stats[tree.depth][valid], zy[valid]

    got, zy = saved_lse_d()
    assert torch.equal(got, zy)
    if dtype == torch.float32:  # (bfloat16's few digits survive the rounding of the other paths)
        monkeypatch.delenv("HSS_CPU_PIXEL_PATH")
        got, zy = saved_lse_d()
        assert not torch.equal(got, zy)
