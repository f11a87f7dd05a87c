"""Hierarchical softmax loss (docs/MATH.md §2) in Triton: one kernel, three modes.

Per pixel with label y, leaves j, level weights w_d and the nested groups G_1(y) ⊇ ... ⊇ G_D(y):

    lse   = log Σ_j e^{z_j}            lse_d = log Σ_{j ∈ G_d(y)} e^{z_j}
    ℓ     = Σ_d w_d (lse − lse_d)       (eps > 0: ℓ = −Σ_d w_d log(e^{lse_d − lse} + eps))

Gradient, with p_j = e^{z_j − lse} and d_j the deepest level whose group holds j (0 if none):

    eps = 0:  ∂ℓ/∂z_j = W p_j − e^{z_j − lse_{d_j}} F_{d_j},   W = Σ_d w_d,
              F_k = Σ_{d ≤ k} w_d e^{lse_k − lse_d} = e^{lse_k − lse_{k−1}} F_{k−1} + w_k
              (lse_k ≤ lse_{k−1} because the groups are nested: no factor ever exceeds 1)
    eps > 0:  ∂ℓ/∂z_j = p_j (A − B_{d_j}),  P_d = e^{lse_d − lse},
              A = Σ_d w_d P_d / (P_d + eps),  B_k = Σ_{d ≤ k} w_d / (P_d + eps)

Modes of ``_hierarchical_softmax_kernel``:
* forward: computes lse and lse_1..lse_D (one exp per element: the group sums reuse e^{z - max},
  except in blocks where a group's sum underflows), writes them as the saved statistics
  ``(D + 1, P)`` and the loss (per pixel, or per-program partial sums for the reduction);
* backward: reads the logits and the statistics, writes the gradient (two exps per element);
* single pass: the forward that also writes the gradient (docs/MATH.md §5.6).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .. import tables
from ..tree import Tree
from . import _common as C

__all__ = ["hierarchical_softmax_loss", "hierarchical_softmax_loss_and_grad"]


@triton.jit
def _hierarchical_softmax_kernel(
    x_ptr, t_ptr, lg_ptr, w_ptr, stats_ptr, loss_ptr, part_ptr, cnt_ptr, g_ptr, go_ptr,
    P, HW, W,
    sxn, sxc, sxh, sxw,
    stn, sth, stw,
    sgn, sgc, sgh, sgw,
    son, soh, sow,
    eps, ignore_index,
    L: tl.constexpr, D: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
    HAS_EPS: tl.constexpr, COMPUTE_STATS: tl.constexpr, WRITE_STATS: tl.constexpr,
    LOSS_MODE: tl.constexpr, GRAD_MODE: tl.constexpr, TINY: tl.constexpr,
):
    pid = tl.program_id(0)
    p, pmask, n, h, w = C.pixel_coords(pid, P, HW, W, BLOCK_P)
    P64 = tl.zeros_like(p) + P  # (d + 1) * P in 64 bits: the statistics rows may pass 2^31 in all
    c = tl.arange(0, BLOCK_C)
    cmask = c < L
    mask2 = cmask[:, None] & pmask[None, :]

    y, valid, bad = C.load_labels(t_ptr + n * stn + h * sth + w * stw, pmask, ignore_index, L)

    x_off = n[None, :] * sxn + c[:, None].to(tl.int64) * sxc + (h * sxh + w * sxw)[None, :]
    x = tl.load(x_ptr + x_off, mask=mask2, other=0.0).to(ACC)  # sm90: logits
    # Padded channels are -inf (they vanish from every sum); padded pixels stay finite (0).
    x = tl.where(cmask[:, None], x, float("-inf"))

    if COMPUTE_STATS:
        mx = tl.max(x, axis=0)
        e = tl.exp(x - mx[None, :])
        lse = mx + tl.log(tl.sum(e, axis=0))
        if WRITE_STATS:
            tl.store(stats_ptr + p, lse, mask=pmask)
    else:
        lse = tl.load(stats_ptr + p, mask=pmask, other=0.0)

    zero = tl.zeros([BLOCK_P], dtype=ACC)
    loss = zero
    wsum = zero
    F = zero  # eps = 0: F_k of the docstring
    lse_prev = lse
    A = zero  # eps > 0: A and B_k
    B = zero
    sel_r = tl.full([BLOCK_C, BLOCK_P], float("inf"), ACC)  # lse_{d_j} (inf: in no group)
    sel_f = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)  # F_{d_j} or B_{d_j}
    for d in tl.static_range(D):
        g_c = tl.load(lg_ptr + d * L + c, mask=cmask, other=-1)
        g_y = tl.load(lg_ptr + d * L + y, mask=pmask, other=0)
        in_g = g_c[:, None] == g_y[None, :]
        w_d = tl.load(w_ptr + d).to(ACC)
        if COMPUTE_STATS:
            # One exp per element serves every level: the group sums of e^{z - max}. Where a group
            # sits so far below the pixel's max that its terms underflow (sum < TINY), redo that
            # pixel with the group's own max; a whole block takes the branch or skips it.
            s_d = tl.sum(tl.where(in_g, e, 0.0), axis=0)
            lse_d = mx + tl.log(tl.maximum(s_d, TINY))
            far = s_d < TINY
            if tl.sum(far.to(tl.int32), axis=0) > 0:  # sm90: cold
                xg = tl.where(in_g, x, float("-inf"))
                mg = tl.max(xg, axis=0)  # finite: y is in its own group
                lse_d = tl.where(far, mg + tl.log(tl.sum(tl.exp(xg - mg[None, :]), axis=0)), lse_d)
            if WRITE_STATS:
                tl.store(stats_ptr + (d + 1) * P64 + p, lse_d, mask=pmask)
        else:
            lse_d = tl.load(stats_ptr + (d + 1) * P64 + p, mask=pmask, other=0.0)
        if LOSS_MODE != 0:
            if HAS_EPS:
                loss += -w_d * tl.log(tl.exp(lse_d - lse) + eps)
            else:
                loss += w_d * (lse - lse_d)
        if GRAD_MODE != 0:
            # Levels go from shallow to deep and the groups are nested, so the last level that
            # claims element j is d_j.
            if HAS_EPS:
                P_d = tl.exp(lse_d - lse)
                A += w_d * P_d / (P_d + eps)
                B += w_d / (P_d + eps)
                sel_f = tl.where(in_g, B[None, :], sel_f)
            else:
                F = tl.exp(lse_d - lse_prev) * F + w_d
                lse_prev = lse_d
                wsum += w_d
                sel_r = tl.where(in_g, lse_d[None, :], sel_r)
                sel_f = tl.where(in_g, F[None, :], sel_f)

    C.store_loss(loss, valid, bad, p, pmask, pid, loss_ptr, part_ptr, cnt_ptr, LOSS_MODE)

    if GRAD_MODE != 0:
        prob = tl.exp(x - lse[None, :])
        if HAS_EPS:
            grad = prob * (A[None, :] - sel_f)
        else:
            grad = wsum[None, :] * prob - tl.exp(x - sel_r) * sel_f
        g_off = n[None, :] * sgn + c[:, None].to(tl.int64) * sgc + (h * sgh + w * sgw)[None, :]
        C.store_grad(grad, g_ptr + g_off, go_ptr, n * son + h * soh + w * sow, valid, bad, pmask, mask2, GRAD_MODE)


# A group sum of e^{z - max} below TINY may have lost terms to underflow (float32 normals end at 1e-38,
# so terms 1e-18 below the largest one are still exact; float64 ends at 1e-308).
_TINY = {torch.float32: 1e-20, torch.float64: 1e-200}


def _launch(logits, target, leaf_group, level_w, eps, ignore_index, *, stats, compute_stats, write_stats,
            loss_mode, loss=None, grad=None, grad_out=None, grad_mode=C.GRAD_NONE):
    """Runs ``_hierarchical_softmax_kernel`` once; returns (partials, counts) when ``loss_mode`` is LOSS_PARTIALS."""
    return C.launch_loss_kernel(
        _hierarchical_softmax_kernel, logits, target, (leaf_group, level_w, stats), (float(eps), int(ignore_index)),
        loss_mode=loss_mode, loss=loss, grad=grad, grad_out=grad_out, grad_mode=grad_mode,
        L=logits.shape[1], D=leaf_group.shape[0], HAS_EPS=eps > 0, COMPUTE_STATS=compute_stats,
        WRITE_STATS=write_stats, TINY=_TINY[C.acc_dtype(logits.dtype)],
    )


# ----------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("hss_triton::hierarchical_softmax_fwd", mutates_args=())
def _hierarchical_softmax_fwd(logits: torch.Tensor, target: torch.Tensor, leaf_group: torch.Tensor, level_w: torch.Tensor,
             eps: float, ignore_index: int, reduction: str, single_pass: bool
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (loss, statistics (D+1, P) (empty if single_pass), count of non-ignored pixels,
    gradient (empty unless single_pass))."""
    N, L, H, W = logits.shape
    D = leaf_group.shape[0]
    acc = C.acc_dtype(logits.dtype)
    P = N * H * W
    dev = logits.device
    # The single pass needs no statistics: it returns an empty tensor in their place.
    stats = torch.empty((0, P) if single_pass else (D + 1, P), dtype=acc, device=dev)
    grad = torch.empty_like(logits) if single_pass else logits.new_empty((0,))
    kw = dict(stats=stats, compute_stats=True, write_stats=not single_pass)
    if single_pass:
        count = (target != ignore_index).sum()
        scale = C.grad_scale(torch.ones((), dtype=acc, device=dev), count, reduction, acc)
        kw.update(grad=grad, grad_out=scale, grad_mode=C.GRAD_SCALAR)
    if reduction == "none":
        loss = torch.empty((N, H, W), dtype=acc, device=dev)
        _launch(logits, target, leaf_group, level_w, eps, ignore_index, loss_mode=C.LOSS_PER_PIXEL,
                loss=loss, **kw)
        count = torch.zeros((), dtype=torch.int64, device=dev)
    else:
        partials, counts = _launch(logits, target, leaf_group, level_w, eps, ignore_index,
                                   loss_mode=C.LOSS_PARTIALS, **kw)
        loss = C.reduce_partials(partials, counts, reduction)
        if not single_pass:
            count = counts.sum(dtype=torch.int64)
    return loss, stats, count, grad


@_hierarchical_softmax_fwd.register_fake
def _(logits, target, leaf_group, level_w, eps, ignore_index, reduction, single_pass):
    N, L, H, W = logits.shape
    acc = C.acc_dtype(logits.dtype)
    loss = logits.new_empty((N, H, W) if reduction == "none" else (), dtype=acc)
    stats = logits.new_empty((0 if single_pass else leaf_group.shape[0] + 1, N * H * W), dtype=acc)
    count = logits.new_empty((), dtype=torch.int64)
    grad = torch.empty_like(logits) if single_pass else logits.new_empty((0,))
    return loss, stats, count, grad


@torch.library.custom_op("hss_triton::hierarchical_softmax_bwd", mutates_args=())
def _hierarchical_softmax_bwd(grad_out: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, leaf_group: torch.Tensor,
             level_w: torch.Tensor, stats: torch.Tensor, count: torch.Tensor, eps: float, ignore_index: int,
             reduction: str) -> torch.Tensor:
    grad = torch.empty_like(logits)
    go, mode = C.backward_grad_out(grad_out, count, reduction, C.acc_dtype(logits.dtype))
    _launch(logits, target, leaf_group, level_w, eps, ignore_index, stats=stats, compute_stats=False,
            write_stats=False, loss_mode=C.LOSS_NONE, grad=grad, grad_out=go, grad_mode=mode)
    return grad


@_hierarchical_softmax_bwd.register_fake
def _(grad_out, logits, target, leaf_group, level_w, stats, count, eps, ignore_index, reduction):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, leaf_group, level_w, eps, ignore_index, reduction, single_pass = inputs
    loss, stats, count, grad = output
    ctx.opts = (eps, ignore_index, reduction, single_pass)
    if single_pass:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(logits, target, leaf_group, level_w, stats, count)


def _backward(ctx, g_loss, g_stats, g_count, g_grad):
    eps, ignore_index, reduction, single_pass = ctx.opts
    if single_pass:
        (grad,) = ctx.saved_tensors
        # A new tensor: the saved gradient itself is never written to.
        dx = grad * g_loss.to(grad.dtype)
    else:
        logits, target, leaf_group, level_w, stats, count = ctx.saved_tensors
        dx = _hierarchical_softmax_bwd(g_loss, logits, target, leaf_group, level_w, stats, count, eps, ignore_index, reduction)
    return dx, None, None, None, None, None, None, None


_hierarchical_softmax_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------- public
def _tables(tree: Tree, level_weights, dtype, device):
    """(leaf_group, level weights) as the kernel reads them; the weights never take a gradient."""
    if isinstance(level_weights, torch.Tensor):
        level_weights = level_weights.detach()
    return tables.leaf_group(tree, device), tables.level_weight_vector(tree, level_weights, dtype, device)


def hierarchical_softmax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    tree: Tree,
    level_weights: Optional[Sequence[float]] = None,
    eps: float = 0.0,
    ignore_index: int = 255,
    reduction: str = "mean",
    single_pass: bool = False,
) -> torch.Tensor:
    """Hierarchical softmax loss on the Triton backend (see ``hss_kernels.hierarchical_softmax_loss``).

    ``logits``: ``(N, L, H, W)`` float16/bfloat16/float32/float64, any strides (NCHW, channels_last);
    ``target``: ``(N, H, W)`` integer leaf labels or ``ignore_index``. Returns a float32 loss (float64
    for float64 logits): a scalar, or ``(N, H, W)`` for ``reduction="none"``. The gradient comes back
    in the logits' dtype and layout.

    ``single_pass=True`` (``mean``/``sum`` only) writes the gradient during the forward, reading the
    logits once instead of twice; backward then scales the saved gradient by the incoming one (an
    elementwise pass over the gradient: :func:`hierarchical_softmax_loss_and_grad` skips even that).

    Raises ValueError for a non-4-D input or ``single_pass`` with ``reduction="none"``.
    """
    C.check_call(logits, target, reduction, single_pass, "L")
    acc = C.acc_dtype(logits.dtype)
    leaf_group, level_w = _tables(tree, level_weights, acc, logits.device)
    loss, _, _, _ = _hierarchical_softmax_fwd(logits, target, leaf_group, level_w, float(eps), int(ignore_index), reduction,
                             bool(single_pass))
    return loss


def hierarchical_softmax_loss_and_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    tree: Tree,
    level_weights: Optional[Sequence[float]] = None,
    eps: float = 0.0,
    ignore_index: int = 255,
    reduction: str = "mean",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, d loss / d logits)`` in one pass over the logits, outside autograd (docs/MATH.md §5.6).

    The fewest bytes a training step can move: read the logits once, write the gradient once. Use it
    as ``loss, g = ...(logits.detach(), ...)`` then ``logits.backward(g)``. ``reduction``: ``mean`` or
    ``sum``. Same arguments, dtypes and errors as :func:`hierarchical_softmax_loss`.
    """
    C.check_call(logits, target, reduction, True, "L")
    acc = C.acc_dtype(logits.dtype)
    leaf_group, level_w = _tables(tree, level_weights, acc, logits.device)
    with torch.no_grad():
        loss, _, _, grad = _hierarchical_softmax_fwd(logits.detach(), target, leaf_group, level_w, float(eps), int(ignore_index),
                                    reduction, True)
    return loss, grad
