"""Hierarchical decoding in Triton (docs/MATH.md §4.3): the best root-to-leaf path per pixel.

For node logits ``x`` (V channels) a leaf's path score is ``sum_{d} a[path_nodes[l, d]]`` (divided by
the path length for ``score="mean"``), with ``a = sigmoid(x)`` or the softmax over all V channels; the
prediction is the leaf with the highest score, ties going to the lowest leaf id. Leaf logits are the
same computation on a flat tree (one node per leaf, no activation): the argmax. A pixel with a NaN among its
logits gets ``ignore_index`` (its NaN reaches a leaf score, and the best score is a NaN-propagating max).

``_decode_kernel`` has the tree compiled in, as the tree-min kernel does (``_tree``; docs/MATH.md §3.10):
the channels in pre-order, their depths and leaf ids are constexpr tuples, so a pixel's work is one
straight-line step per node. Walking the pre-order, each node's path score is its parent's plus its own
activation (root side first, the order every backend sums in, so leaves with equal activations along
equal-length paths tie exactly), one running sum per depth; a leaf compares its score with the best so
far. The softmax first streams over the channels for the running max and sum of exponentials. A program
takes BLOCK_P pixels, a few consecutive ones per thread on NCHW logits; nothing of size N×L×P or N×V×P
is ever written.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import triton
import triton.language as tl

from .. import tables
from ..tree import Tree
from . import _common
from . import _tree as T
from . import hierarchical_softmax as HS  # the fused upsampling's tables (_up_tables)

__all__ = ["decode"]

_ACT = {"sigmoid": 0, "softmax": 1}
_IDENTITY = 2  # leaf logits: the score is the logit itself
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _activate(x, m, rz, ACT: tl.constexpr, FAST: tl.constexpr):
    """a(x): sigmoid(x) (ACT 0), exp(x − m) / z (ACT 1, rz = 1 / z when FAST, else z) or x itself (ACT 2).
    FAST: the GPU's ex2 and rcp approximations (float32 math, compiled); the sigmoid is then
    rcp(1 + 2^(−x·log2 e)), where 2^(...) overflows to +inf below x = −88.7 and rcp(inf) = 0, the flushed
    value of the true one (below 2^-126): three instructions and two of them MUFU. Else exp(−|x|), which
    never overflows."""
    if ACT == 0:
        if FAST:
            return _common.mufu(1.0 + _common.exp2(x * (-LOG2E), FAST), "rcp", FAST)
        else:
            e = tl.exp(-tl.abs(x))
            return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    elif ACT == 1:
        if FAST:
            return _common.exp2((x - m) * LOG2E, FAST) * rz
        else:
            return tl.exp(x - m) / rz
    else:
        return x


@triton.jit
def _load_nodes_up(xi, u00, u01, u10, u11, wx0, lx, wy0, ly, sc64, CH, V: tl.constexpr, start: tl.constexpr,
                   G: tl.constexpr, ACC: tl.constexpr):
    """:func:`_tree.load_group` of upsampled logits: the G nodes' values interpolated at the program's pixels
    from their stencils in the image at scalar pointer xi (offsets u00 .. u11 within it, column weights
    wx0 = 1 - lx, lx, row weights wy0 = 1 - ly, ly), as a tuple of pixel vectors: one [pixels, G] tile per
    stencil corner (:func:`_common.lerp_tile`; the channels compiled in), split; steps past the last node are
    not loaded.

    Tiles, not one [pixels] load per node and corner: Triton's coalescing pass (TritonGPUCoalesce) takes, for
    every memory op, the whole def-use slice around it (here the kernel), so its time grows with memory ops ×
    operations; per node it took 86 s of a Vistas 2.0 float32 variant's compile here (99 % of it), tiled 8-19 s,
    the compiled code within 1 % (docs/MATH.md §6.4)."""
    xc = xi + T.group_channels(CH, V, start, G, False).to(tl.int64) * sc64
    if start + G <= V:
        t = _common.lerp_tile(xc, u00, u01, u10, u11, wx0, lx, wy0, ly, ACC)
    else:
        t = _common.lerp_tile(xc, u00, u01, u10, u11, wx0, lx, wy0, ly, ACC, tl.arange(0, G) < V - start)
    return T.unpack(t, G)


@triton.jit
def _up_softmax_run(xk, sc64, m, z, u00, u01, u10, u11, wx0, lx, wy0, ly, K: tl.constexpr, G: tl.constexpr,
                    ACC: tl.constexpr, FAST: tl.constexpr):
    """K <= G consecutive channels (the first at scalar pointer xk, one [pixels, G] tile per stencil corner:
    :func:`_common.lerp_tile`) of the upsampled softmax's online max m and sum z (one rescale per run,
    NaN-propagating maxima, as at the labels' size); returns them and the pointer past the run."""
    c = tl.arange(0, G)
    xc = xk + c.to(tl.int64) * sc64
    if K == G:
        t = _common.lerp_tile(xc, u00, u01, u10, u11, wx0, lx, wy0, ly, ACC)
    else:
        t = _common.lerp_tile(xc, u00, u01, u10, u11, wx0, lx, wy0, ly, ACC, c < K)
    xs = T.unpack(t, G)
    gm = xs[0]
    for i in tl.static_range(1, K):
        gm = tl.maximum(gm, xs[i], propagate_nan=tl.PropagateNan.ALL)
    m_new = tl.maximum(m, gm, propagate_nan=tl.PropagateNan.ALL)
    s = tl.zeros_like(m)
    for i in tl.static_range(K):
        s += _common.exp2((xs[i] - m_new) * LOG2E, FAST)
    return m_new, z * _common.exp2((m - m_new) * LOG2E, FAST) + s, xk + K * sc64


@triton.jit
def _decode_kernel(
    x_ptr, out_ptr, ui_ptr, ul_ptr,
    P, HW, W,
    s_n, s_c, s_h, s_w,
    IGNORE,
    V: tl.constexpr, CH: tl.constexpr, DEP: tl.constexpr, LID: tl.constexpr, D: tl.constexpr,
    ORDERED: tl.constexpr, ACT: tl.constexpr, MEAN: tl.constexpr, ACC: tl.constexpr,
    BLOCK_P: tl.constexpr, FLAT: tl.constexpr, FAST: tl.constexpr, G: tl.constexpr, PIN: tl.constexpr,
    VEC: tl.constexpr, UPSAMPLE: tl.constexpr, OFF64: tl.constexpr = False, SXC: tl.constexpr = 0,
):
    # CH, DEP, LID: per pre-order position the node's channel, depth (1 = a child of the root) and leaf id
    # (-1: an internal node). ORDERED: the leaf ids increase along the pre-order, so a strict > keeps the
    # lowest id of a tie; else a tie compares the ids.
    # The output is (N, H, W) contiguous: pixel p is at p, whatever the logits' layout. IGNORE: the label of a
    # pixel with a NaN among its V logits, flagged without a test per channel: the softmax's max `m` is
    # NaN-propagating, NaN exactly when a logit is (±inf are not NaN); with the sigmoid (or the identity of
    # leaf logits, a flat walk) a NaN logit makes its node's activation NaN, so the path score of every leaf
    # at or below the node (there is one; ±inf logits have finite sigmoids), and `best` is a NaN-propagating
    # max of the leaf scores. (The softmax's leaf scores may be NaN without a NaN logit, +inf - +inf: there
    # `best` keeps the select, as the native kernels do.)
    # UPSAMPLE (1-D grid, programs within one image each: _common.up_image_pixels; OFF64: 64-bit offsets within
    # an image; SXC > 0: the channel stride, compiled in: _common.up_sxc): P, HW and W are the output's; every
    # logit of a pixel is the interpolation of its 2x2 stencil in the low-resolution logits (ui_ptr, ul_ptr: the
    # per-axis tables of the hierarchical softmax's fused forward; docs/MATH.md §6.4).
    if UPSAMPLE:
        pid, n, p, pmask, h, w = _common.up_image_pixels(P, HW, W, BLOCK_P)
        u00, u01, u10, u11, lx, ly = _common.up_stencil(ui_ptr, ul_ptr, h, w, HW // W, W, s_h, s_w, OFF64)
        xi = x_ptr + n * s_n  # the image's logits
        wx0 = 1.0 - lx
        wy0 = 1.0 - ly
    else:
        pid, p, pmask, xpix, _, _, _ = _common.pixel_offsets(P, HW, W, s_n, s_h, s_w, s_n, s_h, s_w, s_n, s_h, s_w,
                                                            s_n, s_h, s_w, BLOCK_P, FLAT, VEC)
    sc64 = _common.channel_stride64(s_c, SXC if UPSAMPLE else 0)
    zero = tl.zeros([BLOCK_P], dtype=ACC)

    # Softmax over all V channels: the max m and z = sum exp(x - m) first, online over runs of G channels
    # in channel order (one rescale per run). A loop, not the unrolled tree: unrolled, the compiler hoists
    # the loads of later runs and spills.
    m = zero
    rz = zero + 1.0
    if ACT == 1:
        m = zero - float("inf")
        z = zero
        if UPSAMPLE:
            # Runs of G channels unmasked (every pixel's stencil is in range), the last V % G after them.
            xk = xi
            for c0 in range(0, V - V % G, G):  # sm90: trips=V // G
                m, z, xk = _up_softmax_run(xk, sc64, m, z, u00, u01, u10, u11, wx0, lx, wy0, ly, G, G, ACC, FAST)
            if V % G > 0:
                m, z, xk = _up_softmax_run(xk, sc64, m, z, u00, u01, u10, u11, wx0, lx, wy0, ly, V % G, G, ACC,
                                            FAST)
        else:
            for c0 in range(0, V, G):  # sm90: trips=cdiv(V, G)
                c = c0 + tl.arange(0, G)
                t = tl.load(x_ptr + xpix[:, None] + c.to(tl.int64)[None, :] * sc64,  # sm90: logits
                            mask=pmask[:, None] & (c < V)[None, :], other=0.0).to(ACC)
                xs = T.unpack(tl.where((c < V)[None, :], t, float("-inf")), G)
                gm = xs[0]
                for i in tl.static_range(1, G):
                    gm = tl.maximum(gm, xs[i], propagate_nan=tl.PropagateNan.ALL)
                m_new = tl.maximum(m, gm, propagate_nan=tl.PropagateNan.ALL)
                s = zero
                for i in tl.static_range(G):
                    s += _common.exp2((xs[i] - m_new) * LOG2E, FAST)
                z = z * _common.exp2((m - m_new) * LOG2E, FAST) + s
                m = m_new
        # masked pixels loaded 0 everywhere: finite m, z = V
        if FAST:
            rz = _common.mufu(z, "rcp", FAST)
        else:
            rz = z

    # Pre-order: a node's path score is its parent's (element d - 2 of `run`) plus its activation.
    run = ()
    for d in tl.static_range(D):
        run = run + (zero,)
    best = zero - float("inf")
    best_l = tl.zeros([BLOCK_P], dtype=tl.int32)
    for i in tl.static_range(V):
        if i % G == 0:
            if PIN and i > 0:
                run = T.pin_all(run, PIN)
                best = T.pin(best, PIN)
                best_l = T.pin(best_l, PIN)
            if UPSAMPLE:
                xs = _load_nodes_up(xi, u00, u01, u10, u11, wx0, lx, wy0, ly, sc64, CH, V, i, G, ACC)
            else:
                xs = T.load_group(x_ptr, xpix, sc64, pmask, CH, V, i, G, False, ACC, ACT == 1)
        xv = xs[i % G]
        a = _activate(xv, m, rz, ACT, FAST)
        if DEP[i] == 1:
            s = a
        else:
            s = run[DEP[i] - 2] + a
        if LID[i] < 0:
            run = T.replace(run, DEP[i] - 1, s)
        else:
            if MEAN:
                s = s / DEP[i]
            if ORDERED:
                take = s > best
            else:
                take = (s > best) | ((s == best) & (best_l > LID[i]))
            if ACT == 1:
                best = tl.where(take, s, best)
            else:  # the same value as the select, or NaN
                best = tl.maximum(best, s, propagate_nan=tl.PropagateNan.ALL)
            best_l = tl.where(take, LID[i], best_l)
    if ACT == 1:
        bad = m != m
    else:
        bad = best != best
    lab = tl.where(bad, tl.zeros([BLOCK_P], dtype=tl.int64) + IGNORE, best_l.to(tl.int64))
    if UPSAMPLE:
        # The labels' offsets through pin: their contiguity hidden, the store takes one pixel per thread and
        # the program's [pixels] layout is the one of the [pixels, G] stencil tiles (whose gathered loads have
        # no contiguity), no conversion between them.
        tl.store(out_ptr + T.pin(p, PIN), lab, mask=pmask)
    else:
        tl.store(out_ptr + p, lab, mask=pmask)


def decode(logits: torch.Tensor, tree: Tree, activation: str = "sigmoid", score: str = "sum",
           size: Optional[Sequence[int]] = None, align_corners: bool = False, ignore_index: int = 255) -> torch.Tensor:
    """Leaf label of the best root-to-leaf path per pixel, as :func:`hss_kernels.reference.decode`.

    Args:
        logits: ``(N, C, H, W)``, any strides (NCHW, channels_last, views), float16/bfloat16/float32
            (computed in float32) or float64 (computed in float64). ``C = V`` node logits, or ``C = L``
            (``!= V``) leaf logits, decoded by argmax.
        activation: ``"sigmoid"`` or ``"softmax"`` (over all node channels); score: ``"sum"`` or ``"mean"``
            over the path. Both are ignored for leaf logits. The public API checks them and the channels.
        size: ``(H', W')`` at least ``(H, W)``: the labels of the logits bilinearly upsampled to that size
            (``align_corners`` as in ``F.interpolate``), fused: each logit is interpolated from its 2x2 stencil
            in the accumulation dtype as the kernel reads it; the upsampled logits are never stored.
        ignore_index: the label of a pixel with a NaN among its (upsampled) logits.
    Returns:
        int64 ``(N, H, W)`` (``(N, H', W')`` with ``size``). Ties go to the lowest leaf id.
    Raises:
        ValueError for logits that are not 4-D, or a size smaller than the logits'.
    """
    if logits.dim() != 4:
        raise ValueError(f"decode: the Triton backend takes (N, C, H, W) logits, got {tuple(logits.shape)}")
    up = [] if size is None else [int(v) for v in size]
    if up and (len(up) != 2 or up[0] < logits.shape[2] or up[1] < logits.shape[3] or min(logits.shape[2:]) < 1):
        raise ValueError(f"decode: size must be (H, W) at least the logits' {tuple(logits.shape[2:])} (and those "
                         f">= 1), got {tuple(up)}")
    leaf_logits = logits.shape[1] == tree.num_leaves != tree.num_nodes
    act = _IDENTITY if leaf_logits else _ACT[activation]
    return _decode(logits.detach(), _walk(tree, leaf_logits), act, score == "mean" and not leaf_logits,
                   int(ignore_index), up, bool(align_corners))


decode.takes_upsample = True  # functional.decode passes size= / align_corners= through


def _walk(tree: Tree, leaf_logits: bool) -> List[int]:
    """The ``walk`` argument of the op: the rows of :func:`hss_kernels.tables.decode_walk_rows` (channels in
    pre-order, depths, leaf ids) concatenated, 3·V ints."""
    return tree.cached(("triton_decode_walk", bool(leaf_logits)),
                       lambda: [v for row in tables.decode_walk_rows(tree, leaf_logits) for v in row])


def _compiled_walk(walk: List[int]):
    """(V, CH, DEP, LID, D, ORDERED): the kernel's constexprs from ``walk``."""
    V = len(walk) // 3
    ch, dep, lid = tuple(walk[:V]), tuple(walk[V:2 * V]), tuple(walk[2 * V:])
    leaves = [l for l in lid if l >= 0]
    return V, ch, dep, lid, max(dep), leaves == sorted(leaves)


# Bytes of consecutive pixels per thread on NCHW logits: 128-bit loads (4 float32 or 8 bfloat16 pixels).
VECTOR_BYTES = 16


def gpu_blocks(logits: torch.Tensor):
    """(BLOCK_P, num_warps, VEC) of a compiled launch: VEC consecutive pixels per thread on NCHW logits, one
    per thread on channels_last (where a pixel's G channels are the contiguous ones)."""
    if logits.shape[1] > 1 and logits.stride(1) == 1:
        return 128, 4, 1
    vec = VECTOR_BYTES // logits.element_size()
    return vec * 32 * 4, 4, vec


def _blocks(logits: torch.Tensor):
    """(BLOCK_P, num_warps, VEC): :func:`gpu_blocks` when compiled; under the interpreter, which pays per
    program and per operation, ``_common.interpreter_pixels`` pixels."""
    if _common.interpreted(logits.device):
        return _common.interpreter_pixels(_common.shape_args(logits)[0]), 4, 1
    return gpu_blocks(logits)


def _up_blocks(logits: torch.Tensor, pixels: int):
    """:func:`_blocks` of the fused upsampling over ``pixels`` output pixels: compiled, two pixels per thread
    (every value is four gathered loads; the two share each node's scalar channel pointer)."""
    if _common.interpreted(logits.device):
        return _common.interpreter_pixels(pixels), 4, 1
    return 256, 4, 1


# A custom op, so that torch.compile(fullgraph=True) traces decode without a graph break.
@torch.library.custom_op("hss_triton::decode", mutates_args=())
def _decode(logits: torch.Tensor, walk: List[int], act: int, mean: bool, ignore_index: int, size: List[int],
            align_corners: bool) -> torch.Tensor:
    N, C, h, w = logits.shape
    H, W = size if len(size) else (h, w)
    out = torch.empty((N, H, W), dtype=torch.int64, device=logits.device)
    P = N * H * W
    if P == 0:
        return out
    V, ch, dep, lid, D, ordered = _compiled_walk(walk)
    if V != C:
        raise ValueError(f"decode: the walk has {V} nodes, the logits {C} channels")
    upsample = len(size) > 0
    block_p, num_warps, vec = _up_blocks(logits, P) if upsample else _blocks(logits)
    if upsample:
        idx, lam = HS._up_tables(h, w, H, W, bool(align_corners), _common.acc_dtype(logits.dtype),
                                 logits.device)[:2]
        flat, HW, Wd = False, H * W, W
    else:
        idx = lam = out  # not read
        flat = _common.flat_pixels(logits)
        _, HW, Wd = _common.shape_args(logits)
    if upsample:
        grid = _common.up_grid(out, block_p)
    else:
        grid = (triton.cdiv(HW, block_p), N) if flat else (triton.cdiv(P, block_p),)
    fast = _common.fast_exp(logits)
    _common.launch(
        _decode_kernel, grid, logits,
        logits, out, idx, lam,
        P, HW, Wd,
        *logits.stride(),
        ignore_index,
        V=V, CH=ch, DEP=dep, LID=lid, D=D, ORDERED=ordered, ACT=act, MEAN=mean, ACC=_common.tl_acc(logits.dtype),
        BLOCK_P=block_p, FLAT=flat, FAST=fast, G=T.GROUP, PIN=not _common.interpreted(logits.device), VEC=vec,
        UPSAMPLE=upsample, OFF64=upsample and _common.up_off64(logits),
        SXC=_common.up_sxc(logits) if upsample else 0, num_warps=num_warps,
    )
    return out


@_decode.register_fake
def _(logits, walk, act, mean, ignore_index, size, align_corners):
    H, W = size if len(size) else logits.shape[2:]
    return logits.new_empty((logits.shape[0], H, W), dtype=torch.int64)
