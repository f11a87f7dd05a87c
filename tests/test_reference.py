"""The pure-PyTorch reference against F.cross_entropy, hand computations and a slow per-pixel version."""
import math
import random

import pytest
import torch
import torch.nn.functional as F

from hss_kernels import Tree, reference, trees

import helpers

# ------------------------------------------------------------------ an independent slow implementation
# Plain Python over pixels and nodes, written from MATH.md without reusing the reference or the tables.


def _anc_or_self(tree, c):
    chain = [c]
    while tree.parents[chain[-1]] >= 0:
        chain.append(tree.parents[chain[-1]])
    return chain[::-1]  # root side first


def _desc_or_self(tree, c):
    return [u for u in range(tree.num_nodes) if c in _anc_or_self(tree, u)]


def _lse(values):
    m = max(values)
    return m + math.log(sum(math.exp(v - m) for v in values))


def slow_softmax_pixel(z, y, tree, w, eps):
    leaf_anc = [_anc_or_self(tree, tree.leaf_channels[k]) for k in range(tree.num_leaves)]

    def a(k, d):
        return leaf_anc[k][d - 1] if len(leaf_anc[k]) >= d else leaf_anc[k][-1]

    lse = _lse(z)
    loss = 0.0
    for d in range(1, tree.depth + 1):
        lse_d = _lse([z[k] for k in range(tree.num_leaves) if a(k, d) == a(y, d)])
        loss += w[d - 1] * ((lse - lse_d) if eps == 0 else -math.log(math.exp(lse_d - lse) + eps))
    return loss


def _sig(x):
    return 1 / (1 + math.exp(-x))


def slow_node_pixel(x, y, tree, gamma, scale, eps, normalize, extrema):
    V = tree.num_nodes
    path = set(_anc_or_self(tree, tree.leaf_channels[y]))
    loss = 0.0
    for v in range(V):
        if v in path:
            q = min(_sig(x[u]) for u in _anc_or_self(tree, v)) if extrema else _sig(x[v])
            lv = -((1 - q) ** gamma) * math.log(q + eps)
        else:
            r = max(_sig(x[u]) for u in _desc_or_self(tree, v)) if extrema else _sig(x[v])
            lv = -(r ** gamma) * math.log(1 - r + eps)
        if normalize == "level":
            k = scale / sum(1 for u in range(V) if tree.depths[u] == tree.depths[v])
        else:
            k = scale / V
        loss += k * lv
    return loss


def slow_tree_min_grad_pixel(x, y, tree, gamma, scale):
    """MATH.md §3's gradient: each term's gradient goes to its arg-min/arg-max node only."""
    V = tree.num_nodes
    path = set(_anc_or_self(tree, tree.leaf_channels[y]))
    g = [0.0] * V
    for v in range(V):
        k = scale / sum(1 for u in range(V) if tree.depths[u] == tree.depths[v])
        if v in path:
            cand = _anc_or_self(tree, v)
            m = min(cand, key=lambda u: x[u])  # first minimum in root-first order
            q = _sig(x[m])
            g[m] += k * (gamma * q * (1 - q) ** gamma * math.log(q) - (1 - q) ** (gamma + 1))
        else:
            cand = sorted(_desc_or_self(tree, v), key=lambda u: tree.dfs_pos[u])
            M = max(cand, key=lambda u: x[u])  # first maximum in pre-order
            r = _sig(x[M])
            g[M] += k * (r ** (gamma + 1) - gamma * r ** gamma * (1 - r) * math.log(1 - r))
    return g


def random_target(N, H, W, L, p_ignore=0.2):
    y = torch.randint(0, L, (N, H, W))
    y[torch.rand(N, H, W) < p_ignore] = 255
    return y


# ------------------------------------------------------------------ flat tree == cross-entropy
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_flat_tree_is_cross_entropy(reduction):
    L = 7
    tree = Tree.from_parents([-1] * L)
    x = torch.randn(3, L, 5, 6, dtype=torch.float64, requires_grad=True)
    y = random_target(3, 5, 6, L)
    ours = reference.hierarchical_softmax_loss(x, y, tree, reduction=reduction)
    theirs = F.cross_entropy(x, y, ignore_index=255, reduction=reduction)
    torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ours)
    (gx,) = torch.autograd.grad(ours, x, g)
    (gy,) = torch.autograd.grad(theirs, x, g)
    torch.testing.assert_close(gx, gy, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ hand-computed cases
UNBALANCED = "p\n\ta\n\tb\n\t\tb1\n\t\tb2\nc\n"  # leaves a (depth 2), b1, b2 (depth 3), c (depth 1)


def test_hand_computed_softmax_unbalanced():
    tree = Tree.from_text(UNBALANCED)
    assert tree.leaf_names == ["a", "b1", "b2", "c"] and tree.depth == 3
    z = [0.3, -1.2, 2.0, 0.5]
    e = [math.exp(v) for v in z]
    tot = sum(e)
    x = torch.tensor(z, dtype=torch.float64).view(1, 4, 1, 1)
    # label b2: groups {a,b1,b2} at depth 1, {b1,b2} at depth 2, {b2} at depth 3
    want = -math.log((e[0] + e[1] + e[2]) / tot) - math.log((e[1] + e[2]) / tot) - math.log(e[2] / tot)
    got = reference.hierarchical_softmax_loss(x, torch.tensor([[[2]]]), tree)
    assert got.item() == pytest.approx(want, rel=1e-12)
    # label c, a leaf at depth 1: its own group at every depth, so it counts three times
    got = reference.hierarchical_softmax_loss(x, torch.tensor([[[3]]]), tree)
    assert got.item() == pytest.approx(-3 * math.log(e[3] / tot), rel=1e-12)
    # level weights and the paper's eps form
    w = [0.5, 2.0, 1.0]
    got = reference.hierarchical_softmax_loss(x, torch.tensor([[[0]]]), tree, level_weights=w, eps=1e-4)
    P = [(e[0] + e[1] + e[2]) / tot, e[0] / tot, e[0] / tot]
    assert got.item() == pytest.approx(-sum(wi * math.log(p + 1e-4) for wi, p in zip(w, P)), rel=1e-12)


def test_hand_computed_tree_min_unbalanced():
    tree = Tree.from_text(UNBALANCED)
    # channels: a=0, b1=1, b2=2, c=3 (leaves), b=4 (depth 2), p=5 (depth 1)
    assert tree.names == ["a", "b1", "b2", "c", "b", "p"]
    xs = [0.4, -0.3, 1.5, -2.0, 0.9, -0.1]
    s = [_sig(v) for v in xs]
    x = torch.tensor(xs, dtype=torch.float64).view(1, 6, 1, 1)
    gamma, scale, eps = 2.0, 5.0, 1e-8
    # label b2: path {p, b, b2}. Positives: q_p = s_p, q_b = min(s_p, s_b), q_b2 = min(s_p, s_b, s_b2).
    pos = {5: s[5], 4: min(s[5], s[4]), 2: min(s[5], s[4], s[2])}
    # negatives: a, b1, c are leaves (r = s); none is internal
    neg = {0: s[0], 1: s[1], 3: s[3]}
    per_depth = {1: 2, 2: 2, 3: 2}  # |V_d|: {p, c}, {a, b}, {b1, b2}
    want = 0.0
    for v, q in pos.items():
        want += scale / per_depth[tree.depths[v]] * -((1 - q) ** gamma) * math.log(q + eps)
    for v, r in neg.items():
        want += scale / per_depth[tree.depths[v]] * -(r ** gamma) * math.log(1 - r + eps)
    got = reference.tree_min_loss(x, torch.tensor([[[2]]]), tree, gamma=gamma, scale=scale, eps=eps)
    assert got.item() == pytest.approx(want, rel=1e-10)
    # label c: path {c}; p and b are internal negatives: r_p = max over {p, a, b, b1, b2}
    got = reference.tree_min_loss(x, torch.tensor([[[3]]]), tree, gamma=0.0, normalize="node")
    r_p, r_b = max(s[5], s[0], s[4], s[1], s[2]), max(s[4], s[1], s[2])
    want = -math.log(s[3]) - sum(math.log(1 - r) for r in (r_p, r_b, s[0], s[1], s[2]))
    assert got.item() == pytest.approx(want / 6, rel=1e-12)


# ------------------------------------------------------------------ slow per-pixel agreement
@pytest.mark.parametrize("seed", range(4))
def test_softmax_matches_slow(seed):
    tree = helpers.random_tree(min_nodes=4, max_nodes=14, max_depth=14, seed=seed)
    N, H, W = 2, 3, 4
    x = torch.randn(N, tree.num_leaves, H, W, dtype=torch.float64) * 3
    y = random_target(N, H, W, tree.num_leaves)
    w = [random.Random(seed).uniform(0.2, 2) for _ in range(tree.depth)]
    eps = [0.0, 1e-3][seed % 2]
    got = reference.hierarchical_softmax_loss(x, y, tree, level_weights=w, eps=eps, reduction="none")
    for n in range(N):
        for i in range(H):
            for j in range(W):
                if y[n, i, j] == 255:
                    assert got[n, i, j] == 0
                    continue
                want = slow_softmax_pixel(x[n, :, i, j].tolist(), int(y[n, i, j]), tree, w, eps)
                assert got[n, i, j].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("loss", ["tree_min", "tree_bce"])
def test_node_losses_match_slow(seed, loss):
    tree = helpers.random_tree(min_nodes=4, max_nodes=14, max_depth=14, seed=seed + 10)
    N, H, W = 2, 3, 3
    x = torch.randn(N, tree.num_nodes, H, W, dtype=torch.float64) * 2
    y = random_target(N, H, W, tree.num_leaves)
    gamma = [0.0, 2.0, 0.5, 1.0][seed]
    scale = [1.0, 5.0][seed % 2]
    eps = [0.0, 1e-8][seed % 2]
    normalize = ["level", "node"][seed // 2 % 2]
    fn = reference.tree_min_loss if loss == "tree_min" else reference.tree_bce_loss
    got = fn(x, y, tree, gamma=gamma, scale=scale, eps=eps, normalize=normalize, reduction="none")
    for n in range(N):
        for i in range(H):
            for j in range(W):
                if y[n, i, j] == 255:
                    assert got[n, i, j] == 0
                    continue
                want = slow_node_pixel(x[n, :, i, j].tolist(), int(y[n, i, j]), tree, gamma, scale, eps,
                                       normalize, loss == "tree_min")
                assert got[n, i, j].item() == pytest.approx(want, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_tree_min_gradient_matches_math(seed):
    """Autograd through the reference gives MATH.md §3's hand-written gradient (argmin/argmax routing)."""
    tree = helpers.random_tree(min_nodes=4, max_nodes=14, max_depth=14, seed=seed + 20)
    gamma = [0.0, 2.0, 1.5][seed]
    x = torch.randn(1, tree.num_nodes, 2, 3, dtype=torch.float64, requires_grad=True)
    x.data[0, :, 0, 0] = 0.25  # every node tied: the first node in pre-order takes the gradient
    y = torch.randint(0, tree.num_leaves, (1, 2, 3))
    loss = reference.tree_min_loss(x, y, tree, gamma=gamma, scale=2.0, reduction="sum")
    (g,) = torch.autograd.grad(loss, x)
    for i in range(2):
        for j in range(3):
            want = slow_tree_min_grad_pixel(x[0, :, i, j].tolist(), int(y[0, i, j]), tree, gamma, 2.0)
            torch.testing.assert_close(g[0, :, i, j], torch.tensor(want, dtype=torch.float64))


# ------------------------------------------------------------------ gradcheck, ignored pixels, no mutation
def _gradcheck_inputs(C, L):
    x = torch.randn(2, C, 3, 2, dtype=torch.float64, requires_grad=True)
    y = random_target(2, 3, 2, L, p_ignore=0.3)
    return x, y


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_gradcheck_every_loss(reduction):
    tree = trees.load("helen")
    x, y = _gradcheck_inputs(tree.num_leaves, tree.num_leaves)
    assert torch.autograd.gradcheck(
        lambda a: reference.hierarchical_softmax_loss(a, y, tree, level_weights=[1, 0.5, 2, 1], reduction=reduction), x)
    assert torch.autograd.gradcheck(
        lambda a: reference.hierarchical_softmax_loss(a, y, tree, eps=1e-3, reduction=reduction), x)
    x, y = _gradcheck_inputs(tree.num_nodes, tree.num_leaves)
    for gamma in (0.0, 2.0):
        assert torch.autograd.gradcheck(
            lambda a: reference.tree_min_loss(a, y, tree, gamma=gamma, scale=5.0, reduction=reduction), x)
        assert torch.autograd.gradcheck(
            lambda a: reference.tree_bce_loss(a, y, tree, gamma=gamma, eps=1e-8, reduction=reduction), x)


def test_gradcheck_triplet():
    tree = trees.load("cityscapes")
    e = torch.randn(2, 5, 4, 4, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 1, 2, 11, 12, 13, 14, 255]).repeat(8)[torch.randperm(64)].view(2, 4, 8).repeat_interleave(2, 1)
    assert torch.autograd.gradcheck(lambda a: reference.tree_triplet_loss(a, y, tree, sampling="first"), e)


@pytest.mark.parametrize("name", ["hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss"])
def test_all_ignored_mean_is_zero_with_zero_grad(name):
    tree = trees.load("pascal_person_part")
    C = tree.num_leaves if name == "hierarchical_softmax_loss" else tree.num_nodes
    x = torch.randn(2, C, 3, 3, requires_grad=True)
    y = torch.full((2, 3, 3), 255)
    loss = getattr(reference, name)(x, y, tree)
    loss.backward()
    assert loss.item() == 0 and not torch.isnan(loss)
    assert torch.count_nonzero(x.grad) == 0


def test_reference_leaves_inputs_unchanged():
    tree = trees.load("lip")
    for name, C in [("hierarchical_softmax_loss", 20), ("tree_min_loss", 25), ("tree_bce_loss", 25)]:
        x = torch.randn(2, C, 4, 5, requires_grad=True)
        y = random_target(2, 4, 5, 20)
        x0, y0 = x.detach().clone(), y.clone()
        getattr(reference, name)(x, y, tree).backward()
        assert torch.equal(x.detach(), x0) and torch.equal(y, y0)
    e = torch.randn(1, 4, 4, 5)
    e0 = e.clone()
    reference.tree_triplet_loss(e, y[:1], tree)
    assert torch.equal(e, e0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_float32(dtype):
    tree = trees.load("vistas")
    x = torch.randn(2, 66, 4, 4, requires_grad=True)
    y = random_target(2, 4, 4, 66)
    xh = x.detach().to(dtype).requires_grad_()
    lh = reference.hierarchical_softmax_loss(xh, y, tree)
    lf = reference.hierarchical_softmax_loss(xh.detach().float(), y, tree)
    assert lh.dtype == torch.float32 and lh.item() == pytest.approx(lf.item(), rel=1e-6)
    lh.backward()
    assert xh.grad.dtype == dtype


def test_channels_last_equals_contiguous():
    tree = trees.load("cityscapes")
    x = torch.randn(2, 26, 5, 7)
    y = random_target(2, 5, 7, 19)
    a = reference.tree_min_loss(x, y, tree, reduction="none")
    b = reference.tree_min_loss(x.to(memory_format=torch.channels_last), y, tree, reduction="none")
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------ triplet, decode, labels_at_depth
def slow_triplet(e, y, tree, margin, k_max):
    """HSSN's loop, first-k in raster order, with ignored pixels excluded."""
    e = F.normalize(e, dim=1)
    feats = e.permute(0, 2, 3, 1).reshape(-1, e.shape[1])
    lab = y.reshape(-1).tolist()
    parent = [tree.parents[c] for c in tree.leaf_channels]
    losses = []
    for c in sorted(set(lab) - {255}):
        A = [i for i, v in enumerate(lab) if v == c]
        P = [i for i, v in enumerate(lab) if v != 255 and v != c and parent[v] == parent[c]]
        Ng = [i for i, v in enumerate(lab) if v != 255 and parent[v] != parent[c]]
        k = min(k_max, len(A), len(P), len(Ng))
        if k == 0:
            continue
        terms = []
        for a, p, n in zip(A[:k], P[:k], Ng[:k]):
            dap = 1 - float(feats[a] @ feats[p])
            dan = 1 - float(feats[a] @ feats[n])
            terms.append(max(0.0, dap - dan + margin))
        losses.append(sum(terms) / k)
    return sum(losses) / len(losses) if losses else 0.0


def test_triplet_first_matches_slow():
    tree = trees.load("cityscapes")
    e = torch.randn(2, 8, 6, 6, dtype=torch.float64)
    y = random_target(2, 6, 6, 19, p_ignore=0.1)
    y[0, 0, :3] = torch.tensor([0, 1, 13])  # make sure some classes have positives and negatives
    got = reference.tree_triplet_loss(e, y, tree, sampling="first", max_triplets=3, margin=0.6)
    assert got.item() == pytest.approx(slow_triplet(e, y, tree, 0.6, 3), rel=1e-9)


def test_triplet_random_is_seeded():
    tree = trees.load("cityscapes")
    e = torch.randn(1, 8, 8, 8)
    y = random_target(1, 8, 8, 19)
    a = reference.tree_triplet_loss(e, y, tree, max_triplets=2, generator=torch.Generator().manual_seed(3))
    b = reference.tree_triplet_loss(e, y, tree, max_triplets=2, generator=torch.Generator().manual_seed(3))
    assert a.item() == b.item()


@pytest.mark.parametrize("activation", ["sigmoid", "softmax"])
@pytest.mark.parametrize("score", ["sum", "mean"])
def test_decode_matches_slow(activation, score):
    tree = trees.load("helen")
    x = torch.randn(2, tree.num_nodes, 3, 4, dtype=torch.float64)
    got = reference.decode(x, tree, activation=activation, score=score)
    for n in range(2):
        for i in range(3):
            for j in range(4):
                v = x[n, :, i, j].tolist()
                a = [_sig(t) for t in v] if activation == "sigmoid" else torch.softmax(x[n, :, i, j], 0).tolist()
                best, arg = -1e30, None
                for l in range(tree.num_leaves):
                    p = _anc_or_self(tree, tree.leaf_channels[l])
                    s = sum(a[u] for u in p) / (len(p) if score == "mean" else 1)
                    if s > best + 1e-12:
                        best, arg = s, l
                assert got[n, i, j].item() == arg


def test_decode_leaf_logits_and_ties():
    tree = trees.load("vistas")
    x = torch.randn(2, 66, 3, 3)
    assert torch.equal(reference.decode(x, tree), x.argmax(1))
    flat = Tree.from_parents([-1, -1, -1])
    assert reference.decode(torch.zeros(1, 3, 1, 1), flat).item() == 0
    two = Tree.from_parents([-1, 0, 0])  # both paths {0, 1} and {0, 2} score the same: lowest leaf wins
    x = torch.randn(1, 3, 1, 1)
    x[0, 2] = x[0, 1]
    assert reference.decode(x, two).item() == 0
    x[0, 2] += 0.1
    assert reference.decode(x, two).item() == 1


def test_labels_at_depth():
    tree = Tree.from_text(UNBALANCED)  # leaves a, b1, b2, c
    y = torch.tensor([[0, 1, 2, 3, 255]])
    assert reference.labels_at_depth(y, tree, 1).tolist() == [[0, 0, 0, 1, 255]]
    assert reference.labels_at_depth(y, tree, 2).tolist() == [[0, 1, 1, 2, 255]]
    assert reference.labels_at_depth(y, tree, 3).tolist() == [[0, 1, 2, 3, 255]]
    with pytest.raises(ValueError, match="depth"):
        reference.labels_at_depth(y, tree, 4)


@pytest.mark.parametrize("shape", [(0, 3, 3), (2, 0, 3)])
def test_empty_inputs(shape):
    tree = trees.load("helen")
    y = torch.zeros(shape, dtype=torch.long)
    for name, C in [("hierarchical_softmax_loss", 11), ("tree_min_loss", 17), ("tree_bce_loss", 17)]:
        x = torch.randn(shape[0], C, *shape[1:], requires_grad=True)
        for reduction in ("mean", "sum"):
            loss = getattr(reference, name)(x, y, tree, reduction=reduction)
            assert loss.item() == 0
        assert getattr(reference, name)(x, y, tree, reduction="none").shape == shape
