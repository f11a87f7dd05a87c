"""Acceptance checks of issues 3 (Triton backend) and 4 (native backend) that the per-backend test files
leave out, run on both backends with the same code: labels at the first and last leaf (by id and in
pre-order) on the native backend too, every option value the issues name (gamma 0, 1, 2 and 1.5, both
normalisations, scale, eps, a non-default ignore_index, level weights) with every reduction, no input
mutation, what autograd saves (no full-size intermediate), bitwise-repeatable batch reductions on the
CPU (also across OpenMP thread counts), ``backend="auto"`` choosing the real Triton module on a GPU,
and ``torch.compile(fullgraph=True)`` through the tree BCE and decode.

Inputs are fresh random draws (conftest seeds per test); Triton runs CPU tensors under its interpreter,
so the grids are one or two programs.
"""
import importlib
import random

import pytest
import torch

import hss_kernels
from hss_kernels import Tree, backends, reference, trees

from _helpers import backend_or_skip

LOSSES = {
    "hierarchical_softmax_loss": hss_kernels.hierarchical_softmax_loss,
    "tree_min_loss": hss_kernels.tree_min_loss,
    "tree_bce_loss": hss_kernels.tree_bce_loss,
}
BACKENDS = ["triton", "native"]
TOL64 = dict(rtol=1e-9, atol=1e-11)


def _backend(name, device="cpu"):
    return backend_or_skip(name, device)


def _channels(tree: Tree, loss: str) -> int:
    return tree.num_leaves if loss == "hierarchical_softmax_loss" else tree.num_nodes


def _random_tree() -> Tree:
    """Unbalanced: every node hangs under the root or any earlier node (leaves anywhere in channel order)."""
    rng = random.Random(int(torch.randint(0, 2**31, ())))
    while True:
        V = rng.randint(5, 20)
        tree = Tree.from_parents([-1] + [rng.randrange(-1, i) for i in range(1, V)])
        if 2 <= tree.depth <= 6:
            return tree


def _edge_leaves(tree: Tree):
    """Leaf ids 0 and L-1 and the first and last leaves in depth-first pre-order."""
    pre = [tree.channel_labels[c] for c in tree.dfs_order if tree.is_leaf(c)]
    return sorted({0, tree.num_leaves - 1, pre[0], pre[-1]})


def _inputs(tree, loss, shape=(2, 3, 5), dtype=torch.float64, ignore_index=255, ignore_frac=0.2):
    N, H, W = shape
    x = (torch.randn(N, _channels(tree, loss), H, W, dtype=torch.float64) * 3).to(dtype)
    y = torch.randint(0, tree.num_leaves, shape)
    y[torch.rand(shape) < ignore_frac] = ignore_index
    edges = _edge_leaves(tree)
    y.view(-1)[: len(edges)] = torch.tensor(edges)
    return x, y


def _loss_and_grad(fn, x, y, tree, grad_out=None, **kw):
    a = x.detach().clone().requires_grad_(True)
    loss = fn(a, y, tree, **kw)
    if grad_out is None:
        grad_out = torch.randn(loss.shape, dtype=loss.dtype)
    (g,) = torch.autograd.grad(loss, a, grad_out)
    return loss.detach(), g, grad_out


def _check(backend, loss, x, y, tree, grad_out=None, **kw):
    fn = LOSSES[loss]
    out, g, go = _loss_and_grad(lambda *a, **k: fn(*a, backend=backend, **k), x, y, tree, grad_out, **kw)
    ref, gref, _ = _loss_and_grad(getattr(reference, loss), x, y, tree, go, **kw)
    assert out.dtype == ref.dtype and out.shape == ref.shape and g.dtype == x.dtype
    torch.testing.assert_close(out, ref, **TOL64)
    torch.testing.assert_close(g, gref, rtol=TOL64["rtol"], atol=TOL64["atol"] + TOL64["rtol"] * float(gref.abs().max()))
    return out, g


def _grad_outs(loss_shape):
    """For reduction='none': a dense random gradient and a stride-0 expand of one value."""
    yield torch.randn(loss_shape, dtype=torch.float64)
    yield torch.randn((), dtype=torch.float64).expand(loss_shape)


# ------------------------------------------------------------------ labels at the first and last leaf
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_first_and_last_leaf_labels(backend, loss):
    """Every pixel labelled with an edge leaf (by id and in pre-order), on real trees and a random one."""
    _backend(backend)
    for tree in (trees.load("helen"), trees.load("vistas_v2"), _random_tree()):
        edges = torch.tensor(_edge_leaves(tree))
        x, _ = _inputs(tree, loss, shape=(1, 2, 7))
        y = edges[torch.randint(0, len(edges), (1, 2, 7))]
        y.view(-1)[: len(edges)] = edges
        for reduction in ("none", "sum"):
            _check(backend, loss, x, y, tree, reduction=reduction)


# ------------------------------------------------------------------ every option, every reduction
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", ["tree_min_loss", "tree_bce_loss"])
@pytest.mark.parametrize("gamma", [0.0, 1.0, 2.0, 1.5])
def test_tree_losses_every_option(backend, loss, gamma):
    _backend(backend)
    tree = trees.load("helen")  # depth 4, leaves at several depths
    for ignore_index, normalize, scale, eps in ((255, "level", 1.0, 0.0), (-100, "node", 5.0, 1e-8),
                                                (3, "level", 0.5, 1e-3)):  # mean, sum, mean
        # ignore_index=3 is a real leaf id: those pixels must count for nothing
        x, y = _inputs(tree, loss, ignore_index=-100 if ignore_index == -100 else 255)
        if ignore_index == 3:
            y[y == 255] = 3
        kw = dict(gamma=gamma, scale=scale, eps=eps, normalize=normalize, ignore_index=ignore_index)
        _check(backend, loss, x, y, tree, reduction="mean" if normalize == "level" else "sum", **kw)
        for go in _grad_outs(y.shape):
            _check(backend, loss, x, y, tree, grad_out=go, reduction="none", **kw)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hierarchical_softmax_every_option(backend):
    _backend(backend)
    loss = "hierarchical_softmax_loss"
    for tree in (trees.load("helen"), _random_tree()):
        for ignore_index, weights, eps in ((255, None, 0.0), (-100, torch.rand(tree.depth).tolist(), 1e-4),
                                           (0, (torch.rand(tree.depth) * 3).tolist(), 0.0)):
            x, y = _inputs(tree, loss, ignore_index=-100 if ignore_index == -100 else 255)
            if ignore_index == 0:
                y[y == 255] = 0  # a real leaf id as ignore_index
            kw = dict(level_weights=weights, eps=eps, ignore_index=ignore_index)
            for reduction in ("mean", "sum"):
                _check(backend, loss, x, y, tree, reduction=reduction, **kw)
            for go in _grad_outs(y.shape):
                _check(backend, loss, x, y, tree, grad_out=go, reduction="none", **kw)


# ------------------------------------------------------------------ no input mutation
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_inputs_are_not_mutated(backend, loss):
    mod = _backend(backend)
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, loss, shape=(2, 4, 5), dtype=torch.float32)
    for layout in (torch.contiguous_format, torch.channels_last):
        logits = x.contiguous(memory_format=layout).requires_grad_(True)
        target = y.clone()
        snap_x, snap_y = logits.detach().clone(), target.clone()
        versions = (logits._version, target._version)
        runs = [dict(reduction=r) for r in ("mean", "sum", "none")]
        for kw in runs:
            out = LOSSES[loss](logits, target, tree, backend=backend, **kw)
            torch.autograd.grad(out, logits, torch.ones_like(out))
        if backend == "triton":  # the single pass and the (loss, grad) form
            getattr(mod, loss)(logits, target, tree, single_pass=True).backward()
            getattr(mod, loss + "_and_grad")(logits, target, tree)
        assert (logits._version, target._version) == versions
        assert torch.equal(logits.detach(), snap_x) and torch.equal(target, snap_y)


# ------------------------------------------------------------------ what autograd keeps
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_autograd_saves_no_full_size_intermediate(backend, loss):
    """Between forward and backward, autograd holds the logits themselves plus at most D + 1 values per
    pixel (the hierarchical softmax's log-sum-exps) and the small tree tables: no tensor of the logits'
    size is made for the backward (MATH.md: the gradient is the only full-size extra)."""
    _backend(backend)
    tree = trees.load("vistas")  # L = 66 channels, D = 3
    x, y = _inputs(tree, loss, shape=(2, 8, 9), dtype=torch.float32)
    x.requires_grad_(True)
    P = y.numel()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = LOSSES[loss](x, y, tree, backend=backend)
    assert saved, "nothing saved for the backward?"
    others = [t for t in saved if not (t.data_ptr() == x.data_ptr() and t.shape == x.shape)]
    # statistics, target, tables (far below the logits' 66 * P values)
    bound = (tree.depth + 1) * P + P + 16 * tree.num_nodes + 2 * tree.num_leaves * tree.depth
    assert sum(t.numel() for t in others) <= bound < x.numel(), [tuple(t.shape) for t in others]
    out.backward()  # and the backward still works from what was saved
    assert x.grad is not None and torch.isfinite(x.grad).all()


# ------------------------------------------------------------------ deterministic reductions
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss", LOSSES)
def test_batch_reduction_is_bitwise_repeatable_on_cpu(backend, loss):
    """Same inputs, same bits: loss and gradient, mean and sum, on repeat and (native, OpenMP) with one
    thread or two. Float64 so that a reordered sum would show in the last bits. Enough pixels for
    several CPU blocks (64 pixels) and three Triton programs under the interpreter (1024 pixels)."""
    _backend(backend)
    tree = trees.load("lip")
    x, y = _inputs(tree, loss, shape=(2, 33, 33), ignore_frac=0.1)
    threads = torch.get_num_threads()
    counts = [1, max(2, threads)] if backend == "native" else [threads]
    try:
        for reduction in ("mean", "sum"):
            first = None
            for n in counts:
                torch.set_num_threads(n)
                for _ in range(3):
                    out, g, _ = _loss_and_grad(LOSSES[loss], x, y, tree, torch.tensor(1.0, dtype=torch.float64),
                                               backend=backend, reduction=reduction)
                    if first is None:
                        first = (out, g)
                    else:
                        assert torch.equal(out, first[0]) and torch.equal(g, first[1]), (reduction, n)
    finally:
        torch.set_num_threads(threads)


# ------------------------------------------------------------------ backend="auto"
def test_auto_picks_the_real_modules_on_a_gpu(monkeypatch):
    """With a GPU reported, "auto" resolves every loss (and decode) on a CUDA device to the real module
    function of the first backend in gpu_auto.json's order; on the CPU never to Triton (it would be the
    interpreter)."""
    triton_mod = _backend("triton")
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


# ------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_tree_bce(backend):
    """Dynamo + AOTAutograd (aot_eager: no Inductor code generation on CI) trace forward and backward of
    the tree BCE through each backend's custom ops without a graph break, per-pixel reduction too."""
    _backend(backend)
    hss_kernels.available_backends("cpu")  # the registry's lazy imports happen before tracing
    tree = trees.load("cityscapes")
    x, y = _inputs(tree, "tree_bce_loss", shape=(2, 3, 5), dtype=torch.float32)
    for reduction in ("mean", "none"):
        f = torch.compile(lambda a, t: hss_kernels.tree_bce_loss(a, t, tree, gamma=1.5, reduction=reduction,
                                                                 backend=backend),
                          fullgraph=True, backend="aot_eager")
        out, g, go = _loss_and_grad(lambda a, t, _tree: f(a, t), x, y, tree)
        ref, gref, _ = _loss_and_grad(reference.tree_bce_loss, x, y, tree, go, gamma=1.5, reduction=reduction)
        torch.testing.assert_close(out, ref)
        torch.testing.assert_close(g, gref)
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_compile_fullgraph_decode(backend):
    _backend(backend)
    hss_kernels.available_backends("cpu")
    tree = trees.load("pascal_person_part")
    x = torch.randn(2, tree.num_nodes, 3, 5)
    f = torch.compile(lambda a: hss_kernels.decode(a, tree, "softmax", "mean", backend=backend),
                      fullgraph=True, backend="aot_eager")
    assert torch.equal(f(x), reference.decode(x, tree, "softmax", "mean"))
    torch._dynamo.reset()


def test_opcheck_triton_decode():
    _backend("triton")
    from hss_kernels.triton import decode as tdecode
    tree = trees.load("helen")
    for C, leaf in ((tree.num_nodes, False), (tree.num_leaves, True)):
        x = torch.randn(2, C, 3, 5).contiguous(memory_format=torch.channels_last)
        path, plen = tdecode._tables(tree, x.device, leaf)
        act = tdecode._IDENTITY if leaf else 1
        torch.library.opcheck(torch.ops.hss_triton.decode.default, (x, path, plen, act, not leaf))
