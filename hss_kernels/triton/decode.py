"""Hierarchical decoding in Triton (MATH.md §4): the best root-to-leaf path per pixel.

For node logits ``x`` (V channels) a leaf's path score is ``sum_{d} a[path_nodes[l, d]]`` (divided by
the path length for ``score="mean"``), with ``a = sigmoid(x)`` or the softmax over all V channels; the
prediction is the leaf with the highest score, ties going to the lowest leaf id. Leaf logits are the
same computation with a one-node path per leaf and no activation: the argmax.

C, L and D are compile-time constants (one compilation per tree; the interpreter cannot loop to a
runtime bound under NumPy 2). One program takes ``BLOCK_P`` pixels: a softmax first streams over the channels for the running max and
sum of exponentials; then each chunk of ``BLOCK_L`` leaves gathers its path nodes' logits (one load per
depth, from cache after the first touch) and the running best leaf is kept with a strict ``>`` so that
the earliest, lowest leaf id wins ties. Nothing of size N×L×P or N×V×P is ever written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..tree import Tree
from . import _common

__all__ = ["decode"]

_ACT = {"sigmoid": 0, "softmax": 1}
_IDENTITY = 2  # leaf logits: the score is the logit itself


@triton.jit
def _decode_kernel(
    x_ptr, out_ptr, path_ptr, plen_ptr,
    total, HW, W,
    s_n, s_c, s_h, s_w,
    C: tl.constexpr, L: tl.constexpr, D: tl.constexpr, ACT: tl.constexpr, MEAN: tl.constexpr, F64: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
):
    acc_t = tl.float64 if F64 else tl.float32
    q = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    p_ok = q < total
    n = q // HW
    r = q % HW
    pix = n * s_n + (r // W) * s_h + (r % W) * s_w  # element offset of channel 0 of each pixel

    # Softmax over all V channels needs the max m and z = sum exp(x - m) first (online, chunked).
    m = tl.full((BLOCK_P,), float("-inf"), acc_t)
    z = tl.zeros((BLOCK_P,), acc_t)
    if ACT == 1:
        for c0 in range(0, C, BLOCK_C):  # sm90: trips=cdiv(C, BLOCK_C)
            c = c0 + tl.arange(0, BLOCK_C)
            c_ok = c < C
            # Pixels past the end load 0 (not -inf) so that m stays finite and no NaN appears.
            xc = tl.load(x_ptr + c.to(tl.int64)[:, None] * s_c + pix[None, :], mask=c_ok[:, None] & p_ok[None, :],  # sm90: logits
                         other=0.0).to(acc_t)
            xc = tl.where(c_ok[:, None], xc, float("-inf"))
            m_new = tl.maximum(m, tl.max(xc, axis=0))
            z = z * tl.exp(m - m_new) + tl.sum(tl.exp(xc - m_new[None, :]), axis=0)
            m = m_new

    best = tl.full((BLOCK_P,), float("-inf"), acc_t)
    best_l = tl.zeros((BLOCK_P,), tl.int64)
    for l0 in range(0, L, BLOCK_L):  # sm90: trips=cdiv(L, BLOCK_L)
        leaf = l0 + tl.arange(0, BLOCK_L)
        l_ok = leaf < L
        s = tl.zeros((BLOCK_L, BLOCK_P), acc_t)
        # score[l] = sum over the path's nodes, root side first (every backend sums in this order, so
        # leaves with equal activations along equal-length paths tie exactly).
        for d in tl.static_range(D):
            node = tl.load(path_ptr + leaf * D + d, mask=l_ok, other=-1)
            on = node >= 0
            xv = tl.load(x_ptr + node.to(tl.int64)[:, None] * s_c + pix[None, :], mask=on[:, None] & p_ok[None, :],  # sm90: logits
                         other=0.0).to(acc_t)
            if ACT == 0:
                e = tl.exp(-tl.abs(xv))  # never overflows
                a = tl.where(xv >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
            elif ACT == 1:
                a = tl.exp(xv - m[None, :]) / z[None, :]
            else:
                a = xv
            s += tl.where(on[:, None], a, 0.0)
        if MEAN:
            s = s / tl.load(plen_ptr + leaf, mask=l_ok, other=1).to(acc_t)[:, None]
        s = tl.where(l_ok[:, None], s, float("-inf"))
        chunk_best = tl.max(s, axis=0)
        # first (lowest) leaf reaching the chunk's max; tl.argmax's tie rule is not relied upon
        is_max = (s == chunk_best[None, :]) & l_ok[:, None]
        chunk_l = tl.min(tl.where(is_max, leaf[:, None], 2147483647), axis=0).to(tl.int64)
        take = (chunk_best > best) | (l0 == 0)  # strict: an earlier chunk keeps its tie
        best_l = tl.where(take, chunk_l, best_l)
        best = tl.where(take, chunk_best, best)
    tl.store(out_ptr + q, best_l, mask=p_ok)


def _tables(tree: Tree, device, leaf_logits: bool):
    """(L, D') int32 path table (-1 padded) and (L,) int32 path lengths, cached on the tree per device."""
    def build():
        if leaf_logits:
            path = torch.arange(tree.num_leaves, dtype=torch.int32, device=device)[:, None]
        else:
            path = tree.tables(device).path_nodes.contiguous()
        return path, (path >= 0).sum(dim=1).to(torch.int32)
    return _common.tree_cache(tree, ("decode_path", str(device), leaf_logits), build)


def _blocks(C: int, L: int, total: int, interpret: bool):
    """Tile sizes and warps. On a GPU a (32 x 64) tile over 8 warps keeps every variant (float64 and the
    softmax included) under 220 registers without spills on sm_90 (checked with ptxas); 128-leaf tiles
    spill. The interpreter pays per program instead, so it gets tiles as large as NumPy likes."""
    if interpret:
        BLOCK_L = min(triton.next_power_of_2(L), 128)
        BLOCK_C = min(triton.next_power_of_2(C), 128)
        BLOCK_P = max(16, min((1 << 17) // BLOCK_L, 1024, triton.next_power_of_2(total)))
        return BLOCK_C, BLOCK_L, BLOCK_P, 4
    BLOCK_L = min(triton.next_power_of_2(L), 32)
    BLOCK_C = min(triton.next_power_of_2(C), 32)
    return BLOCK_C, BLOCK_L, 64, 8


def decode(logits: torch.Tensor, tree: Tree, activation: str = "sigmoid", score: str = "sum") -> torch.Tensor:
    """Leaf label of the best root-to-leaf path per pixel, as :func:`hss_kernels.reference.decode`.

    Args:
        logits: ``(N, C, H, W)``, any strides (NCHW, channels_last, views), float16/bfloat16/float32
            (computed in float32) or float64 (computed in float64). ``C = V`` node logits, or ``C = L``
            (``!= V``) leaf logits, decoded by argmax.
        activation: ``"sigmoid"`` or ``"softmax"`` (over all node channels); score: ``"sum"`` or ``"mean"``
            over the path. Both are ignored for leaf logits.
    Returns:
        int64 ``(N, H, W)``. Ties go to the lowest leaf id.
    Raises:
        ValueError on a bad shape, channel count or option; TypeError on a non-float dtype.
    """
    if activation not in _ACT:
        raise ValueError(f"decode: activation must be 'sigmoid' or 'softmax', got {activation!r}")
    if score not in ("sum", "mean"):
        raise ValueError(f"decode: score must be 'sum' or 'mean', got {score!r}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"decode: logits must be a float tensor, got {logits.dtype}")
    if logits.dim() != 4:
        raise ValueError(f"decode: logits must be (N, C, H, W), got {tuple(logits.shape)}")
    N, C, H, W = logits.shape
    V, L = tree.num_nodes, tree.num_leaves
    leaf_logits = C == L and C != V
    if C != V and not leaf_logits:
        raise ValueError(f"decode: logits have {C} channels; the tree has {V} nodes and {L} leaves")
    path, plen = _tables(tree, logits.device, leaf_logits)
    act = _IDENTITY if leaf_logits else _ACT[activation]
    return _decode_op(logits, path, plen, act, score == "mean" and not leaf_logits)


# A custom op, so that torch.compile(fullgraph=True) traces decode without a graph break.
@torch.library.custom_op("hss_triton::decode", mutates_args=())
def _decode_op(logits: torch.Tensor, path: torch.Tensor, plen: torch.Tensor, act: int, mean: bool) -> torch.Tensor:
    N, C, H, W = logits.shape
    out = torch.empty((N, H, W), dtype=torch.int64, device=logits.device)
    total = N * H * W
    if total == 0:
        return out
    BLOCK_C, BLOCK_L, BLOCK_P, num_warps = _blocks(C, path.shape[0], total, _common.interpreted(logits.device))
    grid = (triton.cdiv(total, BLOCK_P),)
    _common.launch(
        _decode_kernel, grid, logits,
        logits, out, path, plen,
        total, H * W, W,
        *logits.stride(),
        C=C, L=path.shape[0], D=path.shape[1], ACT=act, MEAN=mean,
        F64=logits.dtype == torch.float64,
        BLOCK_C=BLOCK_C, BLOCK_L=BLOCK_L, BLOCK_P=BLOCK_P, num_warps=num_warps,
    )
    return out


@_decode_op.register_fake
def _(logits, path, plen, act, mean):
    return logits.new_empty((logits.shape[0], logits.shape[2], logits.shape[3]), dtype=torch.int64)
