"""The public API: input checks, nn.Module forms, shapes, backend selection."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import hss_kernels as hk
from hss_kernels import backends, reference, trees

import helpers

TREE = trees.load("pascal_person_part")  # 7 leaves, 12 nodes


def leaf_inputs(*spatial, N=2):
    return torch.randn(N, 7, *spatial), torch.randint(0, 7, (N, *spatial))


def node_inputs(*spatial, N=2):
    return torch.randn(N, 12, *spatial), torch.randint(0, 7, (N, *spatial))


# ------------------------------------------------------------------ input checks
@pytest.mark.parametrize("fn, C, bad_C, match", [
    (hk.hierarchical_softmax_loss, 7, 12, "12 channels but the tree has 7 leaves.*node logits"),
    (hk.tree_min_loss, 12, 7, "7 channels but the tree has 12 nodes.*leaf logits"),
    (hk.tree_bce_loss, 12, 5, "5 channels but the tree has 12 nodes"),
])
def test_channel_count(fn, C, bad_C, match):
    with pytest.raises(ValueError, match=match):
        fn(torch.randn(2, bad_C, 3, 3), torch.zeros(2, 3, 3, dtype=torch.long), TREE)


@pytest.mark.parametrize("fn, C", [(hk.hierarchical_softmax_loss, 7), (hk.tree_min_loss, 12)])
def test_target_checks(fn, C):
    x = torch.randn(2, C, 3, 4)
    with pytest.raises(TypeError, match="integer label ids.*float32"):
        fn(x, torch.zeros(2, 3, 4), TREE)
    with pytest.raises(TypeError, match="integer"):
        fn(x, torch.zeros(2, 3, 4, dtype=torch.bool), TREE)
    with pytest.raises(ValueError, match=r"target must have shape \(2, 3, 4\).*got \(2, 4, 3\)"):
        fn(x, torch.zeros(2, 4, 3, dtype=torch.long), TREE)
    y = torch.zeros(2, 3, 4, dtype=torch.long)
    y[1, 2, 3] = 7
    with pytest.raises(ValueError, match=r"label 7, outside \[0, 7\).*ignore_index=255"):
        fn(x, y, TREE)
    y[1, 2, 3] = -1
    with pytest.raises(ValueError, match="label -1"):
        fn(x, y, TREE)
    y[1, 2, 3] = 255
    fn(x, y, TREE)  # the ignore label is fine
    y[1, 2, 3] = -100
    fn(x, y, TREE, ignore_index=-100)  # any ignore_index
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fn(x.long(), y, TREE)
    with pytest.raises(TypeError, match="torch.Tensor"):
        fn(x.numpy(), y, TREE)
    with pytest.raises(ValueError, match="reduction"):
        fn(x, y, TREE, reduction="avg", ignore_index=-100)


@pytest.mark.parametrize("fn, C", [(hk.hierarchical_softmax_loss, 7), (hk.tree_min_loss, 12),
                                   (hk.tree_bce_loss, 12)])
def test_label_check_switch(fn, C):
    x = torch.randn(2, C, 3, 4)
    y = torch.zeros(2, 3, 4, dtype=torch.long)
    y[0, 1, 1] = 7
    assert hk.label_check_enabled()
    try:
        hk.set_label_check(False)
        assert not hk.label_check_enabled()
        # No scan: the bad label reaches the backends, which give NaN there instead of the ValueError.
        for backend in hk.available_backends("cpu", fn.__name__):
            if backend == "triton":
                continue  # interpreter only on the CPU; tests/test_bad_labels.py covers it
            per_pixel = fn(x, y, TREE, backend=backend, reduction="none")
            assert torch.isnan(per_pixel[0, 1, 1]) and torch.isnan(fn(x, y, TREE, backend=backend))
            per_pixel[0, 1, 1] = 0
            assert torch.isfinite(per_pixel).all()
        with pytest.raises(ValueError, match="channels"):  # the other checks stay
            fn(torch.randn(2, C + 1, 3, 4), y, TREE)
    finally:
        hk.set_label_check(True)
    with pytest.raises(ValueError, match=r"label 7, outside"):
        fn(x, y, TREE, backend="reference")


def test_option_checks():
    x, y = node_inputs(3, 3)
    with pytest.raises(ValueError, match="gamma must be >= 0"):
        hk.tree_min_loss(x, y, TREE, gamma=-1)
    with pytest.raises(ValueError, match="normalize"):
        hk.tree_min_loss(x, y, TREE, normalize="depth")
    x, y = leaf_inputs(3, 3)
    with pytest.raises(ValueError, match="level_weights needs 3 values"):
        hk.hierarchical_softmax_loss(x, y, TREE, level_weights=[1, 1])
    with pytest.raises(TypeError, match="hss_kernels.Tree"):
        hk.hierarchical_softmax_loss(x, y, 42)


def test_backend_errors():
    x, y = leaf_inputs(3, 3)
    with pytest.raises(RuntimeError, match="unknown backend 'fast'"):
        hk.hierarchical_softmax_loss(x, y, TREE, backend="fast")


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setitem(backends._loaded, "native", helpers.absent_backend("the fake extension is not built"))
    x, y = leaf_inputs(3, 3)
    with pytest.raises(RuntimeError, match="backend='native' cannot run .* not built"):
        hk.hierarchical_softmax_loss(x, y, TREE, backend="native")
    # auto falls back to what is available
    torch.testing.assert_close(hk.hierarchical_softmax_loss(x, y, TREE, backend="auto"),
                               reference.hierarchical_softmax_loss(x, y, TREE))
    assert "native" not in hk.available_backends("cpu")


def test_auto_order(monkeypatch):
    """auto: Triton never on the CPU (it would be the interpreter); native before the reference; on a CUDA
    device the committed order."""
    def fake(tag):
        class Fake:
            OPS = {"tree_min_loss": lambda *a, **k: tag}

            @staticmethod
            def unavailable_reason(device):
                return None
        return Fake

    monkeypatch.setitem(backends._loaded, "triton", fake("triton"))
    cpu = torch.device("cpu")
    assert backends.resolve("tree_min_loss", "triton", cpu)() == "triton"
    monkeypatch.setitem(backends._loaded, "native", fake("native"))
    assert backends.resolve("tree_min_loss", "auto", cpu)() == "native"
    # on a CUDA device: the order of gpu_auto.json (tests/test_auto_choice.py)
    assert backends.resolve("tree_min_loss", "auto", torch.device("cuda"))() == \
        backends.gpu_auto_order("tree_min_loss", torch.float32)[0]
    assert backends.resolve("hierarchical_softmax_loss", "auto", cpu) is reference.hierarchical_softmax_loss


def test_auto_picks_the_native_decode_on_cpu(monkeypatch):
    # the native CPU decode is measured faster than the reference's einsum (benchmarks, config medium)
    class Fake:
        OPS = {"decode": lambda *a, **k: "native"}

        @staticmethod
        def unavailable_reason(device):
            return None

    monkeypatch.setitem(backends._loaded, "native", Fake)
    assert backends.resolve("decode", "auto", torch.device("cpu"))() == "native"
    assert backends.resolve("decode", "reference", torch.device("cpu")) is reference.decode


def test_triton_registry_on_cpu(monkeypatch):
    """CPU tensors run Triton under its interpreter whatever TRITON_INTERPRET says; auto never picks it
    there; other devices are refused with a reason."""
    triton_mod = helpers.backend_or_skip("triton")
    cpu = torch.device("cpu")
    for env in ("1", "0"):
        monkeypatch.setenv("TRITON_INTERPRET", env)
        assert "triton" in hk.available_backends("cpu")
        assert triton_mod.unavailable_reason(cpu) is None
        for op in ("hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss", "decode"):
            assert backends.resolve(op, "auto", cpu) is not triton_mod.OPS[op]
    assert "meta" in triton_mod.unavailable_reason(torch.device("meta"))


def test_auto_picks_the_real_modules_on_a_gpu(monkeypatch):
    """With a GPU reported, "auto" resolves every loss (and decode) on a CUDA device to the real module
    function of the first backend in gpu_auto.json's order; on the CPU never to Triton (it would be the
    interpreter)."""
    triton_mod = helpers.backend_or_skip("triton")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    mods = {"triton": triton_mod}
    try:  # a native backend with CUDA kernels too
        native_mod = importlib.import_module("hss_kernels.native")
        monkeypatch.setattr(native_mod, "unavailable_reason", lambda device: None)
        mods["native"] = native_mod
    except ImportError:
        pass
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert triton_mod.unavailable_reason(cuda) is None
    for op in ("hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss", "decode"):
        for dtype in (torch.float32, torch.bfloat16):
            first = next(b for b in backends.gpu_auto_order(op, dtype) if b in mods)
            assert backends.resolve(op, "auto", cuda, dtype) is mods[first].OPS[op]
        assert backends.resolve(op, "auto", cpu) is not triton_mod.OPS[op]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert backends.resolve("decode", "auto", cuda) is not triton_mod.OPS["decode"]


# ------------------------------------------------------------------ shapes and forms
@pytest.mark.parametrize("spatial", [(), (5,), (3, 4), (2, 3, 4)])
def test_any_spatial_shape(spatial):
    x, y = leaf_inputs(*spatial)
    out = hk.hierarchical_softmax_loss(x, y, TREE, reduction="none")
    assert out.shape == y.shape
    flat = reference.hierarchical_softmax_loss(x.reshape(2, 7, -1, 1), y.reshape(2, -1, 1), TREE, reduction="none")
    torch.testing.assert_close(out.reshape(-1), flat.reshape(-1))
    x, y = node_inputs(*spatial)
    assert hk.tree_min_loss(x, y, TREE, reduction="none").shape == y.shape
    assert hk.decode(x, TREE).shape == y.shape


def test_modules_match_functional():
    x, y = leaf_inputs(4, 5)
    m = hk.HierarchicalSoftmaxLoss(TREE, level_weights=[1, 2, 3], reduction="sum")
    torch.testing.assert_close(m(x, y), hk.hierarchical_softmax_loss(x, y, TREE, level_weights=[1, 2, 3], reduction="sum"))
    x, y = node_inputs(4, 5)
    m = hk.TreeMinLoss("pascal_person_part", scale=5.0)
    assert m.gamma == 2.0
    torch.testing.assert_close(m(x, y), hk.tree_min_loss(x, y, TREE, gamma=2.0, scale=5.0))
    m = hk.TreeBCELoss(TREE, gamma=1.0, normalize="node")
    torch.testing.assert_close(m(x, y), hk.tree_bce_loss(x, y, TREE, gamma=1.0, normalize="node"))
    e = torch.randn(2, 6, 4, 5)
    m = hk.TreeTripletLoss(TREE, sampling="first")
    torch.testing.assert_close(m(e, y), hk.tree_triplet_loss(e, y, TREE, sampling="first"))
    assert "pascal" not in repr(m) and "Tree(7 leaves" in repr(hk.TreeMinLoss(TREE))


def test_triplet_and_decode_checks():
    e = torch.randn(2, 6, 4, 5)
    with pytest.raises(TypeError, match="embedding"):
        hk.tree_triplet_loss(e[0], torch.zeros(2, 4, 5, dtype=torch.long), TREE)
    with pytest.raises(ValueError, match="label 9"):
        hk.tree_triplet_loss(e, torch.full((2, 4, 5), 9), TREE)
    with pytest.raises(ValueError, match="C = 12 \\(nodes\\) or 7 \\(leaves\\)"):
        hk.decode(torch.randn(1, 5, 2, 2), TREE)
    with pytest.raises(ValueError, match="activation"):
        hk.decode(torch.randn(1, 12, 2, 2), TREE, activation="relu")
    with pytest.raises(ValueError, match="label 8"):
        hk.labels_at_depth(torch.tensor([8]), TREE, 1)


def test_flat_tree_public_api_is_cross_entropy():
    flat = hk.Tree.from_parents([-1] * 5)
    x = torch.randn(3, 5, 6, 7, requires_grad=True)
    y = torch.randint(0, 5, (3, 6, 7))
    y[0, :2] = 255
    a = hk.hierarchical_softmax_loss(x, y, flat)
    b = F.cross_entropy(x, y, ignore_index=255)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(torch.autograd.grad(a, x)[0], torch.autograd.grad(b, x)[0])


# ------------------------------------------------------------------ labels_at_depth
def test_labels_at_depth_keeps_ignore():
    tree = trees.load("helen")
    y = torch.randint(0, tree.num_leaves, (2, 6, 7))
    y[0, :2] = 255
    for d in range(1, tree.depth + 1):
        out = hk.labels_at_depth(y, tree, d)
        assert out.dtype == y.dtype
        assert bool((out[0, :2] == 255).all())
        table = torch.tensor(tree.leaf_group[d - 1])
        keep = y != 255
        assert torch.equal(out[keep], table[y[keep]])
        assert int(out[keep].max()) < tree.num_classes(d)
    assert torch.equal(hk.labels_at_depth(y, tree, tree.depth), y)
    z = torch.where(y == 255, -1, y)
    out = hk.labels_at_depth(z, tree, 1, ignore_index=-1)
    assert bool((out[0, :2] == -1).all())
    tiny = hk.Tree.from_parents([-1, -1, 0, 0, 1])  # labels 0,1 under node 0, label 2 under node 1
    assert hk.labels_at_depth(torch.tensor([0, 1, 2, 255]), tiny, 1).tolist() == [0, 0, 1, 255]
    with pytest.raises(ValueError):
        hk.labels_at_depth(torch.tensor([11]), tree, 1)


def test_label_check_switch_labels_at_depth_and_triplet():
    """labels_at_depth and the triplet loss follow set_label_check like the losses: with the scan off a
    bad label is never read out of bounds (-1 at every depth; a NaN triplet loss)."""
    labels = torch.tensor([[0, 1, 9, 255]])
    e = torch.randn(1, 6, 1, 4)
    with pytest.raises(ValueError, match="label 9"):
        hk.labels_at_depth(labels, TREE, 1)
    with pytest.raises(ValueError, match="label 9"):
        hk.tree_triplet_loss(e, labels[:, None], TREE)
    try:
        hk.set_label_check(False)
        for depth in range(1, TREE.depth + 1):
            got = hk.labels_at_depth(labels, TREE, depth)
            assert got[0, 2] == -1 and got[0, 3] == 255
            assert got[0, :2].tolist() == TREE.tables().leaf_group[depth - 1, :2].tolist()
        assert torch.isnan(hk.tree_triplet_loss(e, labels[:, None], TREE))
        assert torch.isfinite(hk.tree_triplet_loss(e, labels[:, None].clamp(max=3), TREE))
    finally:
        hk.set_label_check(True)
