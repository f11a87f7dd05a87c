"""Hierarchical decoding: the reference against a direct computation, then every backend (``backend``
fixture: Triton, native) on every device (``device``: the CPU, where Triton runs under its interpreter,
and CUDA) against the reference: random inputs, real trees, every option and dtype, layouts, shapes,
exact ties (lowest leaf id), trees wider than a tile, torch.compile."""
import pytest
import torch

import hss_kernels
from hss_kernels import backends, reference, trees

import helpers as H
from helpers import (ACTIVATIONS, SCORES, assert_decodes_like_reference, assert_lowest_of_ties, decoder,
                     random_logits, saturated_logits, sibling_ties)


# --------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("name", ["helen", "vistas", "pascal_person_part"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
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
    for activation in ACTIVATIONS:
        for score in SCORES:
            assert_lowest_of_ties(reference.decode(x, tree, activation, score), lowest)


# --------------------------------------------------------------------------- backends vs the reference
@pytest.mark.parametrize("name", trees.names())
def test_random_real_trees(backend, device, name):
    decode = decoder(backend)
    tree = trees.load(name)
    for activation in ACTIVATIONS:
        for score in SCORES:
            x = random_logits(tree.num_nodes, (2, 7, 11), device=device)
            assert_decodes_like_reference(decode(x, tree, activation, score), x, tree, activation, score)


def test_random_trees_depth_8(backend, device):
    """Random unbalanced trees 8 deep (the native kernels' limit: one running path score per depth), leaf
    ids not in pre-order; sibling ties too."""
    for seed in range(2):
        tree = H.random_tree(24, min_depth=8, max_depth=8, seed=seed)
        for dtype in (torch.float32, torch.float64):
            for activation in ACTIVATIONS:
                for score in SCORES:
                    x = random_logits(tree.num_nodes, (2, 5, 6), dtype, device=device)
                    assert_decodes_like_reference(decoder(backend)(x, tree, activation, score), x, tree,
                                                  activation, score)
            x, lowest = sibling_ties(tree, random_logits(tree.num_nodes, (2, 5, 6), dtype, device=device))
            assert_lowest_of_ties(decoder(backend)(x, tree), lowest)


@pytest.mark.parametrize("dtype", H.DTYPES)
def test_dtypes_and_layouts(backend, device, dtype):
    """Every dtype, activation and score: NCHW, channels_last (the same labels) and a sliced view against
    the reference, the input untouched; sibling ties and leaf logits too. On CUDA other trees, at a size
    of several thread blocks with a partial last one."""
    decode = decoder(backend)
    shape = H.sized(device, (3, 6, 10), (2, 37, 45))
    for name in H.sized(device, ("vistas",), ("vistas_v2", "helen")):
        tree = trees.load(name)
        x = random_logits(tree.num_nodes, shape, dtype, device=device)
        before = x.clone()
        cl = x.to(memory_format=torch.channels_last)
        sliced = random_logits(tree.num_nodes, (2, 12, 10), dtype, device=device)[:, :, ::2, 1:]  # a view
        for activation in ACTIVATIONS:
            for score in SCORES:
                a = decode(x, tree, activation, score)
                assert_decodes_like_reference(a, x, tree, activation, score)
                assert torch.equal(decode(cl, tree, activation, score), a)
                assert_decodes_like_reference(decode(sliced, tree, activation, score), sliced, tree, activation, score)
        assert torch.equal(x, before) and x.is_contiguous()  # input untouched
        xt, lowest = sibling_ties(tree, x)
        assert_lowest_of_ties(decode(xt, tree), lowest)
        leaf = random_logits(tree.num_leaves, (2, 9, 9), dtype, device=device)
        assert torch.equal(decode(leaf, tree), leaf.float().argmax(dim=1))


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 5), (1, 17, 1), (2, 33, 35), (0, 4, 4)])
def test_shapes(backend, device, shape):
    decode = decoder(backend)
    tree = trees.load("helen")
    x = random_logits(tree.num_nodes, shape, device=device)
    out = decode(x, tree, "softmax", "sum")
    assert out.shape == shape
    assert_decodes_like_reference(out, x, tree, "softmax", "sum")


@pytest.mark.parametrize("name", ["cityscapes", "vistas_v2", "helen"])
def test_leaf_logits_argmax(backend, device, name):
    decode = decoder(backend)
    tree = trees.load(name)
    for dtype in (torch.float32, torch.bfloat16):
        x = random_logits(tree.num_leaves, (2, 5, 9), dtype)
        x[0, :, 0, 0] = 1.0  # all leaves tie → leaf 0
        x[1, 3:7, 1, 1] = 50.0  # ties among 3..6 → 3
        x = x.to(device)
        out = decode(x, tree, "softmax", "mean")  # activation and score do not apply to leaf logits
        assert torch.equal(out, x.float().argmax(dim=1))
        assert int(out[0, 0, 0]) == 0 and int(out[1, 1, 1]) == 3


@pytest.mark.parametrize("name", ["vistas", "lip", "vistas_v2"])
def test_exact_ties_sibling_leaves(backend, device, name):
    decode = decoder(backend)
    tree = trees.load(name)
    for dtype in (torch.float32, torch.float64):
        x, lowest = sibling_ties(tree, random_logits(tree.num_nodes, (2, 8, 9), dtype, device=device))
        for activation in ACTIVATIONS:
            for score in SCORES:
                y = decode(x, tree, activation, score)
                assert_lowest_of_ties(y, lowest)
                assert_decodes_like_reference(y, x, tree, activation, score)


@pytest.mark.parametrize("dtype", H.DTYPES)
def test_exact_ties_saturated(backend, device, dtype):
    """Saturated logits: path sums exact in any order, many leaves tie: every backend must pick the
    lowest of them."""
    decode = decoder(backend)
    tree = trees.load("vistas")
    x = saturated_logits(tree.num_nodes, (2, 6, 7), dtype, device)
    for activation in ACTIVATIONS:
        assert H.has_ties(x, tree, activation, "sum")  # the test does construct ties
        want = H.first_maximum(x, tree, activation, "sum")
        assert torch.equal(reference.decode(x.cpu(), tree, activation, "sum"), want)
        assert torch.equal(decode(x, tree, activation, "sum").cpu(), want)


def test_wide_tree_chunks(backend, device):
    """300 leaves, 303 channels: several leaf and channel tiles on every device (the interpreter's tiles
    are at most 128 wide, the GPU's 32). Leaf 255 exists, so the label of NaN pixels must be another one."""
    tree = H.wide_tree()
    with pytest.raises(ValueError, match="ignore_index=255 is a leaf id"):
        decoder(backend)(random_logits(tree.num_nodes, (1, 2, 2), device=device), tree)
    decode = lambda *a: decoder(backend)(*a, ignore_index=-1)  # noqa: E731
    for activation in ACTIVATIONS:
        for score in SCORES:
            x = random_logits(tree.num_nodes, (2, 5, 6), device=device)
            assert_decodes_like_reference(decode(x, tree, activation, score), x, tree, activation, score, -1)
    # exact ties spread over leaf tiles: the first maximum must win across tile boundaries
    x = torch.where(torch.rand(2, tree.num_nodes, 5, 6) < 0.5, 50.0, -800.0)
    x[:, :200] = -800.0  # the first winners then sit at ids >= 200, past the first tiles
    x[:, 250:] = torch.where(torch.rand(2, 53, 5, 6) < 0.9, 50.0, -800.0)
    x = x.to(device)
    for activation in ACTIVATIONS:
        assert H.has_ties(x, tree, activation, "sum")
        assert torch.equal(decode(x, tree, activation, "sum").cpu(), H.first_maximum(x, tree, activation, "sum"))
    leaf = random_logits(tree.num_leaves, (2, 3, 4))
    leaf[:, 100:] = leaf[:, :100].amax(dim=1, keepdim=True) + 1  # ties from 100 to 299 → 100
    assert bool((decode(leaf.to(device), tree) == 100).all())


def test_several_tiles_per_tree(backend, device):
    """The shipped trees wider than one tile (vistas_v2 under the interpreter; vistas and vistas_v2 on a
    GPU, tests/triton/test_triton_tiles.py checks that they do get several): labels, sibling ties and
    saturated ties as the reference says."""
    decode = decoder(backend)
    for name in ("vistas", "vistas_v2"):
        tree = trees.load(name)
        for activation in ACTIVATIONS:
            x = random_logits(tree.num_nodes, (2, 5, 13), device=device)
            assert_decodes_like_reference(decode(x, tree, activation, "mean"), x, tree, activation, "mean")
            x, lowest = sibling_ties(tree, x)
            y = decode(x, tree, activation, "sum")
            assert_lowest_of_ties(y, lowest)
            assert_decodes_like_reference(y, x, tree, activation, "sum")
        x = saturated_logits(tree.num_nodes, (2, 5, 13), device=device)
        assert torch.equal(decode(x, tree, "softmax", "sum").cpu(), H.first_maximum(x, tree, "softmax", "sum"))


def test_bad_input(backend, device):
    """The public decode checks the channels and options before any backend runs; the backend's own
    decode (what the registry calls) takes 4-D logits only."""
    tree = trees.load("cityscapes")
    x = random_logits(tree.num_nodes, (1, 2, 2), device=device)
    with pytest.raises(ValueError, match="channels"):
        hss_kernels.decode(random_logits(tree.num_nodes + 1, (1, 2, 2), device=device), tree, backend=backend)
    with pytest.raises(ValueError, match="activation"):
        hss_kernels.decode(x, tree, "relu", backend=backend)
    with pytest.raises(ValueError, match="score"):
        hss_kernels.decode(x, tree, "sigmoid", "max", backend=backend)
    decode = backends.resolve("decode", backend, torch.device(device))
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        decode(x[0], tree)


def test_public_api_every_backend(device):
    tree = trees.load("pascal_person_part")
    x = random_logits(tree.num_nodes, (2, 5, 6, 3), device=device)  # 3 spatial dims: the API flattens them
    want = reference.decode(x.cpu(), tree, "softmax", "mean")
    for backend in ["reference"] + backends.available_backends(device, op="decode"):
        got = hss_kernels.decode(x, tree, "softmax", "mean", backend=backend)
        assert got.shape == (2, 5, 6, 3) and got.device == x.device
        assert_decodes_like_reference(got.reshape(2, 5, 18), x.reshape(2, tree.num_nodes, 5, 18), tree, "softmax",
                                      "mean")
    assert torch.equal(hss_kernels.decode(x.cpu(), "pascal_person_part", "softmax", "mean", backend="reference"), want)


def test_compile_fullgraph(backend, device):
    assert backend in hss_kernels.available_backends(device)  # Dynamo cannot trace the registry's lazy import
    tree = trees.load("pascal_person_part")
    x = torch.randn(2, tree.num_nodes, 3, 5).to(device)
    f = torch.compile(lambda a: hss_kernels.decode(a, tree, "softmax", "mean", backend=backend),
                      fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x).cpu(), reference.decode(x.cpu(), tree, "softmax", "mean"))
    torch._dynamo.reset()
