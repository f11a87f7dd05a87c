"""The Triton tree-min forward's focal terms in pairs (tree_min._focal2_pair, 2-byte NCHW logits, γ = 2, eps = 0:
pixels 2i, 2i + 1 of a thread share one reciprocal 1 / (p0 p1), every FORWARD_PAIR-th node's by FMAs), run by the
interpreter with the GPU's tiles and the interpreter's against the reference, on logits that stress a pair: its two
pixels far apart (one past the clamp at z = 43, the other not; opposite signs), +inf and -inf next to finite values,
a NaN logit in one pixel of a pair (the other's loss must stay finite and right), a tree with an odd node count."""
import pytest
import torch

from hss_kernels import reference, trees

import helpers as H

tm = pytest.importorskip("hss_kernels.triton.tree_min")

PAIRS = [0, 1, tm.FORWARD_PAIR]


def _stressed_logits(tree, shape, dtype):
    """Logits (N, V, H, W) drawn in float64, then ``dtype``; each pixel from one regime: plain N(0, 3); "split":
    |x| in 20 .. 90 with the sign alternating along the nodes and along the row (the two pixels of a pair opposite,
    one of them past the clamp where the other is not); "inf": 4% of the nodes +inf or -inf, the rest N(0, 3);
    "edge": values at and around the clamp (±42, ±43, ±43.5, ±44) and 0."""
    N, H, W = shape
    V = tree.num_nodes
    x = torch.randn(N, V, H, W, dtype=torch.float64) * 3
    kind = torch.randint(0, 4, (N, 1, H, W))
    node_sign = 1.0 - 2.0 * (torch.arange(V) % 2).double().view(1, V, 1, 1)
    pixel_sign = 1.0 - 2.0 * (torch.arange(W) % 2).double().view(1, 1, 1, W)
    split = torch.empty(N, V, H, W, dtype=torch.float64).uniform_(20, 90) * node_sign * pixel_sign
    inf = torch.where(torch.rand(N, V, H, W) < 0.5, float("inf"), float("-inf")).double()
    edge_vals = torch.tensor([42.0, 43.0, 43.5, 44.0, -42.0, -43.0, -43.5, -44.0, 0.0], dtype=torch.float64)
    edge = edge_vals[torch.randint(0, len(edge_vals), (N, V, H, W))]
    x = torch.where(kind == 1, split, x)
    x = torch.where((kind == 2) & (torch.rand(N, V, H, W) < 0.04), inf, x)
    x = torch.where(kind == 3, edge, x)
    return x.to(dtype)


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's NaN arithmetic
@pytest.mark.parametrize("tiles", ["interpreter", "gpu_blocks"])
@pytest.mark.parametrize("pair", PAIRS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_tree_min_loss_terms_in_pairs(tiles, pair, dtype, monkeypatch):
    """Per-pixel loss and the mean against the reference; a NaN logit's pixel NaN, the other pixel of its pair
    (finite logits, or a +inf next to the NaN) its own loss."""
    monkeypatch.setattr(tm, "FORWARD_PAIR", pair)
    if tiles == "gpu_blocks":
        monkeypatch.setattr(tm, "_blocks", tm.gpu_blocks)
    tree = trees.load("vistas_v2")  # 147 nodes
    shape = (1, 3, 301)  # pixels h * 301 + w: pairs (2i, 2i + 1) straddle the rows' ends
    x = _stressed_logits(tree, shape, dtype)
    y = H.inputs(tree, "tree_min_loss", shape)[1]
    # NaN pixels and the other pixel of their pair: (1, 40) is pixel 341, paired with (1, 39); (2, 10) is 612,
    # paired with (2, 11), whose logits hold a +inf in the NaN's channel (its loss inf) and are plain elsewhere.
    for (h, w), (hp, wp) in (((1, 40), (1, 39)), ((2, 10), (2, 11))):
        assert (h * shape[2] + w) ^ 1 == hp * shape[2] + wp
        x[0, :, hp, wp] = (torch.randn(tree.num_nodes) * 3).to(dtype)
        x[0, 5, h, w] = float("nan")
        y[0, h, w] = y[0, hp, wp] = 1
    x[0, 5, 2, 11] = float("inf")
    assert tm._pair(x, 1, 0) == pair  # the launch pairs the terms (loss alone)
    tol = H.loss_tolerance("tree_min_loss", x, tree)

    loss = tm.tree_min_loss(x, y, tree, reduction="none", gamma=2.0)
    ref = reference.tree_min_loss(x, y, tree, reduction="none", gamma=2.0)
    assert torch.isnan(loss[0, 1, 40]) and torch.isnan(loss[0, 2, 10])
    ok = ~torch.isnan(ref)
    assert int((~ok).sum()) == 2  # the NaN pixels only
    torch.testing.assert_close(loss[ok], ref[ok], **tol)
    assert torch.isfinite(loss[0, 1, 39]) and torch.isinf(loss[0, 2, 11])
    assert torch.isinf(ref).any() and torch.isfinite(ref).sum() > ref.numel() // 2  # the regimes all occur

    xc = torch.where(torch.isfinite(x), x, torch.full_like(x, 60.0))  # a finite mean: no NaN or inf
    for kw in (dict(gamma=2.0), dict(gamma=2.0, scale=3.0, normalize="node")):
        torch.testing.assert_close(tm.tree_min_loss(xc, y, tree, **kw), reference.tree_min_loss(xc, y, tree, **kw),
                                   **tol)


def test_pairs_only_where_a_thread_holds_pixel_pairs():
    """tree_min._pair: the 2-byte loss alone on NCHW or strided logits; never on channels_last (a pixel per
    thread), for 4-byte logits, the gradient or the single pass."""
    x = torch.zeros(1, 5, 4, 6, dtype=torch.bfloat16)
    assert tm._pair(x, 1, 0) == tm._pair(x, 2, 0) == tm._pair(x[..., ::2], 2, 0) == tm.FORWARD_PAIR
    assert tm._pair(x.contiguous(memory_format=torch.channels_last), 2, 0) == -1
    assert tm._pair(x.float(), 2, 0) == tm._pair(x.double(), 2, 0) == -1
    assert tm._pair(x, 0, 1) == tm._pair(x, 2, 1) == -1
