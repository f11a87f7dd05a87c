"""What the tests share: random trees and inputs, running a loss forward and backward, comparing a backend
with the reference (one tolerance table), and the checks several op files make (bitwise determinism,
empty batches, offsets past 2^31, the single pass, tracing, decoding against the reference).

conftest.py puts this folder on ``sys.path``, so ``import helpers`` works from ``tests/native`` and
``tests/triton`` too. Inputs are drawn on the CPU from torch's generator (seeded per test by conftest:
``HSS_SEED=<n>`` replays a failure), then moved to the device, so a test draws the same numbers on every
device.
"""
from __future__ import annotations

import contextlib
import math
import random
from typing import Optional, Union

import pytest
import torch
import torch.nn.functional as F

import hss_kernels
from hss_kernels import Tree, backends, reference

LOSSES = ("hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss")
NODE_LOSSES = ("tree_min_loss", "tree_bce_loss")
DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
HALF = (torch.bfloat16, torch.float16)
REDUCTIONS = ("mean", "sum", "none")


# ---------------------------------------------------------------------------------------- devices
CUDA = pytest.param("cuda", marks=pytest.mark.gpu)  # for a test that only makes sense on a GPU


def absent_backend(reason: str):
    """A stand-in for a backend module that has no ops and says ``reason`` when asked why (put it in
    ``hss_kernels.backends._loaded`` with monkeypatch)."""
    class Absent:
        OPS = {}

        @staticmethod
        def unavailable_reason(device):
            return reason
    return Absent


def interpreted(backend: str, device) -> bool:
    """Triton on the CPU: its interpreter, ~50 ms a kernel launch."""
    return backend == "triton" and torch.device(device).type == "cpu"


def sweep(backend: str, device, full, under_interpreter):
    """``full``, or for Triton under its interpreter the part of it the CPU's Triton tests checked before
    the suite ran on every device: the same kernels get the full sweep compiled, on CUDA."""
    return under_interpreter if interpreted(backend, device) else full


def sized(device, cpu, cuda):
    """``cuda`` on a GPU, ``cpu`` elsewhere: where a test checks more (trees, pixels) on a GPU than the
    interpreter can afford on the CPU; the CPU's choice is what the CPU-only tests checked before the
    suite ran on both, the GPU's what the GPU-only tests checked."""
    return cuda if torch.device(device).type == "cuda" else cpu


# ---------------------------------------------------------------------------------------- tolerances
# One table, by logits dtype, for every comparison of a backend with the reference.
#   loss: in the accumulation dtype (float32 for float16/bfloat16 logits: both sides compute the loss in
#         float32 from the same rounded inputs), so a half dtype's loss gets float32's tolerance;
#   gradient: rounded once to the logits' dtype by both sides, from float32 values that may differ in the
#         last bits: about one ulp of the logits' dtype (rtol), plus the accumulation dtype's rtol times
#         the largest gradient element (the terms of a gradient element cancel, so its rounding is
#         relative to the largest term, not to the element itself); atol scales with grad_output and the
#         reduction (assert_grad_close), so that a wrong mean-reduced gradient does not hide under it.
TOL = {
    torch.float64: dict(rtol=1e-9, atol=1e-11),
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float16: dict(rtol=2e-3, atol=2e-5),
    torch.bfloat16: dict(rtol=1.6e-2, atol=2e-4),
}
# The hierarchical softmax loss of a pixel is a sum over D levels of differences lse - lse_d of
# log-sum-exps of size up to max|x| + log L: both sides round those, so a per-pixel loss near 0 can
# differ by a few ulps of the log-sum-exps (measured, Triton and native, std 3 and 40, four trees, ~1300
# runs of 140 pixels: up to 1.33 ulps per level; a flat atol of 2e-6 failed at std 3, and 2e-6 * std
# had no margin at std 40). Allowed: this many ulps of the accumulation dtype per level, at the
# log-sum-exps' size.
LSE_ULPS = 4


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def loss_tolerance(loss: str, x: torch.Tensor, tree: Tree) -> dict:
    """(rtol, atol) of a loss comparison: the accumulation dtype's, plus the rounding of the log-sum-exps
    for the hierarchical softmax."""
    acc = acc_dtype(x.dtype)
    tol = dict(TOL[acc])
    if loss == "hierarchical_softmax_loss" and x.numel():
        size = float(x.detach().abs().max()) + math.log(max(tree.num_leaves, 1))
        if math.isfinite(size):
            tol["atol"] += LSE_ULPS * torch.finfo(acc).eps * tree.depth * size
    return tol


def upstream_size(grad_out: torch.Tensor, target: torch.Tensor, reduction="mean", ignore_index=255) -> float:
    """The largest d(loss)/d(per-pixel loss): grad_output's size, divided by the number of counted pixels
    for a mean."""
    g = float(grad_out.detach().abs().max()) if grad_out.numel() else 0.0
    if reduction == "mean":
        g /= max(int((target != ignore_index).sum()), 1)
    return g


def assert_grad_close(grad: torch.Tensor, ref_grad: torch.Tensor, dtype: torch.dtype, upstream: float) -> None:
    """A gradient against the reference's (see TOL), compared in float64. The absolute allowance scales
    with the gradient, not with 1: TOL's atol times ``upstream`` (upstream_size: a mean's gradient is the
    pixel count times smaller than a sum's) plus the accumulation dtype's rtol times the largest element,
    plus one step of the gradient dtype's subnormals (a float16 gradient below 6.1e-5 is stored in steps of
    2^-24, where one rounding is a large relative difference)."""
    tol = TOL[dtype]
    scale = float(ref_grad.detach().abs().max()) if ref_grad.numel() else 0.0
    fi = torch.finfo(grad.dtype)
    atol = tol["atol"] * upstream + TOL[acc_dtype(dtype)]["rtol"] * scale + fi.smallest_normal * fi.eps
    torch.testing.assert_close(grad.double(), ref_grad.double(), rtol=tol["rtol"], atol=atol)


# ---------------------------------------------------------------------------------------- trees
def rng(seed: Optional[int] = None) -> random.Random:
    """A Python generator seeded from torch's (so that HSS_SEED replays it), or from ``seed``."""
    return random.Random(int(torch.randint(0, 2**31, ())) if seed is None else seed)


def random_tree(num_nodes: Optional[int] = None, *, min_nodes: int = 2, max_nodes: int = 24, min_depth: int = 1,
                max_depth: int = 8, min_leaves: int = 1, seed: Optional[int] = None) -> Tree:
    """A random unbalanced tree: node i hangs under the root or under any earlier node, so leaves sit
    anywhere in channel order (nothing may assume "leaves first"), with chains and uneven depths.
    ``num_nodes`` nodes, or a number drawn from [min_nodes, max_nodes]; drawn again until its depth lies
    in [min_depth, max_depth] (8: the native kernels' limit) and it has at least ``min_leaves`` leaves (a chain
    has one: its hierarchical softmax loss is 0 whatever the logits)."""
    r = rng(seed)
    while True:
        n = num_nodes or r.randint(min_nodes, max_nodes)
        tree = Tree.from_parents([-1] + [r.randrange(-1, i) for i in range(1, n)])
        if min_depth <= tree.depth <= max_depth and tree.num_leaves >= min_leaves:
            return tree


def wide_tree() -> Tree:
    """300 leaves under 3 parents, 303 nodes: more leaves and channels than one tile of any kernel."""
    return Tree.from_parents([-1, -1, -1] + [i % 3 for i in range(300)])


def edge_leaves(tree: Tree):
    """Leaf ids 0 and L-1 and the first and last leaves in depth-first pre-order."""
    pre = [tree.channel_labels[c] for c in tree.dfs_order if tree.is_leaf(c)]
    return sorted({0, tree.num_leaves - 1, pre[0], pre[-1]})


def channels(tree: Tree, loss: str) -> int:
    """Leaf logits for the hierarchical softmax, node logits for the rest (decode included)."""
    return tree.num_leaves if loss == "hierarchical_softmax_loss" else tree.num_nodes


# ---------------------------------------------------------------------------------------- inputs
def inputs(tree: Tree, loss: Union[str, int], shape=(2, 5, 7), dtype=torch.float32, *, std=3.0, ignore_frac=0.1,
           ignore_index=255, memory_format=torch.contiguous_format, device="cpu", ties=False, edges=True):
    """Random logits (N, C, H, W) and labels (N, H, W) for ``loss`` (an op name, or a channel count).

    Logits: normal with deviation ``std``, or (``ties``) the integers -1, 0, 1, so that mins, maxes and
    sums tie all the time. Labels: uniform leaf ids, about ``ignore_frac`` of them ``ignore_index``;
    with ``edges``, the first pixels hold the first and last leaves by id and in pre-order (never
    ignored)."""
    C = loss if isinstance(loss, int) else channels(tree, loss)
    N, H, W = shape
    if ties:
        x = torch.randint(-1, 2, (N, C, H, W)).to(dtype)
    else:
        x = (torch.randn(N, C, H, W, dtype=torch.float64) * std).to(dtype)
    y = torch.randint(0, tree.num_leaves, shape)
    drop = torch.rand(shape) < ignore_frac
    if edges and y.numel():
        e = torch.tensor(edge_leaves(tree))[: y.numel()]
        y.view(-1)[: len(e)] = e
        drop.view(-1)[: len(e)] = False
    y[drop] = ignore_index
    return x.to(device).contiguous(memory_format=memory_format), y.to(device)


def grad_outs(shape, dtype=torch.float32, device="cpu", transposed=True):
    """Upstream gradients for reduction="none": dense random, a stride-0 expand of one value, and (unless
    not ``transposed``) a transposed, non-contiguous one."""
    yield torch.randn(shape, dtype=dtype).to(device)
    yield torch.randn((), dtype=dtype).to(device).expand(shape)
    if transposed:
        N, H, W = shape
        yield torch.randn(N, W, H, dtype=dtype).to(device).transpose(1, 2)


# ---------------------------------------------------------------------------------------- running
def api(loss: str, backend: str):
    """The public function of ``loss`` with ``backend`` bound."""
    fn = getattr(hss_kernels, loss)
    return lambda logits, target, tree, **kw: fn(logits, target, tree, backend=backend, **kw)


def ref(loss: str):
    return getattr(reference, loss)


def loss_and_grad(fn, x, y, tree, grad_out=None, **kw):
    """(loss, d(loss·grad_out)/dx, grad_out) of ``fn(x, y, tree, **kw)`` on a fresh leaf copy of x;
    grad_out random (drawn on the CPU) when not given."""
    a = x.detach().clone().requires_grad_(True)
    loss = fn(a, y, tree, **kw)
    if grad_out is None:
        grad_out = torch.randn(loss.shape, dtype=loss.dtype).to(loss.device)
    (grad,) = torch.autograd.grad(loss, a, grad_out)
    return loss.detach(), grad, grad_out


def assert_matches(fn, ref_fn, x, y, tree, grad_out=None, loss_tol=None, **kw):
    """``fn``'s loss and gradient equal ``ref_fn``'s (same grad_out): the loss in the accumulation dtype
    and the reference's shape, the gradient in x's dtype, shape and device (TOL). Returns (loss, grad)."""
    loss, grad, go = loss_and_grad(fn, x, y, tree, grad_out, **kw)
    ref_loss, ref_grad, _ = loss_and_grad(ref_fn, x, y, tree, go, **kw)
    acc = acc_dtype(x.dtype)
    assert loss.dtype == acc and ref_loss.dtype == acc, (loss.dtype, ref_loss.dtype)
    assert loss.shape == ref_loss.shape and loss.device == x.device
    assert grad.dtype == x.dtype and grad.shape == x.shape and grad.device == x.device
    torch.testing.assert_close(loss, ref_loss, **(loss_tol or TOL[acc]))
    upstream = upstream_size(go, y, kw.get("reduction", "mean"), kw.get("ignore_index", 255))
    if kw.get("upsample"):
        upstream *= upsample_fan_in(x.shape[-2:], y.shape[-2:], kw.get("align_corners", False))
    assert_grad_close(grad, ref_grad, x.dtype, upstream)
    return loss, grad


def upsample_fan_in(src, dst, align_corners=False) -> float:
    """The largest sum of bilinear weights that one source pixel takes from the destination pixels: a
    low-resolution logit's gradient sums that many pixels' gradients (and their roundings), so its
    allowance scales with it (a 3 x 29 -> 5 x 150 upsampling: about 9)."""
    z = torch.zeros(1, 1, *src, dtype=torch.float64, requires_grad=True)
    F.interpolate(z, size=tuple(dst), mode="bilinear", align_corners=align_corners).sum().backward()
    return max(float(z.grad.max()), 1.0)


def check(loss: str, backend: str, x, y, tree, grad_out=None, **kw):
    """``hss_kernels.<loss>(..., backend=backend)`` against the reference (see assert_matches)."""
    return assert_matches(api(loss, backend), ref(loss), x, y, tree, grad_out,
                          loss_tol=loss_tolerance(loss, x, tree), **kw)


def require(backend: str, device="cpu", op: Optional[str] = None) -> None:
    """Skip, with the registry's reason, unless ``backend`` runs (``op``) on ``device``."""
    why = backends.unavailable_reason(backend, device, op)
    if why is not None:
        pytest.skip(f"{backend} on {device}: {why}")


def backend_or_skip(name: str, device="cpu"):
    """The backend module ``hss_kernels.<name>``, or a skip saying why it cannot run on ``device``."""
    require(name, device)
    import importlib
    return importlib.import_module(backends.BACKENDS[name])


# ---------------------------------------------------------------------------------------- shared checks
def assert_bitwise_deterministic(fn, x, y, tree, runs=3, **kw):
    """Repeated calls give the same loss and gradient to the bit (same grad_out)."""
    first = loss_and_grad(fn, x, y, tree, **kw)
    for _ in range(runs):
        again = loss_and_grad(fn, x, y, tree, grad_out=first[2], **kw)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def assert_empty_batch(fn, x, y, tree):
    """With no pixel, every reduction gives 0 (an empty map for "none") and a gradient of x's shape."""
    x = x.detach().requires_grad_(True)
    for reduction in REDUCTIONS:
        loss = fn(x, y, tree, reduction=reduction)
        assert loss.shape == (y.shape if reduction == "none" else ()) and (loss == 0).all()
        (g,) = torch.autograd.grad(loss.sum(), x)
        assert g.shape == x.shape


def assert_tail_rows_match(loss: str, backend: str, x, y, tree):
    """On a (1, C, H, W) input too large for the reference, the last two rows (past 2^31 elements) of the
    per-pixel loss and of the gradient equal the reference's on those rows alone."""
    Hh = x.shape[2]
    x.requires_grad_(True)
    out = api(loss, backend)(x, y, tree, reduction="none")
    go = torch.randn_like(out)
    out.backward(go)
    tail = slice(Hh - 2, Hh)
    xs = x.detach()[:, :, tail].contiguous()
    ref_loss, ref_grad, _ = loss_and_grad(ref(loss), xs, y[:, tail].contiguous(), tree, reduction="none",
                                          grad_out=go[:, tail].contiguous())
    torch.testing.assert_close(out[:, tail], ref_loss, **loss_tolerance(loss, xs, tree))
    assert_grad_close(x.grad[:, :, tail], ref_grad, x.dtype, upstream_size(go, y, "none"))


@contextlib.contextmanager
def unpoisoned():
    """conftest fills every fresh tensor with NaN; inside this, torch.empty leaves memory untouched (for
    address space that must stay unbacked)."""
    import torch.utils.deterministic as det
    was = det.fill_uninitialized_memory
    det.fill_uninitialized_memory = False
    try:
        yield
    finally:
        det.fill_uninitialized_memory = was


BIG = 2**31


def far_views(channels: int, device="cpu"):
    """bfloat16 logits as strided views into one 4 GiB ``torch.empty`` storage, every stride below 2^31 but
    offsets past it: (3, C, 2, 3) logits whose batch stride is 2^30 + 4096 (n = 2 lands past 2^31), and
    (1, C, 2, 3) logits whose channel stride puts the last channels past 2^31. Address space only: the
    storage is not poisoned, so only the pages the views are written to get backed (a few MB). Skips where
    the storage cannot be had."""
    H, W = 2, 3
    try:
        with unpoisoned():
            store = torch.empty(BIG + 2**20, dtype=torch.bfloat16, device=device)
    except (RuntimeError, MemoryError) as exc:  # no overcommit, or a GPU without 4 GiB free
        pytest.skip(f"cannot reserve 4 GiB of address space on {device}: {exc}")
    sn = 2**30 + 4096
    yield store.as_strided((3, channels, H, W), (sn, H * W, W, 1))
    sc = (BIG + 2**19) // (channels - 1)
    assert sc < BIG and (channels - 1) * sc >= BIG
    yield store.as_strided((1, channels, H, W), (channels * sc, sc, W, 1))


def assert_offsets_past_2_31(loss: str, backend: str, tree: Tree, device="cpu"):
    """The per-pixel loss and gradient of each far view (far_views) equal the reference's on a compact copy:
    a kernel computing an offset in 32 bits reads elsewhere (or faults) and disagrees."""
    for view in far_views(channels(tree, loss), device):
        compact = (torch.randn(view.shape) * 3).to(torch.bfloat16).to(device)
        view.copy_(compact)
        y = torch.randint(0, tree.num_leaves, (view.shape[0],) + tuple(view.shape[2:])).to(device)
        a = view.requires_grad_(True)
        out = api(loss, backend)(a, y, tree, reduction="none")
        go = torch.randn(out.shape).to(device)
        (g,) = torch.autograd.grad(out, a, go)
        c = compact.clone().requires_grad_(True)
        ref_loss = ref(loss)(c, y, tree, reduction="none")
        (gref,) = torch.autograd.grad(ref_loss, c, go)
        torch.testing.assert_close(out, ref_loss, **loss_tolerance(loss, compact, tree))
        assert_grad_close(g, gref, torch.bfloat16, upstream_size(go, y, "none"))
        del view, a, out, g


def assert_one_pass_equals_autograd(one_pass, fn, x, y, tree, **kw):
    """``one_pass(x, y, tree, **kw)`` → (loss, gradient) equals to the bit fn's loss and autograd gradient
    (grad_out 1), the gradient in x's dtype and outside autograd."""
    loss, grad = one_pass(x, y, tree, **kw)
    ones = torch.ones((), dtype=acc_dtype(x.dtype), device=x.device)
    ref_loss, ref_grad, _ = loss_and_grad(fn, x, y, tree, grad_out=ones, **kw)
    assert grad.dtype == x.dtype and not grad.requires_grad
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad)


def assert_saved_gradient_intact(loss_fn, x, y, tree, factor, **kw):
    """Two backward passes through one single-pass loss (retain_graph), the first scaled by ``factor``: the
    gradient saved by the forward is not written to."""
    a = x.clone().requires_grad_(True)
    loss = loss_fn(a, y, tree, single_pass=True, **kw)
    (g1,) = torch.autograd.grad(loss * factor, a, retain_graph=True)
    (g2,) = torch.autograd.grad(loss, a)
    torch.testing.assert_close(g1, factor * g2)
    assert a.grad is None


def assert_traced_matches(f, loss: str, x, y, tree, **kw):
    """``f(logits, target)`` (a compiled closure over the tree) against the reference's ``loss`` with ``**kw``
    (see assert_matches)."""
    assert_matches(lambda a, t, _tree, **_: f(a, t), ref(loss), x, y, tree, loss_tol=loss_tolerance(loss, x, tree),
                   **kw)


def assert_saves_no_full_size_intermediate(fn, x, y, tree):
    """Between forward and backward, autograd holds the logits themselves plus at most D + 1 values per
    pixel (the hierarchical softmax's log-sum-exps), the target and the small tree tables: no tensor of
    the logits' size is made for the backward (MATH.md: the gradient is the only full-size extra)."""
    x = x.detach().requires_grad_(True)
    P = y.numel()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x, y, tree)
    assert saved, "nothing saved for the backward?"
    others = [t for t in saved if not (t.data_ptr() == x.data_ptr() and t.shape == x.shape)]
    bound = (tree.depth + 1) * P + P + 16 * tree.num_nodes + 2 * tree.num_leaves * tree.depth
    assert sum(t.numel() for t in others) <= bound < x.numel(), [tuple(t.shape) for t in others]
    out.backward()  # and the backward still works from what was saved
    assert x.grad is not None and torch.isfinite(x.grad).all()


def assert_inputs_not_mutated(run, x, y):
    """``run(logits, target)`` (forward and backward, any number of calls) changes neither tensor: same
    version counters, same values; for NCHW and channels_last logits."""
    for layout in (torch.contiguous_format, torch.channels_last):
        logits = x.contiguous(memory_format=layout).requires_grad_(True)
        target = y.clone()
        snap_x, snap_y = logits.detach().clone(), target.clone()
        versions = (logits._version, target._version)
        run(logits, target)
        assert (logits._version, target._version) == versions
        assert torch.equal(logits.detach(), snap_x) and torch.equal(target, snap_y)


# ---------------------------------------------------------------------------------------- decoding
ACTIVATIONS = ("sigmoid", "softmax")
SCORES = ("sum", "mean")


def random_logits(C, shape=(2, 9, 13), dtype=torch.float32, scale=3.0, device="cpu"):
    N, *S = shape
    return (torch.randn(N, C, *S, dtype=torch.float64) * scale).to(dtype).to(device)


def saturated_logits(C, shape, dtype=torch.float32, device="cpu", p_high=0.7):
    """Logits of +50 / -800: activations exactly 0 or 1 (sigmoid) or 0 or 1/k (softmax), so that path sums
    are exact in any order and many leaves tie."""
    N, *S = shape
    hi = torch.rand(N, C, *S) < p_high
    return torch.where(hi, 50.0, -800.0).to(dtype).to(device)


def path_scores(logits, tree, activation, score):
    """Float64 path scores (N, L, P) of the logits (leaf logits: the logits themselves)."""
    N, C = logits.shape[:2]
    x = logits.double().reshape(N, C, -1)
    if C == tree.num_leaves and C != tree.num_nodes:
        return x
    a = torch.sigmoid(x) if activation == "sigmoid" else torch.softmax(x, dim=1)
    path = tree.tables().path.double().to(x.device)
    if score == "mean":
        path = path / path.sum(dim=0, keepdim=True)
    return torch.einsum("vl,nvp->nlp", path, a)


def first_maximum(logits, tree, activation, score):
    """The exact answer where path scores are exact (saturated logits): the first maximum, (N, *S)."""
    s = path_scores(logits.cpu(), tree, activation, score)
    return s.argmax(dim=1).reshape(logits.shape[0], *logits.shape[2:])


def has_ties(logits, tree, activation, score) -> bool:
    s = path_scores(logits.cpu(), tree, activation, score)
    return bool(((s == s.max(dim=1, keepdim=True).values).sum(dim=1) > 1).any())


def assert_decodes_like_reference(got, logits, tree, activation="sigmoid", score="sum", ignore_index=255):
    """Labels equal the reference's, except at near ties where the two chosen leaves' float64 scores
    agree to rounding (the kernels sum in another order than the reference's einsum). A pixel with a NaN
    logit must be ``ignore_index`` exactly; the others are compared as above."""
    assert got.dtype == torch.int64 and got.device == logits.device
    want = reference.decode(logits.cpu(), tree, activation, score, ignore_index=ignore_index)
    assert got.shape == want.shape
    got = got.cpu()
    nan = torch.isnan(logits.cpu()).any(dim=1).reshape(got.shape)
    if bool(nan.any()):
        assert bool((got[nan] == ignore_index).all()), "a pixel with a NaN logit is not ignore_index"
        assert not bool((got[~nan] == ignore_index).any()), "a pixel without NaN logits got ignore_index"
        logits = torch.where(torch.isnan(logits.cpu()), 0.0, logits.cpu()).to(logits.dtype)
        want = reference.decode(logits, tree, activation, score)
        got = torch.where(nan, want, got)
    diff = got != want
    if not bool(diff.any()):
        return
    s = path_scores(logits.cpu(), tree, activation, score)
    N = got.shape[0]
    sg = s.gather(1, got.reshape(N, 1, -1))[:, 0]
    sw = s.gather(1, want.reshape(N, 1, -1))[:, 0]
    tol = 1e-9 if logits.dtype == torch.float64 else 2e-5
    gap = (sg - sw).abs()[diff.reshape(N, -1)]
    assert float(gap.max()) <= tol, f"{int(diff.sum())} labels differ, score gaps up to {float(gap.max())}"


def sibling_ties(tree, logits):
    """All leaf children of each node get the same logits: equal paths, exact ties among them. Returns the
    modified logits and, per leaf, the lowest leaf id of its tie group."""
    x = logits.clone()
    lowest = list(range(tree.num_leaves))
    for p in range(tree.num_nodes):
        leaves = [c for c in tree.children[p] if tree.is_leaf(c)]
        if len(leaves) > 1:
            for c in leaves:
                x[:, c] = x[:, leaves[-1]]
                lowest[tree.channel_labels[c]] = min(tree.channel_labels[k] for k in leaves)
    return x, torch.tensor(lowest)


def assert_lowest_of_ties(labels, lowest):
    labels = labels.cpu()
    assert torch.equal(lowest[labels], labels), "a tie went to a higher leaf id"


def decoder(backend: str):
    """The public decode with ``backend`` bound."""
    return lambda logits, tree, activation="sigmoid", score="sum", **kw: hss_kernels.decode(
        logits, tree, activation, score, backend=backend, **kw)


def with_nans(x, p_pixel=0.2):
    """A copy of logits ``(N, C, *S)`` with NaN at random pixels: in one random channel (leaf or internal, the
    first or the last), or in every channel; returns it and the (N, *S) mask of those pixels."""
    x = x.clone()
    N, C = x.shape[:2]
    mask = torch.rand(N, *x.shape[2:]) < p_pixel
    idx = mask.reshape(N, -1).nonzero().tolist()
    for k, (n, p) in enumerate(idx):
        pos = tuple(int(v) for v in torch.unravel_index(torch.tensor(p), x.shape[2:]))
        if k % 4 == 3:
            x[(n, slice(None)) + pos] = float("nan")
        else:
            c = (0, C - 1, int(torch.randint(0, C, ())))[k % 4 % 3]
            x[(n, c) + pos] = float("nan")
    return x, mask.to(x.device)


def assert_decode_size_like_reference(got, x, tree, act, score, size, align_corners, ignore_index=255):
    """decode(size=) against the reference's decode of the interpolated logits: the NaN pixels exactly; elsewhere
    the picked leaf's path score (float64, of the reference's interpolation) at least the best minus a rounding
    step, since the kernels interpolate in another order (and half-precision logits make exact ties that
    rounding may break either way); most labels equal."""
    want = reference.decode(x.cpu(), tree, act, score, size=size, align_corners=align_corners,
                            ignore_index=ignore_index)
    got = got.cpu()
    assert got.shape == want.shape == (x.shape[0], *size) and got.dtype == torch.int64
    nan = want == ignore_index
    assert torch.equal(got == ignore_index, nan)
    up = reference.upsample_logits(x.cpu(), size, align_corners).double()
    scores = path_scores(torch.where(torch.isnan(up), 0.0, up), tree, act, score).reshape(x.shape[0], -1, *size)
    best = scores.max(dim=1).values
    picked = scores.gather(1, torch.where(nan, 0, got)[:, None]).squeeze(1)
    ok = (picked >= best - 1e-5 * best.abs().clamp(min=1)) | nan
    assert bool(ok.all()), f"{int((~ok).sum())} labels score below the best path"
    assert (got == want).float().mean() > 0.9


def weights_exact(shape, align_corners) -> bool:
    """Whether every interpolation weight of ``shape = (N, h, w, H, W)`` is a multiple of 1/64, so that
    interpolating half-precision logits is exact in float32 whatever the order of the operations (and the use
    of FMA). Elsewhere two nodes' interpolated half-precision logits are often equal in exact arithmetic yet
    differ in their last float32 bit between the fused kernels and F.interpolate, and the tree-min's
    ancestor-min / descendant-max may pick either (a different gradient): the tree-min in half dtypes is
    compared with the composition only where this holds."""
    _, h, w, Hh, W = shape
    for n_in, n_out in ((h, Hh), (w, W)):
        dst = torch.arange(n_out, dtype=torch.float32)
        if align_corners:
            src = dst * (torch.tensor(float(n_in - 1)) / max(n_out - 1, 1) if n_out > 1 else 0.0)
        else:
            src = ((dst + 0.5) * (torch.tensor(float(n_in)) / n_out) - 0.5).clamp(min=0)
        if not torch.equal(src * 64, (src * 64).round()):
            return False
    return True
