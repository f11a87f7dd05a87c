"""The native (C++/CUDA) focal tree-min loss and tree BCE against the reference, on fresh random inputs."""
import random

import pytest
import torch

import hss_kernels
from hss_kernels import trees

from _native_helpers import TOL, check_against_reference, loss_and_grad, make_inputs, random_tree

native = pytest.importorskip("hss_kernels.native")
if native.unavailable_reason("cpu") is not None:
    pytest.skip(native.unavailable_reason("cpu"), allow_module_level=True)

LOSSES = {"tree_min": hss_kernels.tree_min_loss, "tree_bce": hss_kernels.tree_bce_loss}


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", trees.names())
def test_real_trees(name, dtype, loss):
    tree = trees.load(name)
    x, y = make_inputs(tree, dtype=dtype)
    for reduction in ("mean", "sum", "none"):
        check_against_reference(LOSSES[loss], x, y, tree, reduction, gamma=random.choice([0.0, 2.0]))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_unbalanced_trees(dtype, loss):
    for _ in range(6):
        tree = random_tree(max_depth=random.choice([3, 8]))
        x, y = make_inputs(tree, shape=(random.randint(1, 3), random.randint(1, 9), random.randint(1, 9)),
                          dtype=dtype)
        check_against_reference(LOSSES[loss], x, y, tree, random.choice(["mean", "sum", "none"]),
                                gamma=random.uniform(0, 3))


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_follow_preorder(dtype, loss):
    # Integer logits tie often; the gradient must go where the reference sends it (earliest in pre-order).
    # float32 runs the CPU's row passes (selects in pre-order), float64 the per-pixel walks.
    for name in ("cityscapes", "helen"):
        tree = trees.load(name)
        x, y = make_inputs(tree, shape=(2, 6, 6), dtype=dtype, ties=True)
        check_against_reference(LOSSES[loss], x, y, tree, "sum", gamma=1.5)
    tree = random_tree()
    x, y = make_inputs(tree, shape=(2, 6, 6), dtype=dtype, ties=True)
    check_against_reference(LOSSES[loss], x, y, tree, "none", gamma=0.0)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 9, 17), (1, 1, 131), (3, 2, 70)])
def test_cpu_blocks(shape, loss):
    """The CPU's float path works on blocks of 64 pixels: full blocks of contiguous pixels are read
    from the input itself, the others (across images, the last partial block, other layouts) from a
    gathered tile. Every kind against the reference, with random and with tied logits."""
    fn = LOSSES[loss]
    tree = trees.load("vistas")
    x, y = make_inputs(tree, shape=shape, ignore_frac=0.1)
    check_against_reference(fn, x, y, tree, "none")
    a, ga, g = loss_and_grad(fn, x, y, tree, "native", "none")
    b, gb, _ = loss_and_grad(fn, x.to(memory_format=torch.channels_last), y, tree, "native", "none", g)
    assert torch.equal(a, b) and torch.equal(ga, gb)
    x, y = make_inputs(tree, shape=shape, ties=True)
    check_against_reference(fn, x, y, tree, "sum", gamma=2.0)
    deep = random_tree(max_depth=8)
    x, y = make_inputs(deep, shape=shape, ties=True)
    check_against_reference(fn, x, y, deep, "mean", gamma=0.5)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cpu_bad_labels_in_every_kind_of_block(dtype, loss):
    """A label neither ignore_index nor in [0, L) gives a NaN loss (counted: the mean is NaN) and a NaN
    gradient row, every other pixel the reference's values, in blocks read from the input, gathered
    blocks and the last partial block (float32: the row passes; float64: the per-pixel code)."""
    fn = LOSSES[loss]
    tree = trees.load("vistas")
    x, y = make_inputs(tree, shape=(2, 9, 17), dtype=dtype, ignore_frac=0.1)  # 153 pixels per image
    bad = torch.zeros(y.shape, dtype=torch.bool)
    for i, value in zip((0, 70, 140, 153 + 100, 2 * 153 - 1), (-1, tree.num_leaves, 1000, 254, -7)):
        y.view(-1)[i] = value
        bad.view(-1)[i] = True
    op = native.OPS[loss + "_loss"]  # the public API would reject the labels before any kernel runs

    def run(reduction, g=None):
        xg = x.detach().clone().requires_grad_()
        out = op(xg, y, tree, reduction=reduction)
        g = torch.randn_like(out) if g is None else g
        return out.detach(), torch.autograd.grad(out, xg, g)[0], g

    out, gout, g = run("none")
    ref, gref, _ = loss_and_grad(fn, x, y.masked_fill(bad, 255), tree, "reference", "none", g)
    assert torch.isnan(out[bad]).all() and not torch.isnan(out[~bad]).any()
    tol = TOL[dtype]
    torch.testing.assert_close(out[~bad], ref[~bad], **tol)
    rows, rows_ref = gout.permute(0, 2, 3, 1), gref.permute(0, 2, 3, 1)
    assert torch.isnan(rows[bad]).all()
    torch.testing.assert_close(rows[~bad], rows_ref[~bad], rtol=tol["rtol"],
                               atol=tol["atol"] + tol["rtol"] * float(gref.abs().max()))
    mean, gmean, _ = run("mean")
    assert torch.isnan(mean) and torch.isnan(gmean.permute(0, 2, 3, 1)[bad]).all()


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_options(dtype, loss):
    tree = trees.load("pascal_person_part")  # background is a chain of three nodes
    x, y = make_inputs(tree, dtype=dtype, std=6.0)
    fn = LOSSES[loss]
    for gamma, scale, eps, normalize in ((0.0, 5.0, 1e-8, "level"), (2.0, 1.0, 0.0, "node"),
                                         (0.5, 2.5, 1e-3, "node"), (3.0, 1.0, 1e-8, "level")):
        check_against_reference(fn, x, y, tree, random.choice(["mean", "sum", "none"]), gamma=gamma, scale=scale,
                                eps=eps, normalize=normalize)
    y2 = y.clone()
    y2[y2 == 255] = 1
    y2[torch.rand(y.shape) < 0.3] = 0  # ignore a real label
    check_against_reference(fn, x, y2, tree, "mean", ignore_index=0)


@pytest.mark.parametrize("loss", LOSSES)
def test_one_pixel_all_ignored_expanded_grad(loss):
    fn = LOSSES[loss]
    tree = trees.load("lip")
    x, y = make_inputs(tree, shape=(1, 1, 1), ignore_frac=0.0)
    check_against_reference(fn, x, y, tree, "mean")
    x, y = make_inputs(tree, shape=(2, 3, 5), ignore_frac=1.0)
    for reduction in ("mean", "sum", "none"):
        out, gx, _ = loss_and_grad(fn, x, y, tree, "native", reduction)
        assert torch.equal(out, torch.zeros_like(out)) and torch.equal(gx, torch.zeros_like(gx))
    x, y = make_inputs(tree, shape=(2, 4, 6), dtype=torch.float64)
    g = torch.randn(1, 1, 1, dtype=torch.float64).expand(2, 4, 6)
    check_against_reference(fn, x, y, tree, "none", grad_out=g)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_channels_last_equals_contiguous(dtype, loss):
    fn = LOSSES[loss]
    tree = trees.load("vistas")
    x, y = make_inputs(tree, shape=(2, 6, 5), dtype=dtype)
    a, ga, g = loss_and_grad(fn, x, y, tree, "native", "none")
    b, gb, _ = loss_and_grad(fn, x.to(memory_format=torch.channels_last), y, tree, "native", "none", g)
    assert gb.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(a, b) and torch.equal(ga, gb)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_cpu(dtype):
    tree = trees.load("cityscapes")
    x, y = make_inputs(tree, dtype=dtype)
    for fn in LOSSES.values():
        check_against_reference(fn, x, y, tree, "mean")


@pytest.mark.parametrize("loss", LOSSES)
def test_gradcheck(loss):
    fn = LOSSES[loss]
    tree = random_tree(max_depth=3)
    x, y = make_inputs(tree, shape=(1, 2, 3), dtype=torch.float64)
    x.requires_grad_()
    for reduction, kw in (("mean", {"gamma": 2.0}), ("sum", {"gamma": 0.0, "eps": 1e-2}),
                          ("none", {"gamma": 1.5, "normalize": "node", "scale": 3.0})):
        assert torch.autograd.gradcheck(lambda t: fn(t, y, tree, reduction=reduction, backend="native", **kw), (x,))


@pytest.mark.parametrize("extrema", [True, False])
def test_opcheck(extrema):
    tree = trees.load("cityscapes")
    x, y = make_inputs(tree, shape=(2, 3, 4))
    k = torch.rand(tree.num_nodes)
    idx = native.tree_index(tree, "cpu")
    for per_pixel in (False, True):
        args = (x.requires_grad_(), y, idx, k, tree.num_leaves, tree.depth, 2.0, 0.0, 255, per_pixel, extrema)
        torch.library.opcheck(torch.ops.hss_kernels.tree_loss_fwd.default, args)
        loss, _ = torch.ops.hss_kernels.tree_loss_fwd(*args)
        torch.library.opcheck(torch.ops.hss_kernels.tree_loss_bwd.default,
                              (torch.randn_like(loss), x.detach(), y, idx, k, tree.num_leaves, tree.depth, 2.0, 0.0,
                               255, extrema))


def test_bad_inputs_raise():
    # (a label outside the tree gives NaN, not an error: tests/test_bad_labels.py)
    tree = trees.load("cityscapes")
    x, y = make_inputs(tree, ignore_frac=0.0)
    args = (native.tree_index(tree, "cpu"), torch.ones(tree.num_nodes), tree.num_leaves, tree.depth, 2.0, 0.0, 255,
            False, True)
    with pytest.raises(RuntimeError, match="tree_index"):
        torch.ops.hss_kernels.tree_loss_fwd(x[:, 1:], y, *args)


@pytest.mark.gpu
@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_cuda_matches_reference(dtype, loss):
    for name in ("vistas", "pascal_person_part", "vistas_v2"):
        tree = trees.load(name)
        x, y = make_inputs(tree, shape=(2, 33, 47), dtype=dtype, device="cuda")
        for reduction in ("mean", "sum", "none"):
            check_against_reference(LOSSES[loss], x, y, tree, reduction, gamma=random.choice([0.0, 2.0]))
        check_against_reference(LOSSES[loss], x.to(memory_format=torch.channels_last), y, tree, "mean")
    # Ties on the GPU follow the same rule.
    x, y = make_inputs(trees.load("helen"), shape=(2, 17, 9), dtype=torch.float64, device="cuda", ties=True)
    check_against_reference(LOSSES[loss], x, y, trees.load("helen"), "sum")


@pytest.mark.gpu
@pytest.mark.parametrize("loss", LOSSES)
def test_cuda_deterministic_and_gradcheck(loss):
    fn = LOSSES[loss]
    tree = trees.load("vistas")
    x, y = make_inputs(tree, shape=(4, 129, 65), device="cuda")
    a = [loss_and_grad(fn, x, y, tree, "native", "mean", torch.tensor(1.0, device="cuda")) for _ in range(2)]
    assert torch.equal(a[0][0], a[1][0]) and torch.equal(a[0][1], a[1][1])
    small = random_tree(max_depth=3)
    x, y = make_inputs(small, shape=(1, 2, 3), dtype=torch.float64, device="cuda")
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fn(t, y, small, backend="native"), (x,))


def test_torch_compile_traces_through():
    # aot_eager: Dynamo and AOTAutograd trace the ops through their fake kernels and registered autograd,
    # without Inductor's code generation (slow on CI). The backend is resolved once eagerly first: the
    # registry imports backend modules lazily, which Dynamo cannot trace.
    hss_kernels.available_backends("cpu")
    tree = trees.load("cityscapes")
    y = make_inputs(tree)[1]
    cases = [(hss_kernels.hierarchical_softmax_loss, tree.num_leaves), (hss_kernels.tree_min_loss, tree.num_nodes)]
    for fn, channels in cases:
        x = torch.randn(2, channels, 5, 7, requires_grad=True)
        compiled = torch.compile(lambda t: fn(t, y, tree, backend="native"), backend="aot_eager", fullgraph=True)
        out = compiled(x)
        (g,) = torch.autograd.grad(out, x)
        ref, gref, _ = loss_and_grad(fn, x, y, tree, "reference", "mean", torch.tensor(1.0))
        torch.testing.assert_close(out.detach(), ref, **TOL[torch.float32])
        torch.testing.assert_close(g, gref, **TOL[torch.float32])
