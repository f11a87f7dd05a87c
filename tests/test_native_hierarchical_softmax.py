"""The native (C++/CUDA) hierarchical softmax loss against the reference, on fresh random inputs."""
import functools
import random

import pytest
import torch

import hss_kernels
from hss_kernels import trees

import _native_helpers as H
from _native_helpers import random_tree

native = pytest.importorskip("hss_kernels.native")
if native.unavailable_reason("cpu") is not None:
    pytest.skip(native.unavailable_reason("cpu"), allow_module_level=True)

FN = hss_kernels.hierarchical_softmax_loss
# the hierarchical softmax reads one logit per leaf
make_inputs = functools.partial(H.make_inputs, nodes=False)
loss_and_grad = functools.partial(H.loss_and_grad, FN)
check_against_reference = functools.partial(H.check_against_reference, FN)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", trees.names())
def test_real_trees(name, dtype):
    tree = trees.load(name)
    x, y = make_inputs(tree, dtype=dtype)
    for reduction in ("mean", "sum", "none"):
        check_against_reference(x, y, tree, reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_unbalanced_trees(dtype):
    for _ in range(6):
        tree = random_tree()
        x, y = make_inputs(tree, shape=(random.randint(1, 3), random.randint(1, 9), random.randint(1, 9)),
                          dtype=dtype)
        check_against_reference(x, y, tree, random.choice(["mean", "sum", "none"]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_options(dtype):
    tree = trees.load("helen")  # depth 4, leaves at several depths
    x, y = make_inputs(tree, dtype=dtype)
    weights = torch.rand(tree.depth).tolist()
    for eps in (0.0, 1e-4):
        check_against_reference(x, y, tree, "mean", level_weights=weights, eps=eps)
    y2 = y.clone()
    y2[y2 == 255] = 3
    y2[torch.rand(y.shape) < 0.3] = 0  # ignore a real label
    check_against_reference(x, y2, tree, "sum", ignore_index=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits(dtype):
    # Logits of std 40: groups far below the global max take their own shift in the log-sum-exp.
    tree = trees.load("vistas")
    x, y = make_inputs(tree, dtype=dtype, std=40.0)
    for eps in (0.0, 1e-4):
        check_against_reference(x, y, tree, "none", eps=eps)


def test_contiguous_blocks_read_in_place():
    # 150 pixels an image: whole 64-pixel blocks are read from (and their gradient written to) the
    # tensors themselves, a block across two images and the partial last block go through the tile;
    # std 40 sends some in-place blocks to the per-pixel path, and random trees cover depths 1 to 4.
    for tree in [trees.load("vistas"), trees.load("helen"), random_tree(), random_tree()]:
        for std, eps in ((3.0, 0.0), (40.0, 1e-4)):
            x, y = make_inputs(tree, shape=(2, 3, 50), std=std)
            # float32 rounds log-sum-exps of size ~std*3 to ~1e-7 of that: absolute error grows with std
            # (a near-zero per-pixel loss at std 40 differed by 1.5e-5 between two float32 sums).
            tol = dict(rtol=2e-5, atol=2e-6 * std)
            check_against_reference(x, y, tree, "none", tol=tol, eps=eps)


def test_one_pixel_and_all_ignored():
    tree = trees.load("cityscapes")
    x, y = make_inputs(tree, shape=(1, 1, 1), ignore_frac=0.0)
    check_against_reference(x, y, tree, "mean")
    x, y = make_inputs(tree, shape=(2, 3, 5), ignore_frac=1.0)
    for reduction in ("mean", "sum", "none"):
        loss, gx, _ = loss_and_grad(x, y, tree, "native", reduction)
        assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(gx, torch.zeros_like(gx))


def test_expanded_grad_output():
    # reduction="none" with a stride-0 upstream gradient (what loss.sum() style broadcasts produce).
    tree = trees.load("pascal_person_part")
    x, y = make_inputs(tree, shape=(2, 4, 6), dtype=torch.float64)
    g = torch.randn(1, 1, 1, dtype=torch.float64).expand(2, 4, 6)
    check_against_reference(x, y, tree, "none", grad_out=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_channels_last_equals_contiguous(dtype):
    tree = trees.load("vistas")
    x, y = make_inputs(tree, shape=(2, 6, 5), dtype=dtype)
    a, ga, g = loss_and_grad(x, y, tree, "native", "none")
    b, gb, _ = loss_and_grad(x.to(memory_format=torch.channels_last), y, tree, "native", "none", g)
    assert gb.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    # Non-dense (sliced) logits and targets read through their strides too.
    wide = torch.randn(2, tree.num_leaves, 6, 10).to(dtype)
    wide[..., ::2] = x
    y_wide = torch.randint(0, tree.num_leaves, (2, 6, 10))
    y_wide[..., ::2] = y
    c, gc, _ = loss_and_grad(wide[..., ::2], y_wide[..., ::2], tree, "native", "none", g)
    assert torch.equal(a, c) and torch.equal(ga, gc)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_cpu(dtype):
    tree = trees.load("lip")
    x, y = make_inputs(tree, dtype=dtype)
    check_against_reference(x, y, tree, "mean")


def test_gradcheck():
    tree = random_tree(max_depth=3)
    x, y = make_inputs(tree, shape=(1, 2, 3), dtype=torch.float64, ignore_frac=0.2)
    x.requires_grad_()
    for reduction, kw in (("mean", {}), ("sum", {"eps": 1e-2}), ("none", {"level_weights": [0.5] * tree.depth})):
        assert torch.autograd.gradcheck(lambda t: FN(t, y, tree, reduction=reduction, backend="native", **kw), (x,))


def test_opcheck():
    tree = trees.load("cityscapes")
    x, y = make_inputs(tree, shape=(2, 3, 4))
    w = torch.rand(tree.depth)
    group = tree.tables("cpu").leaf_group
    for per_pixel in (False, True):
        args = (x.requires_grad_(), y, group, w, 0.0, 255, per_pixel)
        torch.library.opcheck(torch.ops.hss_kernels.hsoftmax_fwd.default, args)
        loss, stats, _ = torch.ops.hss_kernels.hsoftmax_fwd(*args)
        grad = torch.randn_like(loss)
        torch.library.opcheck(torch.ops.hss_kernels.hsoftmax_bwd.default,
                              (grad, x.detach(), y, stats.detach(), group, w, 0.0, 255))


def test_unavailable_reason():
    assert native.unavailable_reason("cpu") is None
    assert "meta" in native.unavailable_reason("meta")
    assert "native" in hss_kernels.available_backends("cpu", "hierarchical_softmax_loss")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_matches_reference(dtype):
    for name in ("vistas", "helen", "vistas_v2"):
        tree = trees.load(name)
        x, y = make_inputs(tree, shape=(2, 33, 47), dtype=dtype, device="cuda")
        for reduction in ("mean", "sum", "none"):
            check_against_reference(x, y, tree, reduction, eps=random.choice([0.0, 1e-4]))
        cl = x.to(memory_format=torch.channels_last)
        check_against_reference(cl, y, tree, "mean")


@pytest.mark.gpu
def test_cuda_deterministic_and_gradcheck():
    tree = trees.load("vistas")
    x, y = make_inputs(tree, shape=(4, 129, 65), device="cuda")
    a = [loss_and_grad(x, y, tree, "native", "mean", torch.tensor(1.0, device="cuda")) for _ in range(2)]
    assert torch.equal(a[0][0], a[1][0]) and torch.equal(a[0][1], a[1][1])
    small = random_tree(max_depth=3)
    x, y = make_inputs(small, shape=(1, 2, 3), dtype=torch.float64, device="cuda")
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: FN(t, y, small, backend="native"), (x,))
    torch.library.opcheck(torch.ops.hss_kernels.hsoftmax_fwd.default,
                          (x, y, small.tables("cuda").leaf_group, torch.ones(small.depth, dtype=torch.float64,
                                                                                device="cuda"), 0.0, 255, False))


def test_double_backward_raises():
    tree = trees.load("cityscapes")
    x, y = make_inputs(tree, shape=(1, 2, 2), dtype=torch.float64)
    x.requires_grad_()
    (g,) = torch.autograd.grad(FN(x, y, tree, backend="native"), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        g.sum().backward()
