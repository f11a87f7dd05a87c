"""decode's lanes (docs/MATH.md §4.3): on logits whose channel planes it can read 16 bytes at a time
(decode_math::lanes_layout: float32/float16/bfloat16, contiguous planes, H·W and the batch and channel strides
multiples of V = 16 / element size, 16-byte aligned data; no size=) the CUDA kernel walks V neighbouring
pixels per thread (cuda/decode.cu decode_lanes_kernel), any other layout one pixel per thread; the CPU runs
the same lanes walk under HSS_CPU_PIXEL_PATH=1 (cpu/decode.cpp decode_lanes). On fresh random inputs: the
labels of such logits against the reference, and equal, label for label, to those of the same logits in
layouts the lanes do not take (channels_last, a misaligned copy, a strided view: the one-pixel walk), which
computes the same numbers; NaN pixels, exact ties, leaf logits, trees 1 to 8 deep, one lane group, offsets
past 2^31."""
import pytest
import torch

import hss_kernels
from hss_kernels import trees
from hss_kernels.tree import Tree

import helpers as H
from helpers import (ACTIVATIONS, SCORES, assert_decodes_like_reference, assert_lowest_of_ties, decoder,
                     random_logits, saturated_logits, sibling_ties, with_nans)

LANE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# (N, H, W) with H·W a multiple of 8 (lanes for every lane dtype); (1, 1, 8) and (1, 2, 4): one group of
# bfloat16 lanes, two of float32
SHAPES = [(2, 4, 6), (1, 1, 8), (1, 2, 4), (3, 5, 8)]


@pytest.fixture
def pixel_path(monkeypatch):
    """The native CPU ops through decode_math.h's walks, the CUDA kernels' arithmetic."""
    H.require("native", "cpu")
    monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")


def lanes_layout(x: torch.Tensor) -> bool:
    """decode_math::lanes_layout, what selects the lanes."""
    if x.element_size() > 4:
        return False
    V = 16 // x.element_size()
    _, _, h, w = x.shape
    plane = x.stride(3) == 1 and (h == 1 or x.stride(2) == w)
    return (plane and (h * w) % V == 0 and x.stride(0) % V == 0 and x.stride(1) % V == 0
            and x.data_ptr() % 16 == 0)


def misaligned(x: torch.Tensor) -> torch.Tensor:
    """A copy of x one element past a 16-byte boundary (same strides)."""
    buf = torch.empty(x.numel() + 8, dtype=x.dtype, device=x.device)
    k = next(k for k in range(1, 8) if (buf.data_ptr() + k * x.element_size()) % 16)
    v = buf[k:k + x.numel()].view(x.shape)
    v.copy_(x)
    return v


def one_pixel_layouts(x: torch.Tensor):
    """The logits x in layouts the lanes do not take: channels_last, misaligned, every other column of a
    wider tensor."""
    wide = torch.empty(x.shape[:3] + (2 * x.shape[3],), dtype=x.dtype, device=x.device)
    wide[..., ::2] = x
    views = [x.contiguous(memory_format=torch.channels_last), misaligned(x), wide[..., ::2]]
    for v in views:
        assert not lanes_layout(v) or x.shape[1] == 1
    return views


def assert_layouts_agree(decode, x, tree, activation, score, ignore_index=255):
    """x decoded (lanes when lanes_layout says so) like the reference, and exactly as its one-pixel layouts."""
    got = decode(x, tree, activation, score, ignore_index=ignore_index)
    assert_decodes_like_reference(got, x, tree, activation, score, ignore_index)
    for v in one_pixel_layouts(x):
        assert torch.equal(decode(v, tree, activation, score, ignore_index=ignore_index), got)
    return got


def check_lanes(decode, device, dtype, shapes, tree_list):
    for shape in shapes:
        for tree in tree_list:
            x = random_logits(tree.num_nodes, shape, dtype, device=device)
            assert lanes_layout(x)
            for activation in ACTIVATIONS:
                for score in SCORES:
                    assert_layouts_agree(decode, x, tree, activation, score)
            xn, mask = with_nans(x.cpu(), 0.3)
            xn = xn.to(device)
            got = assert_layouts_agree(decode, xn, tree, "softmax", "mean", ignore_index=-1)
            assert torch.equal((got == -1).cpu(), mask)
            xt, lowest = sibling_ties(tree, x)
            assert_lowest_of_ties(assert_layouts_agree(decode, xt, tree, "sigmoid", "sum"), lowest)
            xs = saturated_logits(tree.num_nodes, shape, dtype, device)
            for activation in ACTIVATIONS:
                want = H.first_maximum(xs, tree, activation, "sum")
                assert torch.equal(assert_layouts_agree(decode, xs, tree, activation, "sum").cpu(), want)
            leaf = random_logits(tree.num_leaves, shape, dtype, device=device)
            if tree.num_leaves != tree.num_nodes:
                assert torch.equal(assert_layouts_agree(decode, leaf, tree, "sigmoid", "sum").cpu(),
                                   leaf.cpu().float().argmax(dim=1))


def lane_trees():
    """Fresh random trees 2 to 8 deep (leaf ids mostly not in pre-order: the unordered tie rule), a flat one
    (depth 1) and shipped ones (ordered)."""
    out = [Tree.from_parents([-1] * 6), H.random_tree(min_depth=2, max_depth=3),
           H.random_tree(min_depth=4, max_depth=6), H.random_tree(24, min_depth=8, max_depth=8)]
    return out + [trees.load(n) for n in ("helen", "vistas")]


@pytest.mark.parametrize("dtype", LANE_DTYPES)
def test_pixel_path_lanes(pixel_path, dtype):
    """The CUDA lanes' walk on the CPU against the one-pixel walk and the reference."""
    check_lanes(decoder("native"), "cpu", dtype, SHAPES, lane_trees())


@pytest.mark.parametrize("dtype", LANE_DTYPES)
def test_layouts_every_backend(backend, device, dtype):
    """Every backend: lanes-shaped NCHW logits and their one-pixel layouts give the same labels (on CUDA the
    lanes kernel against the one-pixel one); on CUDA also a size of many blocks."""
    shapes = H.sized(device, SHAPES[:2], SHAPES + [(2, 64, 72)])
    tree_list = H.sized(device, [trees.load("helen")], lane_trees() + [trees.load("vistas_v2")])
    check_lanes(decoder(backend), device, dtype, shapes, tree_list)


def test_pixel_path_lanes_float64_and_size(pixel_path):
    """float64 and size= never take the lanes (the one-pixel walk): still the reference's labels."""
    tree = trees.load("helen")
    x = random_logits(tree.num_nodes, (2, 4, 8), torch.float64)
    assert not lanes_layout(x)
    assert_layouts_agree(decoder("native"), x, tree, "softmax", "mean")
    x = random_logits(tree.num_nodes, (1, 4, 8))
    got = hss_kernels.decode(x, tree, "softmax", "sum", backend="native", size=(8, 16))
    H.assert_decode_size_like_reference(got, x, tree, "softmax", "sum", (8, 16), False)


def far_lane_views(channels: int, device="cpu"):
    """bfloat16 logits the lanes take, as views into one 4 GiB storage (H.far_views, with H·W = 8 and strides
    multiples of 8): (3, C, 2, 4) with a batch stride putting image 2 past 2^31, (1, C, 2, 4) with a channel
    stride putting the last channels past it."""
    try:
        with H.unpoisoned():
            store = torch.empty(H.BIG + 2**20, dtype=torch.bfloat16, device=device)
    except (RuntimeError, MemoryError) as exc:
        pytest.skip(f"cannot reserve 4 GiB of address space on {device}: {exc}")
    yield store.as_strided((3, channels, 2, 4), (2**30 + 4096, 8, 4, 1))
    sc = ((H.BIG + 2**19) // (channels - 1)) // 8 * 8
    assert (channels - 1) * sc >= H.BIG
    yield store.as_strided((1, channels, 2, 4), (channels * sc, sc, 4, 1))


@pytest.mark.parametrize("pixel", [False, True])
def test_offsets_past_2_31(backend, device, pixel, monkeypatch):
    """64-bit offsets in the lanes (and every backend): the labels of each far view equal those of a compact
    copy."""
    if pixel:
        if backend != "native" or device != "cpu":
            pytest.skip("HSS_CPU_PIXEL_PATH is the native CPU's")
        monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")
    tree = trees.load("cityscapes")
    for view in far_lane_views(tree.num_nodes, device):
        assert lanes_layout(view)
        compact = random_logits(tree.num_nodes, (view.shape[0], 2, 4), torch.bfloat16, device=device)
        view.copy_(compact)
        got = hss_kernels.decode(view, tree, "sigmoid", "mean", backend=backend)
        assert torch.equal(got, hss_kernels.decode(compact, tree, "sigmoid", "mean", backend=backend))
        assert_decodes_like_reference(got, compact, tree, "sigmoid", "mean")
        del view


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # the interpreter's inf - inf
@pytest.mark.parametrize("pixel", [False, True])
def test_inf_is_not_nan(backend, device, pixel, monkeypatch):
    """±inf logits are not NaN (the kernels flag NaN through NaN-propagating maxima, which ±inf never make
    NaN, not even where +inf - +inf makes a softmax score NaN): no pixel gets ignore_index; the sigmoid's labels
    are the reference's, and every activation's the same in the one-pixel layouts."""
    if pixel:
        if backend != "native" or device != "cpu":
            pytest.skip("HSS_CPU_PIXEL_PATH is the native CPU's")
        monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")
    tree = trees.load("helen")
    for dtype in (torch.float32, torch.bfloat16):
        x = random_logits(tree.num_nodes, (2, 4, 8), dtype)
        r = torch.rand(x.shape)
        x = torch.where(r < 0.05, float("inf"), torch.where(r > 0.95, float("-inf"), x.float())).to(dtype)
        x[0, :, 0, 0] = float("inf")
        x[0, :, 0, 1] = float("-inf")
        x = x.to(device)
        for activation in ACTIVATIONS:
            for score in SCORES:
                got = hss_kernels.decode(x, tree, activation, score, backend=backend, ignore_index=-1)
                assert not bool((got == -1).any())
                if activation == "sigmoid":
                    assert_decodes_like_reference(got, x, tree, activation, score, -1)
                for v in one_pixel_layouts(x):
                    assert torch.equal(hss_kernels.decode(v, tree, activation, score, backend=backend,
                                                          ignore_index=-1), got)
