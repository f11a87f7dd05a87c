"""Hierarchical decoding in Triton (docs/MATH.md §4.3): the best root-to-leaf path per pixel.

For node logits ``x`` (V channels) a leaf's path score is ``sum_{d} a[path_nodes[l, d]]`` (divided by
the path length for ``score="mean"``), with ``a = sigmoid(x)`` or the softmax over all V channels; the
prediction is the leaf with the highest score, ties going to the lowest leaf id. Leaf logits are the
same computation with a one-node path per leaf and no activation: the argmax. The path table is the
native backend's (:func:`hss_kernels.tables.decode_path`).

C, L and D are compile-time constants (one compilation per tree; the interpreter cannot loop to a
runtime bound under NumPy 2). One program takes ``BLOCK_P`` pixels: a softmax first streams over the
channels for the running max and sum of exponentials; then each chunk of ``BLOCK_L`` leaves gathers its
path nodes' logits (one load per depth, from cache after the first touch) and the running best leaf is
kept with a strict ``>`` so that the earliest, lowest leaf id wins ties. Nothing of size N×L×P or
N×V×P is ever written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import tables
from ..tree import Tree
from . import _common

__all__ = ["decode"]

_ACT = {"sigmoid": 0, "softmax": 1}
_IDENTITY = 2  # leaf logits: the score is the logit itself


@triton.jit
def _decode_kernel(
    x_ptr, out_ptr, path_ptr,
    P, HW, W,
    s_n, s_c, s_h, s_w,
    C: tl.constexpr, L: tl.constexpr, D: tl.constexpr, ACT: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
):
    # Not _common.pixel_coords: its (p - n*HW) form costs this kernel 4-8 % more instructions and up to 40
    # more registers on sm_90 (python -m benchmarks.sm90 --op decode) than the // and % pair below.
    q = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = q < P
    n = q // HW
    r = q % HW
    pix = n * s_n + (r // W) * s_h + (r % W) * s_w  # element offset of channel 0 of each pixel

    # Softmax over all V channels needs the max m and z = sum exp(x - m) first (online, chunked).
    m = tl.full((BLOCK_P,), float("-inf"), ACC)
    z = tl.zeros((BLOCK_P,), ACC)
    if ACT == 1:
        for c0 in range(0, C, BLOCK_C):  # sm90: trips=cdiv(C, BLOCK_C)
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            # Pixels past the end load 0 (not -inf) so that m stays finite and no NaN appears.
            xc = tl.load(x_ptr + c.to(tl.int64)[:, None] * s_c + pix[None, :], mask=c_ok[:, None] & p_ok[None, :],  # sm90: logits
                         other=0.0).to(ACC)
            xc = tl.where(c_ok[:, None], xc, float("-inf"))
            m_new = tl.maximum(m, tl.max(xc, axis=0))
            z = z * tl.exp(m - m_new) + tl.sum(tl.exp(xc - m_new[None, :]), axis=0)
            m = m_new

    best = tl.full((BLOCK_P,), float("-inf"), ACC)
    best_l = tl.zeros((BLOCK_P,), tl.int64)
    for l0 in range(0, L, BLOCK_L):  # sm90: trips=cdiv(L, BLOCK_L)
        leaf = l0 + tl.arange(0, BLOCK_L)
        l_ok = leaf < L
        s = tl.zeros((BLOCK_L, BLOCK_P), ACC)
        length = tl.zeros((BLOCK_L,), tl.int32)
        # score[l] = sum over the path's nodes, root side first (every backend sums in this order, so
        # leaves with equal activations along equal-length paths tie exactly).
        for d in tl.static_range(D):
            node = tl.load(path_ptr + leaf * D + d, mask=l_ok, other=-1)
            on = node >= 0
            xv = tl.load(x_ptr + node.to(tl.int64)[:, None] * s_c + pix[None, :], mask=on[:, None] & p_ok[None, :],  # sm90: logits
                         other=0.0).to(ACC)
            if ACT == 0:
                e = tl.exp(-tl.abs(xv))  # never overflows
                a = tl.where(xv >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            elif ACT == 1:
                a = tl.exp(xv - m[None, :]) / z[None, :]
            else:
                a = xv
            s += tl.where(on[:, None], a, 0.0)
            if MEAN:
                length += on.to(tl.int32)
        if MEAN:
            s = s / tl.maximum(length, 1).to(ACC)[:, None]
        s = tl.where(l_ok[:, None], s, float("-inf"))
        chunk_best = tl.max(s, axis=0)
        # first (lowest) leaf reaching the chunk's max; tl.argmax's tie rule is not relied upon
        is_max = (s == chunk_best[None, :]) & l_ok[:, None]
        chunk_l = tl.min(tl.where(is_max, leaf[:, None], 2147483647), axis=0).to(tl.int64)
        take = (chunk_best > best) | (l0 == 0)  # strict: an earlier chunk keeps its tie
        best_l = tl.where(take, chunk_l, best_l)
        best = tl.where(take, chunk_best, best)
    tl.store(out_ptr + q, best_l, mask=p_ok)


def decode(logits: torch.Tensor, tree: Tree, activation: str = "sigmoid", score: str = "sum") -> torch.Tensor:
    """Leaf label of the best root-to-leaf path per pixel, as :func:`hss_kernels.reference.decode`.

    Args:
        logits: ``(N, C, H, W)``, any strides (NCHW, channels_last, views), float16/bfloat16/float32
            (computed in float32) or float64 (computed in float64). ``C = V`` node logits, or ``C = L``
            (``!= V``) leaf logits, decoded by argmax.
        activation: ``"sigmoid"`` or ``"softmax"`` (over all node channels); score: ``"sum"`` or ``"mean"``
            over the path. Both are ignored for leaf logits. The public API checks them and the channels.
    Returns:
        int64 ``(N, H, W)``. Ties go to the lowest leaf id.
    Raises:
        ValueError for logits that are not 4-D.
    """
    if logits.dim() != 4:
        raise ValueError(f"decode: the Triton backend takes (N, C, H, W) logits, got {tuple(logits.shape)}")
    leaf_logits = logits.shape[1] == tree.num_leaves != tree.num_nodes
    path = tables.decode_path(tree, logits.device, leaf_logits)
    act = _IDENTITY if leaf_logits else _ACT[activation]
    return _decode(logits, path, act, score == "mean" and not leaf_logits)


# A custom op, so that torch.compile(fullgraph=True) traces decode without a graph break.
@torch.library.custom_op("hss_triton::decode", mutates_args=())
def _decode(logits: torch.Tensor, path: torch.Tensor, act: int, mean: bool) -> torch.Tensor:
    N, C, H, W = logits.shape
    out = torch.empty((N, H, W), dtype=torch.int64, device=logits.device)
    P, HW, Wd = _common.shape_args(logits)
    if P == 0:
        return out
    L, D = path.shape
    BLOCK_C, BLOCK_L, BLOCK_P, num_warps = _common.decode_block_sizes(C, L, P, _common.interpreted(logits.device))
    _common.launch(
        _decode_kernel, (triton.cdiv(P, BLOCK_P),), logits,
        logits, out, path,
        P, HW, Wd,
        *logits.stride(),
        C=C, L=L, D=D, ACT=act, MEAN=mean, ACC=_common.tl_acc(logits.dtype),
        BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L, BLOCK_P=BLOCK_P, num_warps=num_warps,
    )
    return out


@_decode.register_fake
def _(logits, path, act, mean):
    return logits.new_empty((logits.shape[0], logits.shape[2], logits.shape[3]), dtype=torch.int64)
