"""Triton hierarchical softmax loss against the reference (CPU tensors under Triton's interpreter, CUDA tensors compiled)."""
import pytest
import torch

import hss_kernels
from hss_kernels import backends, reference, trees

from _triton_helpers import (assert_bitwise_deterministic, assert_empty_batch, assert_matches,
                             assert_one_pass_equals_autograd, assert_saved_gradient_intact, assert_tail_rows_match,
                             assert_traced_matches, inputs, loss_and_grad, random_tree)

triton_mod = pytest.importorskip("hss_kernels.triton")
DEV = "cuda" if torch.cuda.is_available() else "cpu"


def api(logits, target, tree, **kw):
    return hss_kernels.hierarchical_softmax_loss(logits, target, tree, backend="triton", **kw)


def ref(logits, target, tree, **kw):
    return reference.hierarchical_softmax_loss(logits, target, tree, **kw)


def _inputs(tree, **kw):
    return inputs(tree, tree.num_leaves, **kw)


@pytest.mark.parametrize("name", trees.names())
def test_every_shipped_tree(name):
    tree = trees.load(name)
    x, y = _inputs(tree)
    assert_matches(api, ref, x, y, tree)


@pytest.mark.parametrize("num_nodes", [3, 9, 17])
def test_random_unbalanced_trees(num_nodes):
    tree = random_tree(num_nodes)
    x, y = _inputs(tree, dtype=torch.float64)
    assert_matches(api, ref, x, y, tree, reduction="none")
    assert_matches(api, ref, x, y, tree, level_weights=torch.rand(tree.depth).tolist(), eps=1e-3)


def test_flat_tree_is_cross_entropy():
    tree = hss_kernels.Tree.from_parents([-1] * 6)
    x, y = _inputs(tree)
    loss = api(x, y, tree)
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(x, y, ignore_index=255))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_reductions_and_options(reduction, eps):
    tree = trees.load("helen")  # depth 4, uneven leaf depths
    x, y = _inputs(tree, dtype=torch.float64, std=6.0)
    weights = (torch.rand(tree.depth) * 2).tolist()
    assert_matches(api, ref, x, y, tree, reduction=reduction, eps=eps, level_weights=weights)


def test_ignore_index_and_target_dtypes():
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, ignore_index=-100, dtype=torch.float64)
    assert_matches(api, ref, x, y, tree, ignore_index=-100)
    assert_matches(api, ref, x, y.to(torch.int32), tree, ignore_index=-100, reduction="none")
    x, y = _inputs(tree, dtype=torch.float64)
    assert_matches(api, ref, x, y.to(torch.uint8), tree, reduction="sum")


def test_far_apart_logits_stay_finite():
    # A label whose group logits sit far below the maximum: e^{z - max} underflows in float32, so a
    # kernel that reused one exp for every level would return inf.
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, std=1.0)
    x[:, 0] += 200.0
    y[y == 0] = 1
    loss, grad = assert_matches(api, ref, x, y, tree, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("shape", [(1, 1, 1), (3, 1, 5), (1, 33, 2)])
def test_odd_shapes(shape):
    tree = trees.load("vistas")
    x, y = _inputs(tree, shape=shape)
    assert_matches(api, ref, x, y, tree, reduction="none")
    assert_matches(api, ref, x, y, tree)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_pixels_ignored(reduction):
    tree = trees.load("lip")
    x, y = _inputs(tree)
    y.fill_(255)
    loss, grad = assert_matches(api, ref, x, y, tree, reduction=reduction)
    assert (loss == 0).all() and (grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_dtypes(dtype):
    tree = trees.load("vistas_v2")
    x, y = _inputs(tree, dtype=dtype)
    assert_matches(api, ref, x, y, tree)
    assert_matches(api, ref, x, y, tree, reduction="none", eps=1e-4)


def test_grad_output_with_any_strides():
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, shape=(2, 4, 3))
    expanded = torch.full((), 0.7, dtype=torch.float32).expand(2, 4, 3)  # stride 0
    transposed = torch.randn(2, 3, 4).transpose(1, 2)
    for go in (expanded, transposed):
        assert_matches(api, ref, x, y, tree, reduction="none", grad_out=go)


def test_channels_last_equals_contiguous():
    tree = trees.load("vistas")
    x, y = _inputs(tree, shape=(2, 6, 5))
    xl = x.contiguous(memory_format=torch.channels_last)
    loss, grad, go = loss_and_grad(api, x, y, tree, reduction="none")
    loss_l, grad_l, _ = loss_and_grad(api, xl, y, tree, reduction="none", grad_out=go)
    assert grad_l.stride() == xl.stride()  # the gradient keeps the layout, no copy
    assert torch.equal(loss, loss_l) and torch.equal(grad, grad_l)


def test_non_dense_logits():
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, shape=(2, 6, 10))
    assert_matches(api, ref, x[:, :, ::2, 1:8], y[:, ::2, 1:8].contiguous(), tree)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("eps", [0.0, 1e-4])
def test_single_pass_equals_two_pass(reduction, eps):
    tree = trees.load("helen")
    x, y = _inputs(tree)
    fn = triton_mod.hierarchical_softmax_loss
    loss2, grad2, go = loss_and_grad(fn, x, y, tree, reduction=reduction, eps=eps)
    loss1, grad1, _ = loss_and_grad(fn, x, y, tree, reduction=reduction, eps=eps, single_pass=True, grad_out=go)
    torch.testing.assert_close(loss1, loss2, rtol=0, atol=0)
    torch.testing.assert_close(grad1, grad2, rtol=1e-6, atol=1e-7)
    ref_loss, ref_grad, _ = loss_and_grad(ref, x, y, tree, reduction=reduction, eps=eps, grad_out=go)
    torch.testing.assert_close(grad1, ref_grad, rtol=2e-5, atol=2e-6 + 2e-5 * float(ref_grad.abs().max()))


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_and_grad_equals_autograd(reduction):
    tree = trees.load("vistas")
    x, y = _inputs(tree, dtype=torch.bfloat16)
    assert_one_pass_equals_autograd(triton_mod.hierarchical_softmax_loss_and_grad, api, x, y, tree,
                                    reduction=reduction, eps=1e-4)


def test_single_pass_autograd_is_not_corrupted():
    tree = trees.load("cityscapes")
    x, y = _inputs(tree)
    assert_saved_gradient_intact(triton_mod.hierarchical_softmax_loss, x, y, tree, 3.0)


def test_bad_calls():
    tree = trees.load("cityscapes")
    x, y = _inputs(tree)
    with pytest.raises(ValueError, match="single_pass"):
        triton_mod.hierarchical_softmax_loss(x, y, tree, reduction="none", single_pass=True)
    with pytest.raises(ValueError, match=r"\(N, L, H, W\)"):
        triton_mod.hierarchical_softmax_loss(x[0], y[0], tree)


@pytest.mark.parametrize("eps", [0.0, 1e-2])
def test_gradcheck(eps):
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, shape=(1, 2, 3), dtype=torch.float64, std=2.0)
    x.requires_grad_(True)
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(lambda a: api(a, y, tree, eps=eps, reduction=reduction), (x,),
                                        fast_mode=True)


@pytest.mark.parametrize("case", ["mean", "none", "single_pass", "backward"])
def test_opcheck(case):
    from hss_kernels.triton import hierarchical_softmax as hs
    tree = trees.load("pascal_person_part")
    x, y = _inputs(tree, shape=(2, 3, 5))
    leaf_group, level_w = hs._tables(tree, [1.0, 0.5, 2.0], torch.float32, x.device)
    if case == "backward":
        _, stats, count, _ = hs._hsm_fwd(x, y, leaf_group, level_w, 1e-4, 255, "none", False)
        go = torch.randn(1, 3, 1).expand(2, 3, 5)
        torch.library.opcheck(hs._hsm_bwd, (go, x, y, leaf_group, level_w, stats, count, 1e-4, 255, "none"))
        return
    x.requires_grad_(True)
    reduction = "none" if case == "none" else "mean"
    torch.library.opcheck(hs._hsm_fwd, (x, y, leaf_group, level_w, 0.0, 255, reduction, case == "single_pass"))


def test_compile_fullgraph_traces_the_custom_ops():
    # aot_eager: AOTAutograd traces forward and backward through the custom ops without Inductor,
    # so this runs on the CPU; the Inductor version is the GPU test below.
    tree = trees.load("cityscapes")
    x, y = _inputs(tree)
    for single_pass in (False, True):
        f = torch.compile(lambda a, t: triton_mod.hierarchical_softmax_loss(a, t, tree, single_pass=single_pass),
                          fullgraph=True, backend="aot_eager")
        assert_traced_matches(f, ref, x, y, tree)
    torch._dynamo.reset()


def test_compile_through_the_public_api():
    tree = trees.load("cityscapes")
    x, y = _inputs(tree)
    assert "triton" in hss_kernels.available_backends(x.device)  # Dynamo cannot trace the lazy import
    f = torch.compile(lambda a, t: api(a, t, tree, level_weights=[1.0, 2.0]), fullgraph=True, backend="aot_eager")
    assert_traced_matches(f, ref, x, y, tree, level_weights=[1.0, 2.0])
    torch._dynamo.reset()


def test_registry_on_cpu(monkeypatch):
    # CPU tensors run under the interpreter whatever TRITON_INTERPRET says; auto never picks it there.
    cpu = torch.device("cpu")
    for env in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", env)
        assert "triton" in hss_kernels.available_backends("cpu")
        assert triton_mod.unavailable_reason(cpu) is None
        assert (backends.resolve("hierarchical_softmax_loss", "auto", cpu)
                is not triton_mod.OPS["hierarchical_softmax_loss"])
    assert "meta" in triton_mod.unavailable_reason(torch.device("meta"))


# ----------------------------------------------------------------------------------- GPU only
@pytest.mark.gpu
def test_gpu_compile_inductor_fullgraph():
    tree = trees.load("vistas")
    x, y = _inputs(tree, shape=(2, 32, 48))
    x, y = x.cuda(), y.cuda()
    # The registry imports a backend lazily, and Dynamo cannot trace an import: load it before tracing.
    assert "triton" in hss_kernels.available_backends("cuda")
    f = torch.compile(lambda a, t: hss_kernels.hierarchical_softmax_loss(a, t, tree, backend="triton"),
                      fullgraph=True)
    assert_traced_matches(f, ref, x, y, tree)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_bitwise_deterministic(dtype):
    tree = trees.load("vistas_v2")
    x, y = _inputs(tree, shape=(4, 256, 256), dtype=dtype)
    x, y = x.cuda(), y.cuda()
    assert_bitwise_deterministic(api, x, y, tree)


@pytest.mark.gpu
def test_gpu_more_than_2_31_elements():
    tree = trees.load("vistas")  # 66 leaves · 8192 · 4096 = 2.2e9 elements (4.4 GB in bf16)
    H, W = 8192, 4096
    x = torch.randn(1, tree.num_leaves, H, W, device="cuda", dtype=torch.bfloat16)
    y = torch.randint(0, tree.num_leaves, (1, H, W), device="cuda")
    assert_tail_rows_match(api, ref, x, y, tree, atol=1e-3)


@pytest.mark.parametrize("parents", [[-1], [-1, 0, 1, 2], [2, 2, -1, 2, 3, 3]])
def test_degenerate_trees(parents):
    tree = hss_kernels.Tree.from_parents(parents)
    x, y = _inputs(tree, dtype=torch.float64)
    assert_matches(api, ref, x, y, tree, reduction="none")


@pytest.mark.parametrize("shape", [(0, 3, 4), (2, 0, 4)])
def test_empty_batch(shape):
    # (the reference cannot reshape 0 elements with -1; the result is 0 / empty by definition)
    tree = trees.load("cityscapes")
    x = torch.randn(shape[0], tree.num_leaves, *shape[1:], requires_grad=True)
    y = torch.zeros(shape, dtype=torch.long)
    assert_empty_batch(api, x, y, tree)
