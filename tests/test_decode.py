"""Hierarchical decoding: the reference against a direct computation, the Triton and native kernels
against the reference (random inputs, real trees, every option and dtype, layouts, exact ties)."""
import pytest
import torch

import hss_kernels
from hss_kernels import Tree, reference, trees
from hss_kernels.backends import available_backends

ACTS = ["sigmoid", "softmax"]
SCORES = ["sum", "mean"]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def triton_decode():
    try:
        from hss_kernels.triton.decode import decode
    except ImportError as exc:  # no Triton installed
        pytest.skip(f"Triton is not available: {exc}")
    return decode


def native_decode():
    try:
        from hss_kernels.native_decode import decode
    except ImportError as exc:
        pytest.skip(f"the C++ extension is not built: {exc}")
    return decode


BACKENDS = {"triton": triton_decode, "native": native_decode}


# --------------------------------------------------------------------------- helpers
def path_scores(logits, tree, activation, score):
    """Float64 path scores (N, L, P) of the logits (leaf logits: the logits themselves)."""
    N, C = logits.shape[:2]
    x = logits.double().reshape(N, C, -1)
    if C == tree.num_leaves and C != tree.num_nodes:
        return x
    a = torch.sigmoid(x) if activation == "sigmoid" else torch.softmax(x, dim=1)
    path = tree.tables().path.double().to(x.device)
    if score == "mean":
        path = path / path.sum(dim=0, keepdim=True)
    return torch.einsum("vl,nvp->nlp", path, a)


def assert_like_reference(got, logits, tree, activation="sigmoid", score="sum"):
    """Labels equal the reference's, except at near ties where the two chosen leaves' float64 scores
    agree to rounding (the kernels sum in another order than the reference's einsum)."""
    want = reference.decode(logits.cpu(), tree, activation, score)
    assert got.dtype == torch.int64 and got.shape == want.shape
    got = got.cpu()
    diff = got != want
    if not bool(diff.any()):
        return
    s = path_scores(logits.cpu(), tree, activation, score)
    N = got.shape[0]
    sg = s.gather(1, got.reshape(N, 1, -1))[:, 0]
    sw = s.gather(1, want.reshape(N, 1, -1))[:, 0]
    tol = 1e-9 if logits.dtype == torch.float64 else 2e-5
    gap = (sg - sw).abs()[diff.reshape(N, -1)]
    assert float(gap.max()) <= tol, f"{int(diff.sum())} labels differ, score gaps up to {float(gap.max())}"


def random_logits(C, shape=(2, 9, 13), dtype=torch.float32, scale=3.0, device="cpu"):
    N, *S = shape
    return (torch.randn(N, C, *S, dtype=torch.float64) * scale).to(dtype).to(device)


def sibling_ties(tree, logits):
    """Give all leaf children of each node the same logits: equal paths, exact ties among them.
    Returns the modified logits and, per leaf, the lowest leaf id of its tie group."""
    x = logits.clone()
    lowest = list(range(tree.num_leaves))
    for p in range(tree.num_nodes):
        leaves = [c for c in tree.children[p] if tree.is_leaf(c)]
        if len(leaves) > 1:
            for c in leaves:
                x[:, c] = x[:, leaves[-1]]
                lowest[tree.channel_labels[c]] = min(tree.channel_labels[k] for k in leaves)
    return x, torch.tensor(lowest)


# --------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("name", ["helen", "vistas", "pascal_person_part"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("score", SCORES)
def test_reference_against_direct(name, activation, score):
    tree = trees.load(name)
    x = random_logits(tree.num_nodes, (2, 3, 4), torch.float64)
    got = reference.decode(x, tree, activation, score)
    for n in range(2):
        for i in range(3):
            for j in range(4):
                v = x[n, :, i, j]
                a = torch.sigmoid(v) if activation == "sigmoid" else torch.softmax(v, 0)
                best, best_l = None, None
                for l, c in enumerate(tree.leaf_channels):
                    nodes = tree.ancestors[c]
                    s = sum(float(a[k]) for k in nodes)
                    if score == "mean":
                        s /= len(nodes)
                    if best is None or s > best:
                        best, best_l = s, l
                assert int(got[n, i, j]) == best_l
    leaf = random_logits(tree.num_leaves, (2, 3, 4), torch.float64)
    assert torch.equal(reference.decode(leaf, tree), leaf.argmax(dim=1))


def test_reference_ties_lowest_leaf():
    tree = trees.load("vistas")
    x, lowest = sibling_ties(tree, random_logits(tree.num_nodes, (2, 16, 16)))
    for activation in ACTS:
        for score in SCORES:
            y = reference.decode(x, tree, activation, score)
            assert torch.equal(lowest[y], y)


# --------------------------------------------------------------------------- kernels vs reference
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", trees.names())
def test_random_real_trees(backend, name):
    decode = BACKENDS[backend]()
    tree = trees.load(name)
    for activation in ACTS:
        for score in SCORES:
            x = random_logits(tree.num_nodes, (2, 7, 11))
            assert_like_reference(decode(x, tree, activation, score), x, tree, activation, score)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_and_layouts(backend, dtype):
    decode = BACKENDS[backend]()
    tree = trees.load("vistas")
    x = random_logits(tree.num_nodes, (3, 6, 10), dtype)
    cl = x.to(memory_format=torch.channels_last)
    sliced = random_logits(tree.num_nodes, (2, 12, 10), dtype)[:, :, ::2, 1:]  # non-contiguous view
    for activation, score in [("sigmoid", "sum"), ("softmax", "mean")]:
        a = decode(x, tree, activation, score)
        assert_like_reference(a, x, tree, activation, score)
        assert torch.equal(decode(cl, tree, activation, score), a)
        assert_like_reference(decode(sliced, tree, activation, score), sliced, tree, activation, score)
    assert x.stride() == random_logits(tree.num_nodes, (3, 6, 10), dtype).stride()  # input untouched


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 5), (1, 17, 1), (2, 33, 35), (0, 4, 4)])
def test_shapes(backend, shape):
    decode = BACKENDS[backend]()
    tree = trees.load("helen")
    x = random_logits(tree.num_nodes, shape)
    out = decode(x, tree, "softmax", "sum")
    assert out.shape == shape
    assert_like_reference(out, x, tree, "softmax", "sum")


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", ["cityscapes", "vistas_v2", "helen"])
def test_leaf_logits_argmax(backend, name):
    decode = BACKENDS[backend]()
    tree = trees.load(name)
    for dtype in (torch.float32, torch.bfloat16):
        x = random_logits(tree.num_leaves, (2, 5, 9), dtype)
        x[0, :, 0, 0] = 1.0  # all leaves tie → leaf 0
        x[1, 3:7, 1, 1] = 50.0  # ties among 3..6 → 3
        out = decode(x, tree, "softmax", "mean")  # activation and score do not apply to leaf logits
        assert torch.equal(out, x.float().argmax(dim=1))
        assert int(out[0, 0, 0]) == 0 and int(out[1, 1, 1]) == 3


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("name", ["vistas", "lip", "vistas_v2"])
def test_exact_ties_sibling_leaves(backend, name):
    decode = BACKENDS[backend]()
    tree = trees.load(name)
    for dtype in (torch.float32, torch.float64):
        x, lowest = sibling_ties(tree, random_logits(tree.num_nodes, (2, 8, 9), dtype))
        for activation in ACTS:
            for score in SCORES:
                y = decode(x, tree, activation, score)
                assert torch.equal(lowest[y], y), "a tie went to a higher leaf id"
                assert_like_reference(y, x, tree, activation, score)


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_ties_saturated(backend, dtype):
    """Logits of +50 / -800: activations exactly 0 or 1 (sigmoid) or 0 or 1/k (softmax), so the path
    sums are exact in any order and many leaves tie: every backend must pick the lowest of them."""
    decode = BACKENDS[backend]()
    tree = trees.load("vistas")
    hi = torch.rand(2, tree.num_nodes, 6, 7) < 0.7
    x = torch.where(hi, 50.0, -800.0).to(dtype)
    for activation in ACTS:
        s = path_scores(x, tree, activation, "sum")
        n_max = (s == s.max(dim=1, keepdim=True).values).sum(dim=1)
        assert bool((n_max > 1).any())  # the test does construct ties
        want = s.argmax(dim=1).reshape(2, 6, 7)  # first maximum
        assert torch.equal(reference.decode(x, tree, activation, "sum"), want)
        assert torch.equal(decode(x, tree, activation, "sum"), want)


def wide_tree():
    """300 leaves under 3 parents, 303 nodes: more leaves and channels than one block of either kernel."""
    return Tree.from_parents([-1, -1, -1] + [i % 3 for i in range(300)])


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_wide_tree_chunks(backend):
    decode = BACKENDS[backend]()
    tree = wide_tree()
    for activation in ACTS:
        for score in SCORES:
            x = random_logits(tree.num_nodes, (2, 5, 6))
            assert_like_reference(decode(x, tree, activation, score), x, tree, activation, score)
    # exact ties spread over leaf chunks: the first maximum must win across chunk boundaries
    x = torch.where(torch.rand(2, tree.num_nodes, 5, 6) < 0.5, 50.0, -800.0)
    x[:, :200] = -800.0  # the first winners then sit at ids >= 200, past the first chunks
    x[:, 250:] = torch.where(torch.rand(2, 53, 5, 6) < 0.9, 50.0, -800.0)
    for activation in ACTS:
        s = path_scores(x, tree, activation, "sum")
        assert bool(((s == s.max(dim=1, keepdim=True).values).sum(dim=1) > 1).any())
        assert torch.equal(decode(x, tree, activation, "sum"), s.argmax(dim=1).reshape(2, 5, 6))
    leaf = random_logits(tree.num_leaves, (2, 3, 4))
    leaf[:, 100:] = leaf[:, :100].amax(dim=1, keepdim=True) + 1  # ties from 100 to 299 → 100
    assert bool((decode(leaf, tree) == 100).all())


def test_triton_gpu_tiles_under_interpreter(monkeypatch):
    """The GPU's smaller tiles (several leaf and channel chunks per tree) give the same labels."""
    triton_decode()
    import importlib

    mod = importlib.import_module("hss_kernels.triton.decode")  # the module, not the function of that name

    gpu_blocks = mod._blocks
    monkeypatch.setattr(mod, "_blocks", lambda C, L, total, interpret: gpu_blocks(C, L, total, False))
    assert mod._blocks(80, 66, 10, True)[1] < 66
    for name in ("vistas", "vistas_v2"):
        tree = trees.load(name)
        for activation in ACTS:
            x = random_logits(tree.num_nodes, (2, 5, 13))
            assert_like_reference(mod.decode(x, tree, activation, "mean"), x, tree, activation, "mean")
            x, lowest = sibling_ties(tree, x)
            y = mod.decode(x, tree, activation, "sum")
            assert torch.equal(lowest[y], y)
            assert_like_reference(y, x, tree, activation, "sum")
        x = torch.where(torch.rand(2, tree.num_nodes, 5, 13) < 0.7, 50.0, -800.0)
        s = path_scores(x, tree, "softmax", "sum")
        assert torch.equal(mod.decode(x, tree, "softmax", "sum"), s.argmax(dim=1).reshape(2, 5, 13))


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_bad_input(backend):
    decode = BACKENDS[backend]()
    tree = trees.load("cityscapes")
    x = random_logits(tree.num_nodes, (1, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        decode(random_logits(tree.num_nodes + 1, (1, 2, 2)), tree)
    with pytest.raises(ValueError, match="activation"):
        decode(x, tree, "relu")
    with pytest.raises(ValueError, match="score"):
        decode(x, tree, "sigmoid", "max")
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        decode(x[0], tree)


def test_native_op_checks():
    native_decode()
    op = torch.ops.hss_kernels.decode
    tree = trees.load("cityscapes")
    x = random_logits(tree.num_nodes, (1, 2, 2))
    path = tree.tables().path_nodes
    with pytest.raises(RuntimeError, match="int32"):
        op(x, path.long(), 0, 0)
    with pytest.raises(RuntimeError, match="activation"):
        op(x, path, 3, 0)
    with pytest.raises(RuntimeError, match=r"\(N, C, H, W\)"):
        op(x[0], path, 0, 0)
    # a table pointing past the channels ends the path there instead of reading out of bounds
    bad = path.clone()
    bad[:, -1] = 1000
    assert op(x, bad, 0, 0).shape == (1, 2, 2)
    from torch.library import opcheck

    opcheck(op.default, (x, path, 1, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_op_any_path_table(dtype):
    """The op takes any (L, D) table, not only a tree's: paths that share prefixes or repeat a node,
    end early (-1) or at an entry outside [0, C), or are empty (score 0). Against a direct float64 sum
    per leaf, at 117 pixels per image (full and partial blocks of the CPU loop; float32 runs its row
    passes, float64 the per-pixel code the CUDA kernel runs)."""
    native_decode()
    op = torch.ops.hss_kernels.decode
    C, L, D = 7, 12, 4
    path = torch.randint(-1, C + 2, (L, D), dtype=torch.int32)
    path[0] = torch.tensor([2, 2, 5, 1])  # a repeated node
    path[1] = path[0]  # the same path as leaf 0: always a tie that leaf 0 wins
    path[2] = torch.tensor([2, 2, 5, -1])  # a prefix of leaf 0's path
    path[3, 0] = -1  # empty
    path[4] = torch.tensor([3, C, 1, 1])  # ends at an out-of-range entry
    x = random_logits(C, (2, 9, 13), dtype)
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
            got = op(x, path.contiguous(), act, score)
            assert not bool((got == 1).any())
            diff = got != want
            if bool(diff.any()):
                gap = (S.gather(1, got[:, None]) - S.gather(1, want[:, None]))[:, 0].abs()[diff]
                tol = 1e-9 if dtype == torch.float64 else 2e-5
                assert float(gap.max()) <= tol, f"{int(diff.sum())} labels differ by up to {float(gap.max())}"


# --------------------------------------------------------------------------- public API and labels
def test_public_api_backends():
    tree = trees.load("pascal_person_part")
    x = random_logits(tree.num_nodes, (2, 5, 6, 3))  # 3 spatial dims: the API flattens them
    want = reference.decode(x, tree, "softmax", "mean")
    for backend in ["reference"] + available_backends("cpu", op="decode"):
        got = hss_kernels.decode(x, tree, "softmax", "mean", backend=backend)
        assert got.shape == (2, 5, 6, 3)
        assert_like_reference(got.reshape(2, 5, 18), x.reshape(2, tree.num_nodes, 5, 18), tree, "softmax", "mean")
    assert torch.equal(hss_kernels.decode(x, "pascal_person_part", "softmax", "mean", backend="reference"), want)


def test_labels_at_depth_keeps_ignore():
    tree = trees.load("helen")
    y = torch.randint(0, tree.num_leaves, (2, 6, 7))
    y[0, :2] = 255
    for d in range(1, tree.depth + 1):
        out = hss_kernels.labels_at_depth(y, tree, d)
        assert out.dtype == y.dtype
        assert bool((out[0, :2] == 255).all())
        table = torch.tensor(tree.leaf_group[d - 1])
        keep = y != 255
        assert torch.equal(out[keep], table[y[keep]])
        assert int(out[keep].max()) < tree.num_classes(d)
    assert torch.equal(hss_kernels.labels_at_depth(y, tree, tree.depth), y)
    z = torch.where(y == 255, -1, y)
    out = hss_kernels.labels_at_depth(z, tree, 1, ignore_index=-1)
    assert bool((out[0, :2] == -1).all())
    tiny = Tree.from_parents([-1, -1, 0, 0, 1])  # labels 0,1 under node 0, label 2 under node 1
    assert hss_kernels.labels_at_depth(torch.tensor([0, 1, 2, 255]), tiny, 1).tolist() == [0, 0, 1, 255]
    with pytest.raises(ValueError):
        hss_kernels.labels_at_depth(torch.tensor([11]), tree, 1)


# --------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda(backend, dtype):
    decode = BACKENDS[backend]()
    for name in ("vistas_v2", "helen"):
        tree = trees.load(name)
        x = random_logits(tree.num_nodes, (2, 37, 45), dtype, device="cuda")
        for activation in ACTS:
            for score in SCORES:
                out = decode(x, tree, activation, score)
                assert out.device.type == "cuda"
                assert_like_reference(out, x, tree, activation, score)
                cl = decode(x.to(memory_format=torch.channels_last), tree, activation, score)
                assert torch.equal(cl, out)
        x, lowest = sibling_ties(tree, x)
        y = decode(x, tree).cpu()
        assert torch.equal(lowest[y], y)
        leaf = random_logits(tree.num_leaves, (2, 9, 9), dtype, device="cuda")
        assert torch.equal(decode(leaf, tree).cpu(), leaf.float().argmax(dim=1).cpu())
