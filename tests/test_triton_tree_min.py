"""Triton focal tree-min loss and tree BCE against the reference (CPU tensors under Triton's interpreter, CUDA tensors compiled)."""
import pytest
import torch

import hss_kernels
from hss_kernels import reference, trees

from _triton_helpers import (assert_bitwise_deterministic, assert_empty_batch, assert_matches,
                             assert_one_pass_equals_autograd, assert_saved_gradient_intact, assert_tail_rows_match,
                             assert_traced_matches, inputs, loss_and_grad, random_tree)

triton_mod = pytest.importorskip("hss_kernels.triton")

LOSSES = {
    "tree_min": (hss_kernels.tree_min_loss, reference.tree_min_loss),
    "tree_bce": (hss_kernels.tree_bce_loss, reference.tree_bce_loss),
}


def backend(kind):
    api = LOSSES[kind][0]
    return lambda logits, target, tree, **kw: api(logits, target, tree, backend="triton", **kw)


def ref(kind):
    return LOSSES[kind][1]


def _inputs(tree, **kw):
    return inputs(tree, tree.num_nodes, **kw)


@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
@pytest.mark.parametrize("name", trees.names())
def test_every_shipped_tree(kind, name):
    tree = trees.load(name)
    x, y = _inputs(tree)
    assert_matches(backend(kind), ref(kind), x, y, tree)


@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
@pytest.mark.parametrize("num_nodes", [2, 9, 23])
def test_random_unbalanced_trees(kind, num_nodes):
    # from_parents trees put leaves anywhere in channel order: nothing may assume "leaves first".
    tree = random_tree(num_nodes)
    x, y = _inputs(tree, dtype=torch.float64)
    assert_matches(backend(kind), ref(kind), x, y, tree, reduction="none")
    assert_matches(backend(kind), ref(kind), x, y, tree, gamma=1.5, scale=3.0, normalize="node")


@pytest.mark.parametrize("gamma", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_tree_min_options(gamma, eps):
    tree = trees.load("helen")  # depth 4, leaves at several depths
    x, y = _inputs(tree, dtype=torch.float64)
    for normalize, scale, reduction in (("level", 5.0, "mean"), ("node", 1.0, "none"), ("level", 0.5, "sum")):
        assert_matches(backend("tree_min"), ref("tree_min"), x, y, tree, gamma=gamma, eps=eps,
                       normalize=normalize, scale=scale, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_tree_bce_options(reduction):
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, dtype=torch.float64)
    for gamma, eps, normalize in ((0.0, 0.0, "level"), (2.0, 1e-3, "node"), (0.5, 0.0, "node")):
        assert_matches(backend("tree_bce"), ref("tree_bce"), x, y, tree, gamma=gamma, eps=eps,
                       normalize=normalize, scale=2.0, reduction=reduction)


@pytest.mark.parametrize("name", ["helen", "vistas"])
def test_ties_go_to_the_first_node_in_preorder(name):
    # Few distinct logit values, so mins and maxes tie all the time: the gradient must land on the
    # shallower ancestor (min) and on the node itself / earliest descendant (max), as in the reference.
    tree = trees.load(name)
    x, y = _inputs(tree, dtype=torch.float64)
    x = torch.randint(-1, 2, x.shape).to(torch.float64)
    assert_matches(backend("tree_min"), ref("tree_min"), x, y, tree, reduction="none", gamma=0.0)
    assert_matches(backend("tree_min"), ref("tree_min"), x, y, tree, gamma=2.0)


@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 3, 1), (1, 1, 37)])
def test_odd_shapes(kind, shape):
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, shape=shape)
    assert_matches(backend(kind), ref(kind), x, y, tree, reduction="none")
    assert_matches(backend(kind), ref(kind), x, y, tree)


@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_pixels_ignored(kind, reduction):
    tree = trees.load("lip")
    x, y = _inputs(tree)
    y.fill_(255)
    loss, grad = assert_matches(backend(kind), ref(kind), x, y, tree, reduction=reduction)
    assert (loss == 0).all() and (grad == 0).all()


def test_ignore_index_and_target_dtypes():
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, ignore_index=-100, dtype=torch.float64)
    assert_matches(backend("tree_min"), ref("tree_min"), x, y, tree, ignore_index=-100)
    assert_matches(backend("tree_min"), ref("tree_min"), x, y.to(torch.int32), tree, ignore_index=-100,
                   reduction="none")
    x, y = _inputs(tree, dtype=torch.float64)
    assert_matches(backend("tree_bce"), ref("tree_bce"), x, y.to(torch.uint8), tree, reduction="sum")


@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(kind, dtype):
    tree = trees.load("vistas_v2")
    x, y = _inputs(tree, dtype=dtype)
    assert_matches(backend(kind), ref(kind), x, y, tree)
    assert_matches(backend(kind), ref(kind), x, y, tree, reduction="none", gamma=1.0, eps=1e-8, scale=5.0)


def test_large_logits_stay_finite():
    tree = trees.load("cityscapes")
    x, y = _inputs(tree)
    x = x * 40.0  # sigmoid saturates: log-sigmoid forms keep loss and gradient finite
    for kind in ("tree_min", "tree_bce"):
        loss, grad = assert_matches(backend(kind), ref(kind), x, y, tree, reduction="none")
        assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


def test_grad_output_with_any_strides():
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, shape=(2, 4, 3))
    expanded = torch.full((), 0.3, dtype=torch.float32).expand(2, 4, 3)  # stride 0
    transposed = torch.randn(2, 3, 4).transpose(1, 2)
    for kind in ("tree_min", "tree_bce"):
        for go in (expanded, transposed):
            assert_matches(backend(kind), ref(kind), x, y, tree, reduction="none", grad_out=go)


@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
def test_channels_last_equals_contiguous(kind):
    tree = trees.load("vistas")
    x, y = _inputs(tree, shape=(2, 6, 5))
    xl = x.contiguous(memory_format=torch.channels_last)
    fn = backend(kind)
    loss, grad, go = loss_and_grad(fn, x, y, tree, reduction="none")
    loss_l, grad_l, _ = loss_and_grad(fn, xl, y, tree, reduction="none", grad_out=go)
    assert grad_l.stride() == xl.stride()
    assert torch.equal(loss, loss_l) and torch.equal(grad, grad_l)


@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_single_pass_equals_two_pass(kind, reduction):
    tree = trees.load("helen")
    x, y = _inputs(tree)
    fn = getattr(triton_mod, kind + "_loss")
    kw = dict(reduction=reduction, gamma=2.0, scale=5.0)
    loss2, grad2, go = loss_and_grad(fn, x, y, tree, **kw)
    loss1, grad1, _ = loss_and_grad(fn, x, y, tree, single_pass=True, grad_out=go, **kw)
    torch.testing.assert_close(loss1, loss2, rtol=0, atol=0)
    torch.testing.assert_close(grad1, grad2, rtol=1e-6, atol=1e-8)
    ref_loss, ref_grad, _ = loss_and_grad(ref(kind), x, y, tree, grad_out=go, **kw)
    torch.testing.assert_close(grad1, ref_grad, rtol=2e-5, atol=2e-6 + 2e-5 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
def test_loss_and_grad_equals_autograd(kind):
    tree = trees.load("vistas")
    x, y = _inputs(tree, dtype=torch.float16)
    assert_one_pass_equals_autograd(getattr(triton_mod, kind + "_loss_and_grad"), backend(kind), x, y, tree,
                                    gamma=1.0, reduction="mean")


def test_single_pass_autograd_is_not_corrupted():
    tree = trees.load("cityscapes")
    x, y = _inputs(tree)
    assert_saved_gradient_intact(triton_mod.tree_min_loss, x, y, tree, -2.0, reduction="sum")


def test_bad_calls():
    tree = trees.load("cityscapes")
    x, y = _inputs(tree)
    with pytest.raises(ValueError, match="single_pass"):
        triton_mod.tree_min_loss(x, y, tree, reduction="none", single_pass=True)
    with pytest.raises(ValueError, match="normalize"):
        triton_mod.tree_bce_loss(x, y, tree, normalize="depth")
    with pytest.raises(ValueError, match=r"\(N, V, H, W\)"):
        triton_mod.tree_min_loss(x[0], y[0], tree)


@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
@pytest.mark.parametrize("gamma", [0.0, 2.0])
def test_gradcheck(kind, gamma):
    # Continuous random logits: ties (where tree-min is not differentiable) have probability 0.
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, shape=(1, 2, 3), dtype=torch.float64, std=2.0)
    x.requires_grad_(True)
    fn = backend(kind)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda a: fn(a, y, tree, gamma=gamma, eps=1e-3, reduction=reduction),
                                        (x,), fast_mode=True)


@pytest.mark.parametrize("case", ["min_mean", "bce_none", "min_single_pass", "min_backward"])
def test_opcheck(case):
    from hss_kernels.triton import tree_min as tm
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, shape=(2, 3, 5))
    tab = tm._build_table(tree, x.device)
    k = reference.node_weight_vector(tree, 5.0, "level", torch.float32, x.device)
    if case == "min_backward":
        count = (y != 255).sum()
        torch.library.opcheck(tm._tree_bwd, (torch.tensor(0.5), x, y, tab, k, count, tm.sizes_of(tree), 2.0, 0.0, 255,
                                             "mean", True))
        return
    x.requires_grad_(True)
    reduction = "none" if case == "bce_none" else "mean"
    torch.library.opcheck(tm._tree_fwd, (x, y, tab, k, tm.sizes_of(tree), 2.0, 0.0, 255, reduction,
                                         case != "bce_none", case == "min_single_pass"))


def test_compile_fullgraph_traces_the_custom_ops():
    tree = trees.load("cityscapes")
    x, y = _inputs(tree)
    for single_pass in (False, True):
        f = torch.compile(lambda a, t: triton_mod.tree_min_loss(a, t, tree, single_pass=single_pass),
                          fullgraph=True, backend="aot_eager")
        assert_traced_matches(f, ref("tree_min"), x, y, tree)
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
def test_gpu_compile_inductor_fullgraph(kind):
    tree = trees.load("vistas_v2")
    x, y = _inputs(tree, shape=(2, 32, 48))
    x, y = x.cuda(), y.cuda()
    api = LOSSES[kind][0]
    # The registry imports a backend lazily, and Dynamo cannot trace an import: load it before tracing.
    assert "triton" in hss_kernels.available_backends("cuda")
    f = torch.compile(lambda a, t: api(a, t, tree, backend="triton"), fullgraph=True)
    assert_traced_matches(f, ref(kind), x, y, tree)


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
def test_gpu_bitwise_deterministic(kind):
    tree = trees.load("vistas_v2")
    x, y = _inputs(tree, shape=(4, 256, 256), dtype=torch.bfloat16)
    x, y = x.cuda(), y.cuda()
    assert_bitwise_deterministic(backend(kind), x, y, tree)


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements():
    tree = trees.load("vistas_v2")  # 147 nodes · 4096 · 4096 = 2.5e9 elements (4.9 GB in bf16)
    H, W = 4096, 4096
    x = torch.randn(1, tree.num_nodes, H, W, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, tree.num_leaves, (1, H, W), device="cuda")
    assert_tail_rows_match(backend("tree_min"), ref("tree_min"), x, y, tree, atol=1e-4)


@pytest.mark.parametrize("parents", [[-1], [-1] * 5, [-1, 0, 1, 2], [2, 2, -1, 2, 3, 3]])
def test_degenerate_trees(parents):
    # one leaf; flat (no internal node: the internal-node loop runs zero times); a chain; a root leaf
    tree = hss_kernels.Tree.from_parents(parents)
    x, y = _inputs(tree, dtype=torch.float64)
    for kind in ("tree_min", "tree_bce"):
        assert_matches(backend(kind), ref(kind), x, y, tree, reduction="none", gamma=2.0)


@pytest.mark.parametrize("kind", ["tree_min", "tree_bce"])
def test_empty_batch(kind):
    tree = trees.load("cityscapes")
    x = torch.randn(2, tree.num_nodes, 0, 5, requires_grad=True)
    y = torch.zeros(2, 0, 5, dtype=torch.long)
    assert_empty_batch(backend(kind), x, y, tree)


# The segmented-scan variant of the negative side (tree_min.USE_SCAN). The interpreter's
# associative_scan costs seconds per call, so these inputs are a handful of pixels.
@pytest.mark.parametrize("name", ["vistas_v2", "helen", "pascal_person_part"])
def test_scan_variant_matches_reference(name, monkeypatch):
    from hss_kernels.triton import tree_min as tm
    monkeypatch.setattr(tm, "USE_SCAN", True)
    tree = trees.load(name)
    x, y = _inputs(tree, shape=(1, 1, 5), dtype=torch.float64, ignore_frac=0.2)
    assert_matches(backend("tree_min"), ref("tree_min"), x, y, tree, reduction="none", gamma=2.0, scale=5.0)
    ties = torch.randint(-1, 2, x.shape).to(torch.float64)  # ties everywhere: first in pre-order wins
    assert_matches(backend("tree_min"), ref("tree_min"), ties, y, tree, gamma=0.0, normalize="node")


@pytest.mark.parametrize("parents", [[-1] * 4, [-1, 0, 1, 2], [2, 2, -1, 2, 3, 3, 4, -1, 7]])
def test_scan_variant_on_odd_trees(parents, monkeypatch):
    from hss_kernels.triton import tree_min as tm
    monkeypatch.setattr(tm, "USE_SCAN", True)
    tree = hss_kernels.Tree.from_parents(parents)
    x, y = _inputs(tree, shape=(1, 2, 3), dtype=torch.float32)
    assert_matches(backend("tree_min"), ref("tree_min"), x, y, tree, reduction="sum", gamma=1.0, eps=1e-3)
    loss1, grad1 = tm.tree_min_loss_and_grad(x, y, tree, gamma=1.0)
    monkeypatch.setattr(tm, "USE_SCAN", False)
    loss2, grad2 = tm.tree_min_loss_and_grad(x, y, tree, gamma=1.0)
    # same terms, summed in another order: equal up to float32 rounding
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad1, grad2, rtol=1e-6, atol=1e-8)
