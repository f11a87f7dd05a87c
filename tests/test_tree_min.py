"""The focal tree-min loss and the tree BCE (one kernel family: ``loss`` parametrises them) of every backend
(``backend`` fixture: Triton, native) on every device (``device``: the CPU, where Triton runs under its
interpreter, and CUDA) against the reference: loss and gradient, every shipped tree and random unbalanced
ones, every option and reduction, exact ties, dtypes, layouts, odd and empty shapes, offsets past 2^31,
determinism, autograd and torch.compile. Backend-only features are in tests/native and tests/triton."""
import pytest
import torch

import hss_kernels
from hss_kernels import Tree, trees

import helpers as H
from helpers import check, inputs

LOSSES = pytest.mark.parametrize("loss", H.NODE_LOSSES)


# --------------------------------------------------------------------------------- trees
@LOSSES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", trees.names())
def test_every_shipped_tree(backend, device, loss, name, dtype):
    tree = trees.load(name)
    x, y = inputs(tree, loss, dtype=dtype, device=device)
    r = H.rng()
    for reduction in H.sweep(backend, device, H.REDUCTIONS, ("mean",)):
        check(loss, backend, x, y, tree, reduction=reduction, gamma=r.choice([0.0, 2.0]))


@LOSSES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_random_unbalanced_trees(backend, device, loss, dtype):
    # from_parents trees put leaves anywhere in channel order: nothing may assume "leaves first"
    r = H.rng()
    for num_nodes in (2, 9, 23) if dtype == torch.float64 else ():
        tree = H.random_tree(num_nodes)
        x, y = inputs(tree, loss, dtype=dtype, device=device)
        check(loss, backend, x, y, tree, reduction="none")
        check(loss, backend, x, y, tree, gamma=1.5, scale=3.0, normalize="node")
    for _ in range(H.sized(device, 6, 2)):  # any size, depth 3 or 8, any shape, reduction and gamma (CUDA:
        # each tree's kernels compile anew, ~1.2 s a variant)
        tree = H.random_tree(max_depth=r.choice([3, 8]))
        shape = (r.randint(1, 3), r.randint(1, 9), r.randint(1, 9))
        x, y = inputs(tree, loss, shape, dtype, device=device)
        check(loss, backend, x, y, tree, reduction=r.choice(H.REDUCTIONS), gamma=r.uniform(0, 3))


@LOSSES
@pytest.mark.parametrize("parents", [[-1], [-1] * 5, [-1, 0, 1, 2], [2, 2, -1, 2, 3, 3]])
def test_degenerate_trees(backend, device, loss, parents):
    # one leaf; flat (no internal node: the internal-node loop runs zero times); a chain; a root leaf
    tree = Tree.from_parents(parents)
    x, y = inputs(tree, loss, dtype=torch.float64, device=device)
    check(loss, backend, x, y, tree, reduction="none", gamma=2.0)


@LOSSES
def test_first_and_last_leaf_labels(backend, device, loss):
    """Every pixel labelled with an edge leaf (by id and in pre-order), on real trees and a random one."""
    for tree in (trees.load("helen"), trees.load("vistas_v2"),
                 H.random_tree(min_nodes=5, max_nodes=20, min_depth=2, max_depth=6)):
        edges = torch.tensor(H.edge_leaves(tree))
        x, _ = inputs(tree, loss, (1, 2, 7), torch.float64)
        y = edges[torch.randint(0, len(edges), (1, 2, 7))]
        y.view(-1)[: len(edges)] = edges
        for reduction in ("none", "sum"):
            check(loss, backend, x.to(device), y.to(device), tree, reduction=reduction)


@LOSSES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ties_follow_preorder(backend, device, loss, dtype):
    """Logits -1, 0, 1 tie all the time: the gradient must go where the reference sends it, to the
    shallower ancestor (min) and to the node itself / earliest descendant in pre-order (max). (Native
    CPU: float32 runs the row passes, float64 the per-pixel code.)"""
    helen, vistas = trees.load("helen"), trees.load("vistas")
    cases = [(helen, "none", 0.0), (helen, "mean", 2.0), (vistas, "none", 0.0), (vistas, "mean", 2.0),
             (helen, "sum", 1.5), (trees.load("cityscapes"), "sum", 1.5), (H.random_tree(), "none", 0.0)]
    for tree, reduction, gamma in H.sweep(backend, device, cases, cases[:4]):
        x, y = inputs(tree, loss, (2, 6, 6), dtype, ties=True, device=device)
        check(loss, backend, x, y, tree, reduction=reduction, gamma=gamma)


# --------------------------------------------------------------------------------- options
@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_tree_min_options(backend, device, gamma, eps):
    tree = trees.load("helen")  # depth 4, leaves at several depths
    x, y = inputs(tree, "tree_min_loss", dtype=torch.float64, device=device)
    for normalize, scale, reduction in (("level", 5.0, "mean"), ("node", 1.0, "none"), ("level", 0.5, "sum")):
        check("tree_min_loss", backend, x, y, tree, gamma=gamma, eps=eps, normalize=normalize, scale=scale,
              reduction=reduction)


@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_tree_bce_options(backend, device, reduction):
    tree = trees.load("pascal_person_part")
    x, y = inputs(tree, "tree_bce_loss", dtype=torch.float64, device=device)
    for gamma, eps, normalize in ((0.0, 0.0, "level"), (2.0, 1e-3, "node"), (0.5, 0.0, "node")):
        check("tree_bce_loss", backend, x, y, tree, gamma=gamma, eps=eps, normalize=normalize, scale=2.0,
              reduction=reduction)


@LOSSES
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 1.5])
def test_every_option(backend, device, loss, gamma):
    """Every gamma the issues name with both normalisations, scale, eps, ignore_index 255, -100 and a real
    leaf id; mean and sum, and "none" with a dense and a stride-0 grad_output (test_grad_output_with_any_strides
    has a transposed one too)."""
    tree = trees.load("helen")
    for ignore_index, normalize, scale, eps in ((255, "level", 1.0, 0.0), (-100, "node", 5.0, 1e-8),
                                                (3, "level", 0.5, 1e-3)):
        x, y = inputs(tree, loss, (2, 3, 5), torch.float64, ignore_frac=0.2,
                      ignore_index=-100 if ignore_index == -100 else 255)
        if ignore_index == 3:  # a real leaf id: those pixels must count for nothing
            y[y == 255] = 3
        x, y = x.to(device), y.to(device)
        kw = dict(gamma=gamma, scale=scale, eps=eps, normalize=normalize, ignore_index=ignore_index)
        check(loss, backend, x, y, tree, reduction="mean" if normalize == "level" else "sum", **kw)
        for go in H.grad_outs(y.shape, torch.float64, device, transposed=False):
            check(loss, backend, x, y, tree, grad_out=go, reduction="none", **kw)


@LOSSES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_options(backend, device, loss, dtype):
    tree = trees.load("pascal_person_part")  # background is a chain of three nodes
    x, y = inputs(tree, loss, dtype=dtype, std=6.0, device=device)
    r = H.rng()
    for gamma, scale, eps, normalize in ((0.0, 5.0, 1e-8, "level"), (2.0, 1.0, 0.0, "node"),
                                         (0.5, 2.5, 1e-3, "node"), (3.0, 1.0, 1e-8, "level")):
        check(loss, backend, x, y, tree, reduction=r.choice(H.REDUCTIONS), gamma=gamma, scale=scale, eps=eps,
              normalize=normalize)
    y2 = y.clone()
    y2[y2 == 255] = 1
    y2[torch.rand(y.shape).to(device) < 0.3] = 0  # ignore a real label
    check(loss, backend, x, y2, tree, ignore_index=0)


def test_ignore_index_and_target_dtypes(backend, device):
    tree = trees.load("pascal_person_part")
    x, y = inputs(tree, "tree_min_loss", dtype=torch.float64, ignore_index=-100, device=device)
    check("tree_min_loss", backend, x, y, tree, ignore_index=-100)
    check("tree_min_loss", backend, x, y.to(torch.int32), tree, ignore_index=-100, reduction="none")
    x, y = inputs(tree, "tree_bce_loss", dtype=torch.float64, device=device)
    check("tree_bce_loss", backend, x, y.to(torch.uint8), tree, reduction="sum")


# --------------------------------------------------------------------------------- values
@LOSSES
def test_large_logits_stay_finite(backend, device, loss):
    tree = trees.load("cityscapes")
    x, y = inputs(tree, loss, std=40.0, device=device)  # sigmoid saturates: log-sigmoid forms keep it finite
    out, grad = check(loss, backend, x, y, tree, reduction="none")
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()


@LOSSES
@pytest.mark.parametrize("dtype", H.DTYPES)
def test_dtypes(backend, device, loss, dtype):
    """Every dtype: the mean and "none" with options on the CPU's trees; on CUDA (what the GPU-only test
    checked) more trees at a size of several thread blocks with a partial last one, every reduction,
    channels_last and ties."""
    r = H.rng()
    gpu = H.sized(device, False, True)
    shape = H.sized(device, (2, 5, 7), (2, 33, 47))
    names = H.sized(device, ("vistas_v2", "cityscapes"), ("vistas", "pascal_person_part", "vistas_v2"))
    for name in H.sweep(backend, device, names, names[:1]):
        tree = trees.load(name)
        x, y = inputs(tree, loss, shape, dtype, device=device)
        check(loss, backend, x, y, tree, gamma=r.choice([0.0, 2.0]))
        check(loss, backend, x, y, tree, reduction="none", gamma=1.0, eps=1e-8, scale=5.0)
        if gpu:
            check(loss, backend, x, y, tree, reduction="sum", gamma=r.choice([0.0, 2.0]))
            check(loss, backend, x.contiguous(memory_format=torch.channels_last), y, tree)
    if gpu:
        tree = trees.load("helen")
        x, y = inputs(tree, loss, (2, 17, 9), dtype, ties=True, device=device)
        check(loss, backend, x, y, tree, reduction="sum")


# --------------------------------------------------------------------------------- shapes and layouts
@LOSSES
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 1), (1, 1, 37)])
def test_odd_shapes(backend, device, loss, shape):
    tree = trees.load("cityscapes")
    x, y = inputs(tree, loss, shape, device=device)
    check(loss, backend, x, y, tree, reduction="none")
    check(loss, backend, x, y, tree)


@LOSSES
@pytest.mark.parametrize("reduction", H.REDUCTIONS)
def test_all_pixels_ignored(backend, device, loss, reduction):
    tree = trees.load("lip")
    x, y = inputs(tree, loss, (2, 3, 5), device=device, ignore_frac=1.0, edges=False)
    out, grad = check(loss, backend, x, y, tree, reduction=reduction)
    assert torch.equal(out, torch.zeros_like(out)) and torch.equal(grad, torch.zeros_like(grad))


@LOSSES
def test_empty_batch(backend, device, loss):
    tree = trees.load("cityscapes")
    for shape in ((2, 0, 5), (0, 3, 4)):
        x, y = inputs(tree, loss, shape, device=device)
        H.assert_empty_batch(H.api(loss, backend), x, y, tree)


@LOSSES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_grad_output_with_any_strides(backend, device, loss, dtype):
    tree = trees.load("lip")
    x, y = inputs(tree, loss, (2, 4, 6), dtype, device=device)
    for go in H.grad_outs(y.shape, H.acc_dtype(dtype), device):
        check(loss, backend, x, y, tree, reduction="none", grad_out=go)


@LOSSES
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16])
def test_channels_last_and_views_equal_contiguous(backend, device, loss, dtype):
    """channels_last logits give the contiguous result to the bit, with a channels_last gradient; a
    non-dense (sliced) view of logits and targets too, and it matches the reference."""
    if H.interpreted(backend, device) and dtype != torch.float32:
        pytest.skip("Triton under its interpreter: float32, as the CPU's Triton test had; every dtype compiled on CUDA")
    tree = trees.load("vistas")
    x, y = inputs(tree, loss, (2, 6, 5), dtype, device=device)
    fn = H.api(loss, backend)
    a, ga, go = H.loss_and_grad(fn, x, y, tree, reduction="none")
    xl = x.contiguous(memory_format=torch.channels_last)
    b, gb, _ = H.loss_and_grad(fn, xl, y, tree, go, reduction="none")
    assert gb.stride() == xl.stride()
    assert torch.equal(a, b) and torch.equal(ga, gb)
    wide = torch.randn(2, tree.num_nodes, 6, 10).to(dtype).to(device)
    wide[..., ::2] = x
    y_wide = torch.randint(0, tree.num_leaves, (2, 6, 10)).to(device)
    y_wide[..., ::2] = y
    c, gc, _ = H.loss_and_grad(fn, wide[..., ::2], y_wide[..., ::2], tree, go, reduction="none")
    assert torch.equal(a, c) and torch.equal(ga, gc)
    check(loss, backend, wide[:, :, 1:5, 1:8], y_wide[:, 1:5, 1:8], tree)


@LOSSES
def test_offsets_past_2_31(backend, device, loss):
    H.assert_offsets_past_2_31(loss, backend, trees.load("cityscapes"), device)


# --------------------------------------------------------------------------------- autograd
@LOSSES
def test_gradcheck(backend, device, loss):
    # Continuous random logits: ties (where tree-min is not differentiable) have probability 0.
    fast = H.interpreted(backend, device)  # full mode: minutes under the interpreter
    fn = getattr(hss_kernels, loss)
    pascal, small = trees.load("pascal_person_part"), H.random_tree(max_depth=3)
    cases = [(pascal, "mean", {"gamma": 0.0, "eps": 1e-3}), (pascal, "none", {"gamma": 0.0, "eps": 1e-3}),
             (pascal, "mean", {"gamma": 2.0, "eps": 1e-3}), (pascal, "none", {"gamma": 2.0, "eps": 1e-3}),
             (small, "mean", {"gamma": 2.0}), (small, "sum", {"gamma": 0.0, "eps": 1e-2}),
             (small, "none", {"gamma": 1.5, "normalize": "node", "scale": 3.0})]
    for tree, reduction, kw in H.sweep(backend, device, cases, cases[:4]):
        x, y = inputs(tree, loss, (1, 2, 3), torch.float64, std=2.0, ignore_frac=0.2, device=device)
        x.requires_grad_(True)
        assert torch.autograd.gradcheck(lambda a: fn(a, y, tree, reduction=reduction, backend=backend, **kw),
                                        (x,), fast_mode=fast)


@LOSSES
def test_inputs_are_not_mutated(backend, device, loss):
    tree = trees.load("cityscapes")
    x, y = inputs(tree, loss, (2, 4, 5), device=device)

    def run(logits, target):
        for reduction in H.REDUCTIONS:
            out = getattr(hss_kernels, loss)(logits, target, tree, reduction=reduction, backend=backend)
            torch.autograd.grad(out, logits, torch.ones_like(out))

    H.assert_inputs_not_mutated(run, x, y)


@LOSSES
def test_autograd_saves_no_full_size_intermediate(backend, device, loss):
    tree = trees.load("vistas")
    x, y = inputs(tree, loss, (2, 8, 9), device=device)
    H.assert_saves_no_full_size_intermediate(H.api(loss, backend), x, y, tree)


@LOSSES
def test_bitwise_deterministic(backend, device, loss):
    """Same inputs, same bits: loss and gradient of the batch reductions (mean, sum), three runs. Float64,
    so that a reordered sum would show in the last bits; enough pixels for several CPU blocks (64 pixels)
    and three Triton programs under the interpreter (1024 pixels)."""
    tree = trees.load("lip")
    x, y = inputs(tree, loss, (2, 33, 33), torch.float64, device=device)
    for reduction in ("mean", "sum"):
        H.assert_bitwise_deterministic(H.api(loss, backend), x, y, tree, runs=2, reduction=reduction)


@LOSSES
def test_compile_fullgraph(backend, device, loss):
    """Dynamo + AOTAutograd (aot_eager: no Inductor code generation) trace forward and backward through
    the backend's custom ops without a graph break, per-pixel reduction too."""
    assert backend in hss_kernels.available_backends(device)  # Dynamo cannot trace the registry's lazy import
    fn = getattr(hss_kernels, loss)
    tree = trees.load("cityscapes")
    x, y = inputs(tree, loss, (2, 3, 5), device=device)
    for reduction in ("mean", "none"):
        f = torch.compile(lambda a, t: fn(a, t, tree, gamma=1.5, reduction=reduction, backend=backend),
                          fullgraph=True, backend="aot_eager")
        H.assert_traced_matches(f, loss, x, y, tree, gamma=1.5, reduction=reduction)
    torch._dynamo.reset()


# --------------------------------------------------------------------------------- GPU only
@LOSSES
@pytest.mark.parametrize("device", [H.CUDA])
def test_compile_inductor(backend, device, loss):
    tree = trees.load("vistas_v2")
    x, y = inputs(tree, loss, (2, 32, 48), device=device)
    # The registry imports a backend lazily, and Dynamo cannot trace an import: load it before tracing.
    assert backend in hss_kernels.available_backends(device)
    fn = getattr(hss_kernels, loss)
    f = torch.compile(lambda a, t: fn(a, t, tree, backend=backend), fullgraph=True)
    H.assert_traced_matches(f, loss, x, y, tree)
    torch._dynamo.reset()


@LOSSES
@pytest.mark.parametrize("device", [H.CUDA])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic_at_large_sizes(backend, device, loss, dtype):
    for name, shape in (("vistas_v2", (4, 256, 256)), ("vistas", (4, 129, 65))):
        tree = trees.load(name)
        x, y = inputs(tree, loss, shape, dtype, device=device)
        H.assert_bitwise_deterministic(H.api(loss, backend), x, y, tree, reduction="mean")


@pytest.mark.parametrize("device", [H.CUDA])
def test_more_than_2_31_elements(backend, device):
    tree = trees.load("vistas_v2")  # 147 nodes · 4096 · 4096 = 2.5e9 elements (4.9 GB in bf16)
    Hh, W = 4096, 4096
    x = torch.randn(1, tree.num_nodes, Hh, W, device=device, dtype=torch.bfloat16)
    y = torch.randint(0, tree.num_leaves, (1, Hh, W), device=device)
    H.assert_tail_rows_match("tree_min_loss", backend, x, y, tree)


@pytest.mark.parametrize("device", [H.CUDA])
def test_second_gpu(backend, device):
    """Logits on the last GPU while another is current: the kernels run there, as the reference says."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    assert torch.cuda.current_device() != dev.index
    tree = trees.load("cityscapes")
    x, y = inputs(tree, "tree_min_loss", (2, 17, 9), device=dev)
    _, grad = check("tree_min_loss", backend, x, y, tree)
    assert grad.device == dev
