"""decode's NaN rule (docs/MATH.md §4.3, §5.3): a pixel with a NaN in any of the channels decode reads (with
``size=``, the interpolated ones) gets the label ``ignore_index``; every other pixel is decoded as without
it. The reference against a direct computation, then every backend (``backend`` fixture: Triton, native; and
the native per-pixel code the CUDA kernel runs, HSS_CPU_PIXEL_PATH=1) against the reference on fresh random
NaN positions: node and leaf logits, every activation, score and dtype, channels_last, with and without
``size``; the argument checks, the op's schema and torch.compile."""
import pytest
import torch

import hss_kernels
from hss_kernels import reference, trees
from hss_kernels.tables import decode_walk

import helpers as H
from helpers import ACTIVATIONS, SCORES, assert_decodes_like_reference, decoder, random_logits, with_nans

ops = torch.ops.hss_kernels


@pytest.fixture
def pixel_path(monkeypatch):
    """The native CPU ops through decode_math.h's per-pixel walk, the CUDA kernel's arithmetic."""
    H.require("native", "cpu")
    monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")


# --------------------------------------------------------------------------- the reference
@pytest.mark.parametrize("ignore_index", [255, -1, 2 ** 40])
def test_reference_rule(ignore_index):
    """NaN pixels get ignore_index; every other pixel the label of the same logits without the NaNs."""
    tree = trees.load("vistas")
    for C in (tree.num_nodes, tree.num_leaves):
        x, mask = with_nans(random_logits(C, (2, 9, 13), torch.float64), 0.3)
        assert bool(mask.any()) and not bool(mask.all())
        clean = reference.decode(torch.where(torch.isnan(x), 0.0, x), tree, "softmax", "mean")
        got = reference.decode(x, tree, "softmax", "mean", ignore_index=ignore_index)
        assert torch.equal(got, torch.where(mask, torch.full_like(got, ignore_index), clean))
    x = torch.full((1, tree.num_nodes, 2, 3), float("nan"))
    assert bool((reference.decode(x, tree) == 255).all())


@pytest.mark.parametrize("align_corners", [False, True])
def test_reference_rule_with_size(align_corners):
    """With size, the rule reads the interpolated logits: a NaN reaches every output pixel whose 2x2 stencil
    holds its source pixel (weight 0 included: 0 * NaN is NaN)."""
    tree = trees.load("cityscapes")
    x = random_logits(tree.num_nodes, (1, 4, 5))
    x[0, 3, 1, 2] = float("nan")
    got = reference.decode(x, tree, size=(9, 11), align_corners=align_corners)
    up = reference.upsample_logits(x, (9, 11), align_corners)
    mask = torch.isnan(up).any(dim=1)
    assert 0 < int(mask.sum()) < mask.numel()
    assert bool((got[mask] == 255).all()) and not bool((got[~mask] == 255).any())


# --------------------------------------------------------------------------- backends vs the reference
@pytest.mark.parametrize("dtype", H.DTYPES)
def test_every_backend(backend, device, dtype):
    """Node logits (every activation and score) and leaf logits with NaN at random pixels and channels,
    NCHW and channels_last, ignore_index 255 and -1; a batch where every pixel has a NaN."""
    decode = decoder(backend)
    tree = trees.load(H.sized(device, "pascal_person_part", "vistas"))
    shape = H.sized(device, (2, 5, 7), (2, 37, 45))
    for C in (tree.num_nodes, tree.num_leaves):
        x, mask = with_nans(random_logits(C, shape, dtype), 0.3)
        x = x.to(device)
        cl = x.contiguous(memory_format=torch.channels_last)
        for activation in ACTIVATIONS:
            for score in SCORES:
                for ignore_index in (255, -1):
                    got = decode(x, tree, activation, score, ignore_index=ignore_index)
                    assert torch.equal(got.cpu() == ignore_index, mask)
                    assert_decodes_like_reference(got, x, tree, activation, score, ignore_index)
                    assert torch.equal(decode(cl, tree, activation, score, ignore_index=ignore_index), got)
            if C == tree.num_leaves:
                break  # activation and score do not apply to leaf logits
    x = torch.full((1, tree.num_nodes, 2, 3), float("nan"), dtype=dtype, device=device)
    assert bool((decode(x, tree) == 255).all())


@pytest.mark.parametrize("dtype", H.DTYPES)
def test_pixel_path(pixel_path, dtype):
    """The CUDA kernel's per-pixel code on the CPU: the NaN flag ORed along the walk."""
    tree = H.random_tree(20, min_depth=3, max_depth=5)
    for C in (tree.num_nodes, tree.num_leaves):
        x, mask = with_nans(random_logits(C, (2, 6, 9), dtype), 0.3)
        for activation in ACTIVATIONS:
            for score in SCORES:
                got = hss_kernels.decode(x, tree, activation, score, backend="native", ignore_index=-7)
                assert torch.equal(got == -7, mask)
                assert_decodes_like_reference(got, x, tree, activation, score, -7)


@pytest.mark.parametrize("align_corners", [False, True])
def test_with_size(backend, device, align_corners):
    """decode(size=) with NaN low-resolution logits: the NaN spreads to every output pixel whose stencil holds
    it, as the interpolation of the reference does; odd and integer scales, one source pixel, channels_last."""
    tree = trees.load("pascal_person_part")
    shapes = H.sized(device, [(2, 3, 5, 7, 11), (1, 1, 1, 3, 4)], [(2, 3, 5, 7, 11), (1, 4, 4, 16, 16),
                                                                    (1, 1, 1, 3, 4), (2, 17, 9, 67, 40)])
    for N, h, w, Hh, W in shapes:
        for C in (tree.num_nodes, tree.num_leaves):
            for dtype in H.sized(device, (torch.float32, torch.bfloat16), H.DTYPES):
                x, _ = with_nans(random_logits(C, (N, h, w), dtype), 0.2)
                x = x.to(device)
                for activation in ACTIVATIONS:
                    got = hss_kernels.decode(x, tree, activation, "mean", backend=backend, size=(Hh, W),
                                             align_corners=align_corners)
                    H.assert_decode_size_like_reference(got, x, tree, activation, "mean", (Hh, W), align_corners)
                cl = x.contiguous(memory_format=torch.channels_last)
                a, b = (hss_kernels.decode(v, tree, backend=backend, size=(Hh, W), align_corners=align_corners,
                                           ignore_index=-1) for v in (x, cl))
                assert torch.equal(a, b)
                H.assert_decode_size_like_reference(a, x, tree, "sigmoid", "sum", (Hh, W), align_corners, -1)


@pytest.mark.parametrize("align_corners", [False, True])
def test_with_size_pixel_path(pixel_path, align_corners):
    tree = H.random_tree(20, min_depth=3, max_depth=5)
    for C in (tree.num_nodes, tree.num_leaves):
        for dtype in H.DTYPES:
            x, _ = with_nans(random_logits(C, (2, 3, 5), dtype), 0.2)
            for activation in ACTIVATIONS:
                got = hss_kernels.decode(x, tree, activation, "sum", backend="native", size=(8, 13),
                                         align_corners=align_corners, ignore_index=-1)
                H.assert_decode_size_like_reference(got, x, tree, activation, "sum", (8, 13), align_corners, -1)


# --------------------------------------------------------------------------- API, schema, compile
def test_ignore_index_checks():
    tree = trees.load("cityscapes")  # 19 leaves
    x = random_logits(tree.num_nodes, (1, 2, 2))
    for bad in (2.0, "255", None, True, torch.tensor(255.0)):
        with pytest.raises(TypeError, match="decode: ignore_index must be an int, got"):
            hss_kernels.decode(x, tree, ignore_index=bad)
    for bad in (0, 18):
        with pytest.raises(ValueError, match=f"decode: ignore_index={bad} is a leaf id"):
            hss_kernels.decode(x, tree, ignore_index=bad)
    with pytest.raises(ValueError, match="fit int64"):
        hss_kernels.decode(x, tree, ignore_index=2 ** 63)
    x[0, 0, 0, 0] = float("nan")
    for ok in (19, -1, torch.tensor(-3), 2 ** 40):
        assert int(hss_kernels.decode(x, tree, ignore_index=ok)[0, 0, 0]) == int(ok)


def test_opcheck_and_compile(backend, device):
    tree = trees.load("pascal_person_part")
    x, mask = with_nans(random_logits(tree.num_nodes, (2, 3, 5)), 0.3)
    x = x.to(device)
    if backend == "native":
        walk, ordered = decode_walk(tree, device, False)
        for size in ([], [5, 9]):
            torch.library.opcheck(ops.decode.default, (x, walk, ordered, 1, 1, size, False, -1))
        assert torch.equal((ops.decode(x, walk, ordered, 1, 1, [], False, -1) == -1).cpu(), mask)
    f = torch.compile(lambda a: hss_kernels.decode(a, tree, "softmax", "mean", backend=backend, ignore_index=-1),
                      fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x).cpu(), reference.decode(x.cpu(), tree, "softmax", "mean", ignore_index=-1))
    g = torch.compile(lambda a: hss_kernels.decode(a, tree, backend=backend, size=(5, 9), align_corners=True,
                                                   ignore_index=-1), fullgraph=True, backend="aot_eager")
    H.assert_decode_size_like_reference(g(x), x, tree, "sigmoid", "sum", (5, 9), True, -1)
    torch._dynamo.reset()
