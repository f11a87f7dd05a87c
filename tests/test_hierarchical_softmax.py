"""The hierarchical softmax loss of every backend (``backend`` fixture: Triton, native) on every device
(``device``: the CPU, where Triton runs under its interpreter, and CUDA) against the reference: loss and
gradient, every shipped tree and random unbalanced ones, every option and reduction, dtypes, layouts,
odd and empty shapes, offsets past 2^31, determinism, autograd and torch.compile. Backend-only features
are in tests/native and tests/triton."""
import pytest
import torch
import torch.nn.functional as F

import hss_kernels
from hss_kernels import Tree, trees

import helpers as H
from helpers import check, inputs

LOSS = "hierarchical_softmax_loss"


def _inputs(tree, *args, **kw):
    return inputs(tree, LOSS, *args, **kw)


# --------------------------------------------------------------------------------- trees
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", trees.names())
def test_every_shipped_tree(backend, device, name, dtype):
    tree = trees.load(name)
    x, y = _inputs(tree, dtype=dtype, device=device)
    for reduction in H.sweep(backend, device, H.REDUCTIONS, ("mean",)):
        check(LOSS, backend, x, y, tree, reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_unbalanced_trees(backend, device, dtype):
    r = H.rng()
    for num_nodes in (3, 9, 17) if dtype == torch.float64 else ():
        tree = H.random_tree(num_nodes)
        x, y = _inputs(tree, dtype=dtype, device=device)
        check(LOSS, backend, x, y, tree, reduction="none")
        check(LOSS, backend, x, y, tree, level_weights=torch.rand(tree.depth).tolist(), eps=1e-3)
    for _ in range(H.sized(device, 6, 2)):  # any size, shape and reduction (CUDA: each tree's kernels
        # compile anew, ~1.2 s a variant)
        tree = H.random_tree(max_depth=5)
        shape = (r.randint(1, 3), r.randint(1, 9), r.randint(1, 9))
        x, y = _inputs(tree, shape, dtype, device=device)
        check(LOSS, backend, x, y, tree, reduction=r.choice(H.REDUCTIONS))


@pytest.mark.parametrize("parents", [[-1], [-1, 0, 1, 2], [2, 2, -1, 2, 3, 3]])
def test_degenerate_trees(backend, device, parents):
    # one leaf; a chain; a leaf at the root beside deeper ones
    tree = Tree.from_parents(parents)
    x, y = _inputs(tree, dtype=torch.float64, device=device)
    check(LOSS, backend, x, y, tree, reduction="none")


def test_flat_tree_is_cross_entropy(backend, device):
    tree = Tree.from_parents([-1] * 6)
    x, y = _inputs(tree, device=device)
    loss = hss_kernels.hierarchical_softmax_loss(x, y, tree, backend=backend)
    torch.testing.assert_close(loss, F.cross_entropy(x, y, ignore_index=255))
    for reduction in H.REDUCTIONS:
        H.assert_matches(H.api(LOSS, backend),
                         lambda a, t, _tree, **kw: F.cross_entropy(a, t, ignore_index=255, **kw),
                         x, y, tree, reduction=reduction)


def test_first_and_last_leaf_labels(backend, device):
    """Every pixel labelled with an edge leaf (by id and in pre-order), on real trees and a random one."""
    for tree in (trees.load("helen"), trees.load("vistas_v2"),
                 H.random_tree(min_nodes=5, max_nodes=20, min_depth=2, max_depth=6)):
        edges = torch.tensor(H.edge_leaves(tree))
        x, y = _inputs(tree, (1, 2, 7), torch.float64)
        y = edges[torch.randint(0, len(edges), (1, 2, 7))]
        y.view(-1)[: len(edges)] = edges
        for reduction in ("none", "sum"):
            check(LOSS, backend, x.to(device), y.to(device), tree, reduction=reduction)


# --------------------------------------------------------------------------------- options
@pytest.mark.parametrize("reduction", H.REDUCTIONS)
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_level_weights_and_eps(backend, device, reduction, eps):
    tree = trees.load("helen")  # depth 4, uneven leaf depths
    x, y = _inputs(tree, dtype=torch.float64, std=6.0, device=device)
    weights = (torch.rand(tree.depth) * 2).tolist()
    check(LOSS, backend, x, y, tree, reduction=reduction, eps=eps, level_weights=weights)


def test_every_option(backend, device):
    """ignore_index 255, -100 and a real leaf id, level weights, eps, every reduction, and for "none" a
    dense and a stride-0 grad_output (test_grad_output_with_any_strides has a transposed one too)."""
    for tree in (trees.load("helen"), H.random_tree(min_nodes=5, max_nodes=20, min_depth=2, max_depth=6)):
        for ignore_index, weights, eps in ((255, None, 0.0), (-100, torch.rand(tree.depth).tolist(), 1e-4),
                                           (0, (torch.rand(tree.depth) * 3).tolist(), 0.0)):
            x, y = _inputs(tree, (2, 3, 5), torch.float64, ignore_index=-100 if ignore_index == -100 else 255,
                           ignore_frac=0.2)
            if ignore_index == 0:  # a real leaf id as ignore_index: those pixels count for nothing
                y[y == 255] = 0
            x, y = x.to(device), y.to(device)
            kw = dict(level_weights=weights, eps=eps, ignore_index=ignore_index)
            for reduction in ("mean", "sum"):
                check(LOSS, backend, x, y, tree, reduction=reduction, **kw)
            for go in H.grad_outs(y.shape, torch.float64, device, transposed=False):
                check(LOSS, backend, x, y, tree, grad_out=go, reduction="none", **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_options(backend, device, dtype):
    tree = trees.load("helen")  # depth 4, leaves at several depths
    x, y = _inputs(tree, dtype=dtype, ignore_frac=0.2, device=device)
    weights = torch.rand(tree.depth).tolist()
    for eps in (0.0, 1e-4):
        check(LOSS, backend, x, y, tree, level_weights=weights, eps=eps)
    y2 = y.clone()
    y2[y2 == 255] = 3
    y2[torch.rand(y.shape).to(device) < 0.3] = 0  # ignore a real label
    check(LOSS, backend, x, y2, tree, reduction="sum", ignore_index=0)


def test_strided_level_weights(backend, device):
    # a strided view of the weights must be read through its strides, or made contiguous
    tree = trees.load("helen")
    x, y = _inputs(tree, (2, 3, 5), torch.float64, device=device)
    w = (torch.rand(2 * tree.depth, dtype=torch.float64) + 0.5)[::2]
    assert not w.is_contiguous()
    for reduction in ("mean", "none"):
        check(LOSS, backend, x, y, tree, level_weights=w, reduction=reduction)


def test_ignore_index_and_target_dtypes(backend, device):
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, dtype=torch.float64, ignore_index=-100, device=device)
    check(LOSS, backend, x, y, tree, ignore_index=-100)
    check(LOSS, backend, x, y.to(torch.int32), tree, ignore_index=-100, reduction="none")
    x, y = _inputs(tree, dtype=torch.float64, device=device)
    check(LOSS, backend, x, y.to(torch.uint8), tree, reduction="sum")


# --------------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_logits(backend, device, dtype):
    # std 40: groups far below the global max take their own shift in the log-sum-exp
    tree = trees.load("vistas")
    x, y = _inputs(tree, dtype=dtype, std=40.0, device=device)
    for eps in (0.0, 1e-4):
        check(LOSS, backend, x, y, tree, reduction="none", eps=eps)


def test_far_apart_logits_stay_finite(backend, device):
    # A label whose group logits sit far below the maximum: e^{z - max} underflows in float32, so a
    # kernel that reused one exp for every level would return inf.
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, std=1.0)
    x[:, 0] += 200.0
    y[y == 0] = 1
    loss, grad = check(LOSS, backend, x.to(device), y.to(device), tree, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("dtype", H.DTYPES)
def test_dtypes(backend, device, dtype):
    """Every dtype, every reduction, channels_last; on CUDA more trees, at a size of several thread blocks
    with a partial last one."""
    shape = H.sized(device, (2, 5, 7), (2, 33, 47))
    for name in H.sized(device, ("vistas_v2", "lip"), ("vistas", "helen", "vistas_v2")):
        tree = trees.load(name)
        x, y = _inputs(tree, shape, dtype, device=device)
        check(LOSS, backend, x, y, tree)
        check(LOSS, backend, x, y, tree, reduction="sum", eps=1e-4)
        check(LOSS, backend, x, y, tree, reduction="none", eps=1e-4)
        check(LOSS, backend, x.contiguous(memory_format=torch.channels_last), y, tree)


# --------------------------------------------------------------------------------- shapes and layouts
@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 5), (1, 33, 2)])
def test_odd_shapes(backend, device, shape):
    tree = trees.load("vistas")
    x, y = _inputs(tree, shape, ignore_frac=0.0 if shape == (1, 1, 1) else 0.1, device=device)
    check(LOSS, backend, x, y, tree, reduction="none")
    check(LOSS, backend, x, y, tree)


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_all_pixels_ignored(backend, device, reduction):
    tree = trees.load("lip")
    x, y = _inputs(tree, (2, 3, 5), device=device, ignore_frac=1.0, edges=False)
    loss, grad = check(LOSS, backend, x, y, tree, reduction=reduction)
    assert torch.equal(loss, torch.zeros_like(loss)) and torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4)])
def test_empty_batch(backend, device, shape):
    # (the reference cannot reshape 0 elements with -1; the result is 0 / empty by definition)
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, shape, device=device)
    H.assert_empty_batch(H.api(LOSS, backend), x, y, tree)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_output_with_any_strides(backend, device, dtype):
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, (2, 4, 6), dtype, device=device)
    for go in H.grad_outs(y.shape, H.acc_dtype(dtype), device):
        check(LOSS, backend, x, y, tree, reduction="none", grad_out=go)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_channels_last_and_views_equal_contiguous(backend, device, dtype):
    """channels_last logits give the contiguous result to the bit, with a channels_last gradient; a
    non-dense (sliced) view of logits and targets too."""
    tree = trees.load("vistas")
    x, y = _inputs(tree, (2, 6, 5), dtype, device=device)
    fn = H.api(LOSS, backend)
    a, ga, go = H.loss_and_grad(fn, x, y, tree, reduction="none")
    xl = x.contiguous(memory_format=torch.channels_last)
    b, gb, _ = H.loss_and_grad(fn, xl, y, tree, go, reduction="none")
    assert gb.stride() == xl.stride()  # the gradient keeps the layout, no copy
    assert torch.equal(a, b) and torch.equal(ga, gb)
    wide = torch.randn(2, tree.num_leaves, 6, 10).to(dtype).to(device)
    wide[..., ::2] = x
    y_wide = torch.randint(0, tree.num_leaves, (2, 6, 10)).to(device)
    y_wide[..., ::2] = y
    c, gc, _ = H.loss_and_grad(fn, wide[..., ::2], y_wide[..., ::2], tree, go, reduction="none")
    assert torch.equal(a, c) and torch.equal(ga, gc)


def test_non_dense_logits(backend, device):
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, (2, 6, 10), device=device)
    check(LOSS, backend, x[:, :, ::2, 1:8], y[:, ::2, 1:8].contiguous(), tree)
    check(LOSS, backend, x[:, :, ::2, 1:8], y[:, ::2, 1:8], tree, reduction="none")


def test_offsets_past_2_31(backend, device):
    H.assert_offsets_past_2_31(LOSS, backend, trees.load("cityscapes"), device)


# --------------------------------------------------------------------------------- autograd
def test_gradcheck(backend, device):
    fast = H.interpreted(backend, device)  # full mode: minutes under the interpreter
    pascal, small = trees.load("pascal_person_part"), H.random_tree(max_depth=3)
    cases = [(pascal, "mean", {}), (pascal, "none", {}), (pascal, "mean", {"eps": 1e-2}),
             (pascal, "none", {"eps": 1e-2}), (small, "mean", {}), (small, "sum", {"eps": 1e-2}),
             (small, "none", {"level_weights": [0.5] * small.depth})]
    for tree, reduction, kw in H.sweep(backend, device, cases, cases[:4]):
        x, y = _inputs(tree, (1, 2, 3), torch.float64, std=2.0, ignore_frac=0.2, device=device)
        x.requires_grad_(True)
        assert torch.autograd.gradcheck(
            lambda a: hss_kernels.hierarchical_softmax_loss(a, y, tree, reduction=reduction, backend=backend, **kw),
            (x,), fast_mode=fast)


def test_inputs_are_not_mutated(backend, device):
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, (2, 4, 5), device=device)

    def run(logits, target):
        for reduction in H.REDUCTIONS:
            out = hss_kernels.hierarchical_softmax_loss(logits, target, tree, reduction=reduction, backend=backend)
            torch.autograd.grad(out, logits, torch.ones_like(out))

    H.assert_inputs_not_mutated(run, x, y)


def test_autograd_saves_no_full_size_intermediate(backend, device):
    tree = trees.load("vistas")  # L = 66 channels, D = 3
    x, y = _inputs(tree, (2, 8, 9), device=device)
    H.assert_saves_no_full_size_intermediate(H.api(LOSS, backend), x, y, tree)


def test_bitwise_deterministic(backend, device):
    """Same inputs, same bits: loss and gradient of the batch reductions (mean, sum), three runs. Float64,
    so that a reordered sum would show in the last bits; enough pixels for several CPU blocks (64 pixels)
    and three Triton programs under the interpreter (1024 pixels)."""
    tree = trees.load("lip")
    x, y = _inputs(tree, (2, 33, 33), torch.float64, device=device)
    for reduction in ("mean", "sum"):
        H.assert_bitwise_deterministic(H.api(LOSS, backend), x, y, tree, runs=2, reduction=reduction)


def test_compile_fullgraph(backend, device):
    """Dynamo + AOTAutograd (aot_eager: no Inductor code generation) trace forward and backward through
    the backend's custom ops without a graph break."""
    assert backend in hss_kernels.available_backends(device)  # Dynamo cannot trace the registry's lazy import
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, device=device)
    for reduction, weights in (("mean", [1.0, 2.0]), ("none", None)):
        f = torch.compile(lambda a, t: hss_kernels.hierarchical_softmax_loss(
            a, t, tree, level_weights=weights, reduction=reduction, backend=backend), fullgraph=True,
            backend="aot_eager")
        H.assert_traced_matches(f, LOSS, x, y, tree, level_weights=weights, reduction=reduction)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------- GPU only
@pytest.mark.parametrize("device", [H.CUDA])
def test_compile_inductor(backend, device):
    tree = trees.load("vistas")
    x, y = _inputs(tree, (2, 32, 48), device=device)
    # The registry imports a backend lazily, and Dynamo cannot trace an import: load it before tracing.
    assert backend in hss_kernels.available_backends(device)
    f = torch.compile(lambda a, t: hss_kernels.hierarchical_softmax_loss(a, t, tree, backend=backend), fullgraph=True)
    H.assert_traced_matches(f, LOSS, x, y, tree)
    torch._dynamo.reset()


@pytest.mark.parametrize("device", [H.CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic_at_large_sizes(backend, device, dtype):
    for name, shape in (("vistas_v2", (4, 256, 256)), ("vistas", (4, 129, 65))):
        tree = trees.load(name)
        x, y = _inputs(tree, shape, dtype, device=device)
        H.assert_bitwise_deterministic(H.api(LOSS, backend), x, y, tree, reduction="mean")


@pytest.mark.parametrize("device", [H.CUDA])
def test_more_than_2_31_elements(backend, device):
    tree = trees.load("vistas")  # 66 leaves · 8192 · 4096 = 2.2e9 elements (4.4 GB in bf16)
    Hh, W = 8192, 4096
    x = torch.randn(1, tree.num_leaves, Hh, W, device=device, dtype=torch.bfloat16)
    y = torch.randint(0, tree.num_leaves, (1, Hh, W), device=device)
    H.assert_tail_rows_match(LOSS, backend, x, y, tree)


@pytest.mark.parametrize("device", [H.CUDA])
def test_second_gpu(backend, device):
    """Logits on the last GPU while another is current: the kernels run there, as the reference says."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    assert torch.cuda.current_device() != dev.index
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, (2, 17, 9), device=dev)
    _, grad = check(LOSS, backend, x, y, tree)
    assert grad.device == dev
