"""Focal tree-min loss (docs/MATH.md §3) and the multi-label tree BCE (§4.1) in Triton: one kernel family.

Per pixel with label y, node logits x, target path T(y), focal term f(z) = −σ(−z)^γ log(σ(z) + eps)
and node weights k_v (``tables.node_weight_vector``):

* tree-min (``USE_EXTREMA``): ℓ = Σ_{v ∈ T} k_v f(x_{m_v}) + Σ_{v ∉ T} k_v f(−x_{M_v}), where m_v is the
  argmin over v's ancestors-or-self (a running min down the target path, ties to the shallower node)
  and M_v the argmax over v's descendants-or-self (v itself for a leaf; for an internal node a max over
  its contiguous run in depth-first pre-order, ties to the earliest). Only m_v / M_v get gradient:
  ∂ℓ/∂x_{m_v} += k_v f'(x_{m_v}),  ∂ℓ/∂x_{M_v} −= k_v f'(−x_{M_v}).
* BCE: the same with m_v = M_v = v, so the tree walk is compiled out (no extra cost).

    f'(z) = γ q σ(−z)^γ log(q + eps) − σ(−z)^{γ+1} q / (q + eps),  q = σ(z)

``_tree_min_kernel`` has the tree compiled in (docs/MATH.md §3.10): the pre-order channels, depths, leaf
flags and internal ordinals are constexpr tuples, so a pixel's work is straight-line code, one step per
node, with pixels across threads (consecutive pixels per thread on NCHW: 16 bytes, 128-bit loads) and the logits
of G nodes per load (a [pixels, G] tile; G = 8, 2 in the bfloat16 tree-min forward, 4 in the bfloat16 tree BCE).
The forward walks the nodes bottom-up (reverse pre-order) keeping one running maximum per depth; the gradient adds
a top-down pass that routes each off-path weight to its subtree's argmax, M_v of every internal node kept between
the passes in the node's own element of the gradient on NCHW (``_stashes``: M_v is one of the pixel's logits,
exact in the gradient's dtype, and the top-down pass overwrites the element with the node's gradient), in
registers on channels_last (one pixel per thread). Nothing is saved for the backward: it recomputes the extrema
from the logits (one more read, no argmin/argmax tensor of size P·V). The loss alone of 2-byte NCHW logits at
γ = 2, eps = 0 takes its focal terms two pixels of a thread at a time, one reciprocal for both (``_focal2_pair``,
docs/MATH.md §3.10).

Low-resolution logits (``upsample="bilinear"``, docs/MATH.md §6.4): the forward runs ``_tree_min_kernel`` with
UPSAMPLE over the target's pixels, each node logit the interpolation of the pixel's 2x2 stencil; the backward
runs band by band of full-resolution rows (``_upsample.backward_in_bands``): ``_tree_min_up_rows_kernel``
computes each pixel's gradient row once into a bounded scratch (``_upsample.UP_BWD_SCRATCH_BYTES``; the
tree-min's bottom-up pass keeps each interpolated logit in the pixel's own scratch element until its top-down pass
overwrites it with the gradient),
``_up_gather_kernel`` adds it onto the low-resolution elements in a fixed order (no atomics; partial sums carried
between bands). Neither the full-resolution logits nor their whole gradient is stored.
"""
from __future__ import annotations

import functools
from typing import List, Optional, Tuple

import torch
import triton
import triton.language as tl

from .. import tables
from ..tree import Tree
from . import _common as C
from . import _tree as T
from . import _upsample as U

__all__ = ["tree_min_loss", "tree_bce_loss", "tree_min_loss_and_grad", "tree_bce_loss_and_grad"]


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _focal2(w, gamma, eps, WANT_F: tl.constexpr, WANT_DF: tl.constexpr, GMODE: tl.constexpr,
            HAS_EPS: tl.constexpr, FAST: tl.constexpr):
    """(f(z) / ln 2, f'(z)) at z = −w of the focal term f(z) = −σ(−z)^γ log(σ(z) + eps) (docs/MATH.md §3.2,
    §3.3), with q = σ(z), s = σ(−z) = σ(w) and e = e^{−|w|}: three special functions (ex2, lg2, rcp) for
    γ ∈ {0, 2} and eps = 0, no log of an underflowed 0, no 1 − q. The callers pass w = −z (an off-path
    term's f(−M) is at w = M: no negation). GMODE: 0 for γ = 0, 2 for γ = 2 (products), 1 for any other
    γ (exp2(γ log2 s))."""
    e = C.exp2(tl.abs(w) * (-LOG2E), FAST)
    p = 1.0 + e
    soft = C.mufu(p, "lg2", FAST)  # log2(1 + e)
    r = C.mufu(p, "rcp", FAST)
    er = e * r
    neg = w <= 0  # z >= 0
    s = tl.where(neg, er, r)
    if HAS_EPS:
        q = tl.where(neg, r, er)
        qe = q + eps
        nlt = -C.mufu(qe, "lg2", FAST)  # −log2(q + eps)
        ratio = q * C.mufu(qe, "rcp", FAST)
    else:
        nlt = tl.maximum(w, 0.0) * LOG2E + soft  # −log2 σ(z)
        ratio = 1.0
    if GMODE == 0:
        phi = 1.0
    elif GMODE == 2:
        phi = s * s
    else:
        phi = C.exp2(gamma * (tl.minimum(w, 0.0) * LOG2E - soft), FAST)
    f = w
    df = w
    if WANT_F:
        f = phi * nlt
    if WANT_DF:
        if GMODE == 0:
            df = -s * ratio
        else:
            q = tl.where(neg, r, er)
            df = -phi * ((gamma * LN2) * q * nlt + s * ratio)
    return f, df


# _focal2_pair's clamp of t = z log2 e (z = 43): the product of two 1 + 2^t stays below 2^125 (finite, and in
# _rcp_fma's range); past it a term is below e^-129, 0 in float32 either way.
PAIR_ZMAX = tl.constexpr(43.0 * 1.4426950408889634)


@triton.jit
def _rcp_fma(v):
    """1 / v for float32 v in [1, 2^126) with FMAs only (no special-function instruction): the exponent-flip
    estimate (relative error below 1/8), then two cubic Newton steps r (1 + e + e^2), e = 1 - v r (the error
    cubed by each: below 1e-8, then the steps' rounding)."""
    r = (0x7EF311C3 - v.to(tl.int32, bitcast=True)).to(tl.float32, bitcast=True)
    e = 1.0 - v * r
    r = r + r * (e + e * e)
    e = 1.0 - v * r
    return r + r * (e + e * e)


@triton.jit
def _pair_half(w, FAST: tl.constexpr):
    """(p, log2 p − t) of one term of :func:`_focal2_pair`: t = min(z, 43) log2 e at z = −w (NaN: the clamp's
    value, so a NaN term leaves its pair's other term finite), p = 1 + 2^t."""
    t = -w * LOG2E
    t = tl.where(t < PAIR_ZMAX, t, PAIR_ZMAX)
    p = 1.0 + C.exp2(t, FAST)
    return p, C.mufu(p, "lg2", FAST) - t


@triton.jit
def _pair_rcp(p0, p1, BY_FMA: tl.constexpr, FAST: tl.constexpr):
    """1 / (p0 p1): the MUFU's, or with BY_FMA :func:`_rcp_fma`'s."""
    if BY_FMA:
        return _rcp_fma(p0 * p1)
    else:
        return C.mufu(p0 * p1, "rcp", FAST)


@triton.jit
def _focal2_pair(w0, w1, BY_FMA: tl.constexpr, FAST: tl.constexpr):
    """(f(z0) / ln 2, f(z1) / ln 2) at z = −w (as :func:`_focal2`'s f) of two terms at γ = 2, eps = 0 with one
    reciprocal for both (docs/MATH.md §3.10): with t = min(z, 43) log2 e and p = 1 + 2^t, σ(−z) = 1 / p and
    −log2 σ(z) = log2 p − t, and 1 / p0 = p1 r, 1 / p1 = p0 r from r = 1 / (p0 p1): two special functions
    per term and a half (ex2, lg2, the shared rcp), or two with BY_FMA (r by :func:`_rcp_fma`). The clamp
    keeps p0 p1 finite, and a NaN w's term alone NaN."""
    p0, n0 = _pair_half(w0, FAST)
    p1, n1 = _pair_half(w1, FAST)
    r = _pair_rcp(p0, p1, BY_FMA, FAST)
    s0 = p1 * r
    s1 = p0 * r
    return (s0 * s0) * n0, (s1 * s1) * n1


@triton.jit
def _bind(v, ref, PIN: tl.constexpr):
    """The int32 v computed in the register layout of the float32 ref (PIN; else v itself): one layout
    conversion here instead of one at every node that combines a label-derived value with a logit."""
    if PIN:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r,f", [v, ref], dtype=tl.int32, is_pure=False,
                                         pack=1)
    else:
        return v


@triton.jit
def _path_of(pt_ptr, y, pmask, ref, D: tl.constexpr, PIN: tl.constexpr):
    """The label's path a_d(y) from the table's path rows (pt_ptr; -1 past its leaf) as a tuple, element d - 1 for
    depth d, in the register layout of the logits' vector ref (:func:`_bind`)."""
    path = ()
    for d in tl.static_range(D):
        path = path + (_bind(tl.load(pt_ptr + y * D + d, mask=pmask, other=-1), ref, PIN),)
    return path


@triton.jit
def _grad_scale(go_ptr, opix, pmask, zero, y, p, valid, cw_ptr, pw_ptr, ACC: tl.constexpr, HAS_CW: tl.constexpr,
                HAS_PW: tl.constexpr, GRAD_MODE: tl.constexpr):
    """The pixel's gradient scale: grad_output (one value for GRAD_MODE 1, else per pixel at opix) times the pixel's
    weight w_p (:func:`_common.weigh`)."""
    if GRAD_MODE == 1:
        gsc = zero + tl.load(go_ptr).to(ACC)
    else:
        gsc = tl.load(go_ptr + opix, mask=pmask, other=0.0).to(ACC)
    return C.weigh(gsc, y, p, valid, cw_ptr, pw_ptr, ACC, HAS_CW, HAS_PW)


@triton.jit
def _path_min(x_ptr, k_ptr, xpix, sxc, pmask, path, zero, D: tl.constexpr, WANT_K: tl.constexpr,
              u01, u10, u11, lx, ly, UPSAMPLE: tl.constexpr):
    """(cmin, kpath, xas) over the label's path (tuples, element d - 1 for depth d): the running minimum of the
    path logits (strict <: ties stay with the shallower node; kept negated: the focal takes w = −z), with
    WANT_K the weight each path node receives as the argmin of deeper path nodes (K_u of docs/MATH.md §3.6,
    path side), and the path logits themselves (0 past the leaf). UPSAMPLE: each path logit is the
    interpolation of the pixel's stencil (xpix, u01, u10, u11: its four offsets; lx, ly: the weights)."""
    cmin = ()
    kpath = ()
    xas = ()
    cur = zero
    arg = tl.zeros(zero.shape, dtype=tl.int32)
    for d in tl.static_range(D):
        a = path[d]
        act = pmask & (a >= 0)
        a0 = tl.where(act, a, 0)
        if UPSAMPLE:
            xa = C.lerp(x_ptr + a0.to(tl.int64) * sxc, xpix, u01, u10, u11, lx, ly, act, zero.dtype)
        else:
            xa = tl.load(x_ptr + xpix + a0.to(tl.int64) * sxc, mask=act, other=0.0).to(zero.dtype)
        xas = xas + (xa,)
        if d == 0:
            take = act
        else:
            take = act & (xa < cur)
        cur = tl.where(take, xa, cur)
        cmin = cmin + (-cur,)
        if WANT_K:
            arg = tl.where(take, d, arg)
            ka = tl.load(k_ptr + a0, mask=act, other=0.0).to(zero.dtype)
            kpath = kpath + (zero,)
            for j in tl.static_range(d + 1):
                kpath = T.replace(kpath, j, kpath[j] + tl.where(act & (arg == j), ka, 0.0))
    return cmin, kpath, xas


@triton.jit
def _load_nodes_up(xi, u00, u01, u10, u11, wx0, lx, wy0, ly, sxc64, CH, V: tl.constexpr, start: tl.constexpr,
                   G: tl.constexpr, REV: tl.constexpr, ACC: tl.constexpr, TILE: tl.constexpr = True):
    """The forward's :func:`_tree.load_group` of upsampled logits: the G nodes' values interpolated from each
    pixel's stencil in the image at scalar pointer xi (offsets u00 .. u11 within it, column weights wx0 = 1 - lx,
    lx, row weights wy0 = 1 - ly, ly), as a tuple of pixel vectors: one [pixels, G] tile per stencil corner
    (:func:`_common.lerp_tile`; the channels compiled in), split; steps past the last node are not loaded.
    Tiles rather than one [pixels] load per node and corner for Triton's coalescing pass, whose time grows with
    memory ops × operations (as decode.py's _load_nodes_up). Not TILE: one node at a time (four [pixels] loads,
    steps past the last node repeating its channel), for the tree BCE's forward, where G = 2 tiles cost 5 % more
    instructions by the sm_90 model (float32 NCHW, up 4: 27.9 -> 29.4 SASS/elt)."""
    if TILE:
        return T.unpack(_lerp_nodes_up(xi, u00, u01, u10, u11, wx0, lx, wy0, ly, sxc64, CH, V, start, G, REV, ACC),
                        G)
    else:
        out = ()
        for i in tl.static_range(G):
            if REV:
                if start + i < V:
                    c = CH[V - 1 - start - i]
                else:
                    c = CH[0]
            else:
                if start + i < V:
                    c = CH[start + i]
                else:
                    c = CH[V - 1]
            out = out + (C.lerp_at(xi + c * sxc64, u00, u01, u10, u11, wx0, lx, wy0, ly, ACC),)
        return out


@triton.jit
def _lerp_nodes_up(xi, u00, u01, u10, u11, wx0, lx, wy0, ly, sxc64, CH, V: tl.constexpr, start: tl.constexpr,
                   G: tl.constexpr, REV: tl.constexpr, ACC: tl.constexpr):
    """:func:`_load_nodes_up`'s [pixels, G] tile, not split."""
    xc = xi + T.group_channels(CH, V, start, G, REV).to(tl.int64) * sxc64
    if start + G <= V:
        return C.lerp_tile(xc, u00, u01, u10, u11, wx0, lx, wy0, ly, ACC)
    else:
        return C.lerp_tile(xc, u00, u01, u10, u11, wx0, lx, wy0, ly, ACC, tl.arange(0, G) < V - start)


@triton.jit
def _stash_ptr(g_ptr, gpix, c: tl.constexpr, sgc64, ADDR_PIN: tl.constexpr):
    """The pixels' gradient elements of channel c (STASH), the channel offset from a pinned stride as
    :func:`_tree.channel_offsets` makes it (ADDR_PIN > 0): not derived from the other nodes' addresses."""
    if ADDR_PIN > 0:
        return g_ptr + gpix + tl.multiple_of(T.pin(sgc64, True) * c, ADDR_PIN)
    else:
        return g_ptr + gpix + c * sgc64


@triton.jit
def _tree_min_kernel(
    x_ptr, t_ptr, tab_ptr, k_ptr, ui_ptr, ul_ptr, loss_ptr, part_ptr, cnt_ptr, cw_ptr, pw_ptr, ws_ptr, g_ptr, go_ptr,
    P, HW, W,
    sxn, sxc, sxh, sxw,
    stn, sth, stw,
    sgn, sgc, sgh, sgw,
    son, soh, sow,
    gamma, eps, ignore_index,
    V: tl.constexpr, L: tl.constexpr, D: tl.constexpr,
    CH: tl.constexpr, DEP: tl.constexpr, LEAF: tl.constexpr, IDX: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
    USE_EXTREMA: tl.constexpr, GMODE: tl.constexpr, HAS_EPS: tl.constexpr,
    LOSS_MODE: tl.constexpr, GRAD_MODE: tl.constexpr, FLAT: tl.constexpr, FAST: tl.constexpr,
    G: tl.constexpr, PIN: tl.constexpr, VEC: tl.constexpr, ADDR_PIN: tl.constexpr, UPSAMPLE: tl.constexpr,
    HAS_CW: tl.constexpr, HAS_PW: tl.constexpr, OFF64: tl.constexpr = False,
    ORD: tl.constexpr = 0, WORD: tl.constexpr = 0, SHIFT: tl.constexpr = 0, MASK: tl.constexpr = 0,
    NW: tl.constexpr = 0, GT: tl.constexpr = 8, PAIR: tl.constexpr = -1, STASH: tl.constexpr = False,
    SXC: tl.constexpr = 0,
):
    # The tree is compiled in: CH, DEP, LEAF, IDX are per pre-order position the node's channel, depth
    # (1 = a child of the root), whether it is a leaf and its ordinal among the internal nodes (-1: a
    # leaf). A program owns BLOCK_P pixels, a few consecutive ones per thread; every node is one
    # [BLOCK_P] vector of straight-line code, every per-depth state a tuple of such vectors.
    # UPSAMPLE (the loss only, 1-D grid of programs within one image): P, HW and W are the target's, every
    # logit of a pixel the interpolation of its 2x2 stencil in the image's low-resolution logits at xi
    # (ui_ptr, ul_ptr: the per-axis tables; xpix is then the stencil's first offset within the image, int32
    # unless OFF64, u01 .. u11 the others, lx, ly the weights; SXC > 0: the channel stride, compiled in:
    # _common.up_sxc).
    OFF_PATH: tl.constexpr = 4 * V
    if UPSAMPLE:
        pid, n, p, pmask, h, w = C.up_image_pixels(P, HW, W, BLOCK_P)
        tpix = n * stn + h.to(tl.int64) * sth + w.to(tl.int64) * stw
        xpix, u01, u10, u11, lx, ly = C.up_stencil(ui_ptr, ul_ptr, h, w, HW // W, W, sxh, sxw, OFF64)
        xi = x_ptr + n * sxn  # the image's logits
        wx0 = 1.0 - lx
        wy0 = 1.0 - ly
    else:
        pid, p, pmask, xpix, tpix, gpix, opix = C.pixel_offsets(P, HW, W, sxn, sxh, sxw, stn, sth, stw, sgn, sgh,
                                                               sgw, son, soh, sow, BLOCK_P, FLAT, VEC)
    sxc64 = C.channel_stride64(sxc, SXC if UPSAMPLE else 0)  # channel offsets in 64 bits
    sgc64 = tl.cast(sgc, tl.int64)
    y, valid, bad = C.load_labels(t_ptr + tpix, pmask, ignore_index, L)
    # The first step's logits, loaded early: the labels move to their register layout once (_bind). Its
    # first node's row is also read as a [pixels] vector: Triton gives every [pixels] load that shares data
    # with it (the labels, the path gathers) its VEC pixels per thread (loads take the widest of their
    # slice), where the int64 labels alone would get 16 bytes (2 pixels): one register layout for all.
    if UPSAMPLE:
        xs = _load_nodes_up(xi, xpix, u01, u10, u11, wx0, lx, wy0, ly, sxc64, CH, V, 0, G, USE_EXTREMA, ACC,
                            USE_EXTREMA)
        x0 = xs[0]
    else:
        xs = T.load_group(x_ptr, xpix, sxc64, pmask, CH, V, 0, G, USE_EXTREMA, ACC)
        if USE_EXTREMA:
            x0 = tl.load(x_ptr + xpix + CH[V - 1] * sxc64, mask=pmask, other=0.0).to(ACC)
        else:
            x0 = tl.load(x_ptr + xpix + CH[0] * sxc64, mask=pmask, other=0.0).to(ACC)
    code = _bind(tl.where(valid, tl.where(bad, -2, y), -1).to(tl.int32), x0, PIN)
    valid = code != -1
    bad = code == -2
    y = tl.maximum(code, 0)
    WANT_LOSS: tl.constexpr = LOSS_MODE != 0
    WANT_GRAD: tl.constexpr = GRAD_MODE != 0

    zero = tl.zeros([BLOCK_P], dtype=ACC)
    # The tree-min gradient alone (no loss: LATE) reads the label's path and the pixel's gradient scale after
    # the bottom-up pass, which needs neither, and the path's weights after the top-down pass (_path_min
    # there): only the label is live across the first pass, only the path's channels across the second.
    # STASH (NCHW launches): the bottom-up pass stores M_v of every internal node v to the gradient's own element
    # of v (exact: M_v is one of the pixel's logits, and the gradient has their dtype), the top-down pass reads it
    # back from there before it overwrites the element with v's gradient: no per-node state in registers across
    # the passes (a barrier between them: no load forwarded from the stores; each element's load comes before its
    # store, whose value depends on it). PACK (NW > 0; NCHW launches with tree_min.GRAD_STASH off): the gradient
    # packs its argmax fields (below). KEEP (neither; channels_last, one pixel per thread: fewer instructions
    # there, and no spill): M_v of every internal node in registers (mi).
    # GT: the nodes per load and store of the gradient's top-down pass (G: the other passes).
    PACK: tl.constexpr = NW > 0
    KEEP: tl.constexpr = not PACK and not STASH
    # PAIRED (PAIR >= 0; the launcher sets it for float32 math on NCHW, several pixels per thread): the loss's focal
    # terms at γ = 2, eps = 0 two pixels of a thread at a time, one reciprocal for both (_focal2_pair; every node
    # j with j % PAIR == 0 takes its reciprocals from FMAs when PAIR > 0). Not in the single pass or with UPSAMPLE.
    PAIRED: tl.constexpr = (PAIR >= 0 and USE_EXTREMA and WANT_LOSS and not WANT_GRAD and GMODE == 2 and not HAS_EPS
                            and not UPSAMPLE)
    LATE: tl.constexpr = (PACK or STASH) and USE_EXTREMA and WANT_GRAD and not WANT_LOSS and not UPSAMPLE
    EARLY_PATH: tl.constexpr = USE_EXTREMA and (WANT_LOSS or UPSAMPLE or KEEP)
    # The label's path a_d(y) (-1 past its leaf), element d - 1 of the tuple for depth d; for the tree-min
    # the running minimum of the path logits and the path nodes' gradient weights (_path_min).
    path = ()
    if not LATE:
        path = _path_of(tab_ptr + OFF_PATH, y, pmask, xs[0], D, PIN)
    if EARLY_PATH:
        if UPSAMPLE:
            cmin, kpath, _ = _path_min(xi, k_ptr, xpix, sxc, pmask, path, zero, D, WANT_GRAD, u01, u10, u11, lx,
                                       ly, True)
        else:
            cmin, kpath, _ = _path_min(x_ptr, k_ptr, xpix, sxc, pmask, path, zero, D, WANT_GRAD, xpix, xpix, xpix,
                                       zero, zero, False)

    if WANT_GRAD and not LATE:
        gsc = _grad_scale(go_ptr, opix, pmask, zero, y, p, valid, cw_ptr, pw_ptr, ACC, HAS_CW, HAS_PW, GRAD_MODE)
    acc = zero
    if USE_EXTREMA:
        # Bottom-up, in reverse pre-order: M_v = max(x_v, the children's M), one running max per depth
        # (element d of cm: the max over the finished children, at depth d + 1, of the open node at depth
        # d); node v's term is f(cmin) on the path, f(−M_v) off it. The gradient keeps, for every internal
        # node, where its subtree's argmax is (docs/MATH.md §3.10): 0 for the node itself (x_v >= the
        # children's maximum), else the 1-based ordinal ORD of the first child whose M is the maximum (sel,
        # per depth: children come last to first, so >= lets an earlier one take a tie), packed as a
        # bit field (WORD, SHIFT, MASK by IDX) into NW int32 words per pixel (PACK), else M_v itself (mi; STASH:
        # in the gradient's element of v).
        cm = ()
        for d in tl.static_range(D + 1):
            cm = cm + (zero - float("inf"),)
        izero = tl.zeros([BLOCK_P], dtype=tl.int32)
        mw = ()
        sel = ()
        mi = ()
        if WANT_GRAD and PACK:
            for i in tl.static_range(NW):
                mw = mw + (izero,)
            for d in tl.static_range(D):
                sel = sel + (izero,)
        if WANT_GRAD and KEEP:
            for i in tl.static_range(V):
                if not LEAF[i]:
                    mi = mi + (zero,)
        for j in tl.static_range(V):
            if j % G == 0 and j > 0:
                if PIN:
                    acc = T.pin(acc, PIN)
                    cm = T.pin_all(cm, PIN)
                    mw = T.pin_all(mw, PIN)
                    sel = T.pin_all(sel, PIN)
                    mi = T.pin_all(mi, PIN)
                if ADDR_PIN > 0 and WANT_GRAD:
                    # A store that never happens (P >= 0) but may alias the logits: the compilers keep the
                    # next group's loads after it instead of hoisting all V loads of this pass (nothing is
                    # stored before the top-down pass) to the start, one register each.
                    tl.store(cnt_ptr, 0, mask=P < 0)
                if UPSAMPLE:
                    xs = _load_nodes_up(xi, xpix, u01, u10, u11, wx0, lx, wy0, ly, sxc64, CH, V, j, G, True, ACC)
                else:
                    xs = T.load_group(x_ptr, xpix, sxc64, pmask, CH, V, j, G, True, ACC, False, ADDR_PIN)
            x = xs[j % G]
            if LEAF[V - 1 - j]:
                m = x
            else:
                m = tl.maximum(x, cm[DEP[V - 1 - j]], propagate_nan=tl.PropagateNan.ALL)
                if WANT_GRAD and KEEP:
                    mi = T.replace(mi, IDX[V - 1 - j], m)
                if WANT_GRAD and STASH:
                    tl.store(_stash_ptr(g_ptr, gpix, CH[V - 1 - j], sgc64, ADDR_PIN), m.to(g_ptr.dtype.element_ty),
                             mask=pmask)
                if WANT_GRAD and PACK:
                    c = tl.where(x >= cm[DEP[V - 1 - j]], 0, sel[DEP[V - 1 - j]])
                    mw = T.replace(mw, WORD[IDX[V - 1 - j]], mw[WORD[IDX[V - 1 - j]]] | (c << SHIFT[IDX[V - 1 - j]]))
                    sel = T.replace(sel, DEP[V - 1 - j], izero)
                cm = T.replace(cm, DEP[V - 1 - j], zero - float("inf"))
            if WANT_GRAD and PACK and DEP[V - 1 - j] > 1:
                sel = T.replace(sel, DEP[V - 1 - j] - 1,
                                tl.where(m >= cm[DEP[V - 1 - j] - 1], ORD[V - 1 - j], sel[DEP[V - 1 - j] - 1]))
            cm = T.replace(cm, DEP[V - 1 - j] - 1,
                           tl.maximum(cm[DEP[V - 1 - j] - 1], m, propagate_nan=tl.PropagateNan.ALL))
            if WANT_LOSS:
                w = tl.where(path[DEP[V - 1 - j] - 1] == CH[V - 1 - j], cmin[DEP[V - 1 - j] - 1], m)
                kv = tl.load(k_ptr + CH[V - 1 - j]).to(ACC)
                if PAIRED:
                    wa, wb = tl.split(tl.reshape(w, [BLOCK_P // 2, 2]))  # pixels 2i, 2i + 1: one thread's
                    fa, fb = _focal2_pair(wa, wb, PAIR > 0 and j % PAIR == 0, FAST)
                    acc += kv * tl.reshape(tl.join(fa, fb), [BLOCK_P])
                else:
                    f, _ = _focal2(w, gamma, eps, True, False, GMODE, HAS_EPS, FAST)
                    acc += kv * f
        # The maxima propagate NaN (GPU max/min otherwise drop it): a NaN logit anywhere reaches the
        # max over the depth-1 nodes, cm[0] (docs/MATH.md §5.3).
        nan = cm[0] != cm[0]
        bad = bad | (valid & nan)
        if WANT_GRAD:
            if LATE:
                path = _path_of(tab_ptr + OFF_PATH, y, pmask, xs[0], D, PIN)
                gsc = _grad_scale(go_ptr, opix, pmask, zero, y, p, valid, cw_ptr, pw_ptr, ACC, HAS_CW, HAS_PW,
                                  GRAD_MODE)
            gsc = tl.where(valid, tl.where(bad, float("nan"), gsc), 0.0)
            if STASH:
                tl.debug_barrier()  # the stashed M_v stored before the top-down pass reads them
                if ADDR_PIN > 0:
                    # The top-down pass's channel strides plus a zero ptxas cannot see through (a load that never
                    # happens: P >= 0), so that its addresses are not the bottom-up pass's: ptxas drops the pins'
                    # movs, took the two passes' addresses of a channel for one value and kept ~20 of them live
                    # across the walk (184 bytes spilled, float32 on Vistas 2.0, sm_90 model).
                    z = tl.load(tab_ptr, mask=P < 0, other=0).to(tl.int64)
                    sxc64 = sxc64 + z
                    sgc64 = sgc64 + z
            # Top-down, in pre-order: an off-path node's weight k_v goes to M_v's argmax (first in
            # pre-order: v itself if x_v = M_v, else the first child with the same maximum), as the packed
            # fields say. Element d - 1 of `pend` holds what the open node at depth d owes the child whose
            # ordinal is in its field (`pos`; 0: none, the node kept its weight). Every node's gradient is
            # written here in its off-path form; the (at most D) path nodes' entries are rewritten
            # afterwards. Only an internal path node's own weight must stay out of the routing (a path
            # node's children never inherit: its ancestors are all on the path).
            ngsc = -gsc  # the off-path sign
            # Without PACK: M_v of the internal nodes (mi, or STASH: read back from the gradient's element), `mo`
            # the open nodes' M, a child hits when its M equals its parent's (the first such child takes the owed
            # weight and clears it).
            pos = ()
            mo = ()
            pend = ()
            for d in tl.static_range(D):
                if PACK:
                    pos = pos + (izero,)
                else:
                    mo = mo + (zero,)
                pend = pend + (zero,)
            for i in tl.static_range(V):
                if i % GT == 0:
                    if PIN and i > 0:
                        pos = T.pin_all(pos, PIN)
                        mo = T.pin_all(mo, PIN)
                        pend = T.pin_all(pend, PIN)
                    xs = T.load_group(x_ptr, xpix, sxc64, pmask, CH, V, i, GT, False, ACC, True, ADDR_PIN)
                    gs = ()
                x = xs[i % GT]
                kin = tl.load(k_ptr + CH[i]).to(ACC)
                if not LEAF[i]:
                    kin = tl.where(path[DEP[i] - 1] == CH[i], 0.0, kin)
                if PACK:
                    if DEP[i] > 1:
                        kin += tl.where(pos[DEP[i] - 2] == ORD[i], pend[DEP[i] - 2], 0.0)
                    if LEAF[i]:
                        kk = kin
                    else:
                        c = (mw[WORD[IDX[i]]] >> SHIFT[IDX[i]]) & MASK[IDX[i]]
                        kk = tl.where(c == 0, kin, 0.0)
                        pend = T.replace(pend, DEP[i] - 1, kin)
                        pos = T.replace(pos, DEP[i] - 1, c)
                else:
                    if LEAF[i]:
                        m = x
                    elif STASH:
                        m = tl.load(_stash_ptr(g_ptr, gpix, CH[i], sgc64, ADDR_PIN), mask=pmask, other=0.0).to(ACC)
                    else:
                        m = mi[IDX[i]]
                    if DEP[i] > 1:
                        hit = m == mo[DEP[i] - 2]
                        kin += tl.where(hit, pend[DEP[i] - 2], 0.0)
                        pend = T.replace(pend, DEP[i] - 2, tl.where(hit, 0.0, pend[DEP[i] - 2]))
                    if LEAF[i]:
                        kk = kin
                    else:
                        own = x >= m
                        kk = tl.where(own, kin, 0.0)
                        pend = T.replace(pend, DEP[i] - 1, tl.where(own, 0.0, kin))
                        mo = T.replace(mo, DEP[i] - 1, m)
                _, df = _focal2(x, gamma, eps, False, True, GMODE, HAS_EPS, FAST)
                g = tl.where(valid, (kk * df) * ngsc, 0.0)  # an ignored pixel's NaN logits give 0, not 0 * NaN
                gs = gs + (g,)
                if i % GT == GT - 1 or i == V - 1:
                    T.store_group(g_ptr, gpix, sgc64, pmask, gs, CH, V, i - i % GT, GT, ADDR_PIN)
            # The path nodes: a_d gets the weight K of the deeper path nodes whose argmin it is, at z = x
            # (w = −x), its logit loaded again (not kept live across the walk; without the loss the path's
            # running minimum and weights are made here too, from those loads). The barrier: the rows' stores
            # and these need not share a register layout (another thread may have written the row).
            tl.debug_barrier()
            if not EARLY_PATH:
                _, kpath, xas = _path_min(x_ptr, k_ptr, xpix, sxc, pmask, path, zero, D, True, xpix, xpix, xpix,
                                          zero, zero, False)
            for d in tl.static_range(D):
                # channels_last: its mask and address made here, not kept from the start (a 4-byte spill
                # otherwise); on NCHW the pin made ptxas spill more (sm90 model), so not there.
                a = T.pin(path[d], PIN and ADDR_PIN == 0)
                act = pmask & (a >= 0)
                a64 = tl.where(act, a, 0).to(tl.int64)
                if EARLY_PATH:
                    xa = tl.load(x_ptr + xpix + a64 * sxc, mask=act, other=0.0).to(ACC)
                else:
                    xa = xas[d]
                _, df = _focal2(-xa, gamma, eps, False, True, GMODE, HAS_EPS, FAST)
                g = tl.where(valid, (kpath[d] * df) * gsc, 0.0)
                tl.store(g_ptr + gpix + a64 * sgc, g.to(g_ptr.dtype.element_ty), mask=act)
    else:
        # Tree BCE: every node its own extremum, one pass: loss and gradient share the sigmoids. The
        # gradient rows are written before the pixel's NaN scan is complete; the rare pixel with a NaN
        # logit gets its NaN row afterwards (cold).
        if WANT_GRAD:
            gsc = tl.where(valid, tl.where(bad, float("nan"), gsc), 0.0)
        big = zero - float("inf")
        for i in tl.static_range(V):
            if i % G == 0:
                if i > 0:
                    if PIN:
                        acc = T.pin(acc, PIN)
                        big = T.pin(big, PIN)
                    if UPSAMPLE:
                        xs = _load_nodes_up(xi, xpix, u01, u10, u11, wx0, lx, wy0, ly, sxc64, CH, V, i, G, False,
                                            ACC, False)
                    else:
                        xs = T.load_group(x_ptr, xpix, sxc64, pmask, CH, V, i, G, False, ACC)
                gs = ()
            x = xs[i % G]
            big = tl.maximum(big, x, propagate_nan=tl.PropagateNan.ALL)  # NaN if any logit is
            on = path[DEP[i] - 1] == CH[i]
            f, df = _focal2(tl.where(on, -x, x), gamma, eps, WANT_LOSS, WANT_GRAD, GMODE, HAS_EPS, FAST)
            k = tl.load(k_ptr + CH[i]).to(ACC)
            if WANT_LOSS:
                acc += k * f
            if WANT_GRAD:
                g = k * df
                g = tl.where(on, g, -g)
                g = tl.where(valid, g * gsc, 0.0)
                gs = gs + (g,)
                if i % G == G - 1 or i == V - 1:
                    T.store_group(g_ptr, gpix, sgc64, pmask, gs, CH, V, i - i % G, G, ADDR_PIN)
        nan = big != big
        late = valid & nan & (~bad)
        bad = bad | (valid & nan)
        if WANT_GRAD:
            if tl.max(late.to(tl.int32), axis=0) > 0:  # sm90: cold
                nanrow = ()
                for i in tl.static_range(G):
                    nanrow = nanrow + (tl.full([BLOCK_P], float("nan"), ACC),)
                # Addresses recomputed from a pinned base: shared with the main pass's stores, the compiler
                # kept all V of them live to here and spilled them (2.2 KB per thread in float32).
                gpix_late = T.pin(gpix, PIN)
                for i in tl.static_range(0, V, G):
                    T.store_group(g_ptr, gpix_late, sgc64, late, nanrow[:min(G, V - i)], CH, V, i, G)
    if WANT_LOSS:
        C.store_loss(acc * LN2, valid, bad, p, pmask, pid, loss_ptr, part_ptr, cnt_ptr, LOSS_MODE, y, cw_ptr, pw_ptr,
                     ws_ptr, ACC, HAS_CW, HAS_PW)


@triton.jit(do_not_specialize=["Y0", "NPIX"])
def _tree_min_up_rows_kernel(
    x_ptr, t_ptr, tab_ptr, k_ptr, ui_ptr, ul_ptr, s_ptr, go_ptr, cw_ptr, pw_ptr,
    Hh, W, Y0, NPIX,
    sxn, sxc, sxh, sxw,
    stn, sth, stw,
    ssn, ssy, ssx,
    son, soh, sow,
    gamma, eps, ignore_index,
    V: tl.constexpr, L: tl.constexpr, D: tl.constexpr,
    CH: tl.constexpr, DEP: tl.constexpr, LEAF: tl.constexpr, IDX: tl.constexpr,
    BLOCK_P: tl.constexpr, ACC: tl.constexpr,
    USE_EXTREMA: tl.constexpr, GMODE: tl.constexpr, HAS_EPS: tl.constexpr,
    GRAD_MODE: tl.constexpr, FAST: tl.constexpr, G: tl.constexpr, PIN: tl.constexpr,
    HAS_CW: tl.constexpr, HAS_PW: tl.constexpr, OFF64: tl.constexpr = False, SXC: tl.constexpr = 0,
):
    # The upsampled backward's first half, over one band of full-resolution rows [Y0, Y0 + NPIX / W) of every
    # image (grid: pixel blocks of the band, N): each pixel's whole gradient row d(weighted loss)/d(upsampled
    # logits), computed once from its label, grad_output and interpolated logits, stored in ACC to the band's
    # scratch (s_ptr: [N, rows, W, channels], channel stride 1; srow: the pixel's row). Stencils as the fused
    # forward's (_common.up_stencil): the image's logits at one scalar pointer, int32 offsets (OFF64: int64),
    # no mask (pixels past the band are clamped to its first one, their stores masked off); SXC as the forward's.
    # The tree-min: a bottom-up pass interpolates each node once, keeps M_v of every internal node (mi) and
    # stores the interpolated logit to the pixel's own scratch element; after a barrier the label's path
    # (_path_min: its logits and weights K) and the top-down routing of _tree_min_kernel read each logit back
    # from its element and overwrite it with the node's gradient in its off-path form, then the D path nodes'
    # elements get their own terms (the same [pixels] layout for every element's store and load: each element
    # stays with its thread). The BCE: one pass, every node's own term,
    # NaN rows rewritten afterwards for pixels with a NaN logit. _up_gather_kernel then reduces the scratch onto
    # the low-resolution pixels. PIN: the running state through T.pin between node groups (as _tree_min_kernel).
    OFF_PATH: tl.constexpr = 4 * V
    n = tl.program_id(1).to(tl.int64)
    r = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    ok = r < NPIX
    r = tl.where(ok, r, 0)
    Yl = r // W
    X = r - Yl * W
    Y = Y0 + Yl
    sxc64 = C.channel_stride64(sxc, SXC)
    zero = tl.zeros([BLOCK_P], dtype=ACC)
    y, valid, bad = C.load_labels(t_ptr + n * stn + Y.to(tl.int64) * sth + X.to(tl.int64) * stw, ok, ignore_index,
                                  L)
    if GRAD_MODE == 1:
        gsc = zero + tl.load(go_ptr).to(ACC)
    else:
        gsc = tl.load(go_ptr + n * son + Y.to(tl.int64) * soh + X.to(tl.int64) * sow, mask=ok, other=0.0).to(ACC)
    gsc = C.weigh(gsc, y, (n * Hh + Y) * W + X, valid, cw_ptr, pw_ptr, ACC, HAS_CW, HAS_PW)  # w_p
    xpix, u01, u10, u11, lx, ly = C.up_stencil(ui_ptr, ul_ptr, Y, X, Hh, W, sxh, sxw, OFF64)
    xi = x_ptr + n * sxn  # the image's logits
    wx0 = 1.0 - lx
    wy0 = 1.0 - ly
    path = ()
    for d in tl.static_range(D):
        path = path + (tl.load(tab_ptr + OFF_PATH + y * D + d, mask=ok, other=-1),)
    spix = n * ssn + Yl.to(tl.int64) * ssy + X.to(tl.int64) * ssx
    srow = s_ptr + spix
    if USE_EXTREMA:
        # Bottom-up (reverse pre-order): the NaN scan, every internal node's M_v, each logit to its element.
        cm = ()
        for d in tl.static_range(D + 1):
            cm = cm + (zero - float("inf"),)
        mi = ()
        for v in tl.static_range(V):
            if not LEAF[v]:
                mi = mi + (zero,)
        for jj in tl.static_range(V):
            if jj % G == 0:
                if PIN and jj > 0:
                    cm = T.pin_all(cm, PIN)
                    mi = T.pin_all(mi, PIN)
                # The group's interpolated logits, stored to their elements as one [pixels, G] tile (as loaded:
                # each thread its pixels' G channels), not one [pixels] store per node: Triton's coalescing pass
                # costs memory ops × operations (see _load_nodes_up).
                xt = _lerp_nodes_up(xi, xpix, u01, u10, u11, wx0, lx, wy0, ly, sxc64, CH, V, jj, G, True, ACC)
                tl.store(srow[:, None] + T.group_channels(CH, V, jj, G, True)[None, :], xt,
                         mask=ok[:, None] & (tl.arange(0, G) < V - jj)[None, :])
                xg = T.unpack(xt, G)
            x = xg[jj % G]
            if LEAF[V - 1 - jj]:
                m = x
            else:
                m = tl.maximum(x, cm[DEP[V - 1 - jj]], propagate_nan=tl.PropagateNan.ALL)
                cm = T.replace(cm, DEP[V - 1 - jj], zero - float("inf"))
                mi = T.replace(mi, IDX[V - 1 - jj], m)
            cm = T.replace(cm, DEP[V - 1 - jj] - 1,
                           tl.maximum(cm[DEP[V - 1 - jj] - 1], m, propagate_nan=tl.PropagateNan.ALL))
        nan = cm[0] != cm[0]
        bad = bad | (valid & nan)
    # The BCE has one pass: its rows are stored before the NaN scan is complete, and the rare pixel with a NaN
    # logit gets its NaN row afterwards (cold), as in _tree_min_kernel.
    gsc = tl.where(valid, tl.where(bad, float("nan"), gsc), 0.0)
    ngsc = -gsc
    if USE_EXTREMA:
        # The stores above before any load below (and no load forwarded from them: the logits stay in memory).
        tl.debug_barrier()
        _, kpath, xas = _path_min(s_ptr, k_ptr, spix, 1, ok, path, zero, D, True, spix, spix, spix, zero, zero,
                                  False)
        mo = ()
        pend = ()
        for d in tl.static_range(D):
            mo = mo + (zero,)
            pend = pend + (zero,)
    big = zero - float("inf")
    # Top-down (pre-order; the BCE's only pass): each node's gradient, the BCE's stored G nodes at a time.
    for v in tl.static_range(V):
        if v % G == 0:
            if PIN and v > 0 and USE_EXTREMA:
                mo = T.pin_all(mo, PIN)
                pend = T.pin_all(pend, PIN)
            if not USE_EXTREMA:
                if PIN and v > 0:
                    big = T.pin(big, PIN)
                xg = _load_nodes_up(xi, xpix, u01, u10, u11, wx0, lx, wy0, ly, sxc64, CH, V, v, G, False, ACC)
            gs = ()
        kin = tl.load(k_ptr + CH[v]).to(ACC)
        on = path[DEP[v] - 1] == CH[v]
        if USE_EXTREMA:
            # _tree_min_kernel's top-down routing, every node's gradient in its off-path form (the path nodes'
            # rewritten below); an internal path node's own weight stays out of the routing. The group's logits
            # read back and its gradients stored as [pixels, G] tiles (each thread its own pixels' elements, as
            # the bottom-up pass stored them).
            if v % G == 0:  # unmasked, as the pixels past the band are clamped (a masked load adds a move)
                xg = T.unpack(tl.load(srow[:, None] + T.group_channels(CH, V, v, G, False)[None, :]), G)
            x = xg[v % G]
            if LEAF[v]:
                m = x
            else:
                m = mi[IDX[v]]
                kin = tl.where(on, 0.0, kin)
            if DEP[v] > 1:
                hit = m == mo[DEP[v] - 2]
                kin += tl.where(hit, pend[DEP[v] - 2], 0.0)
                pend = T.replace(pend, DEP[v] - 2, tl.where(hit, 0.0, pend[DEP[v] - 2]))
            if LEAF[v]:
                kk = kin
            else:
                own = x >= m
                kk = tl.where(own, kin, 0.0)
                pend = T.replace(pend, DEP[v] - 1, tl.where(own, 0.0, kin))
                mo = T.replace(mo, DEP[v] - 1, m)
            _, df = _focal2(x, gamma, eps, False, True, GMODE, HAS_EPS, FAST)
            # 0 at ignored pixels (whatever their logits).
            gs = gs + (tl.where(valid, (kk * df) * ngsc, 0.0),)
            if v % G == G - 1 or v == V - 1:
                T.store_group(s_ptr, spix, 1, ok, gs, CH, V, v - v % G, G)
        else:
            x = xg[v % G]
            big = tl.maximum(big, x, propagate_nan=tl.PropagateNan.ALL)  # NaN if any logit is
            _, df = _focal2(tl.where(on, -x, x), gamma, eps, False, True, GMODE, HAS_EPS, FAST)
            g = kin * df
            g = tl.where(on, g, -g) * gsc
            gs = gs + (tl.where(valid, g, 0.0),)
            if v % G == G - 1 or v == V - 1:
                T.store_group(s_ptr, spix, 1, ok, gs, CH, V, v - v % G, G)
    if USE_EXTREMA:
        # The path nodes: a_d gets the weight K of the deeper path nodes whose argmin it is, at w = -x (its
        # logit as _path_min read it back, before the top-down pass). The barrier: after every tile store of
        # the top-down pass whatever thread the tiles' layout gave an element.
        tl.debug_barrier()
        for d in tl.static_range(D):
            act = ok & (path[d] >= 0)
            _, df = _focal2(-xas[d], gamma, eps, False, True, GMODE, HAS_EPS, FAST)
            tl.store(srow + tl.where(act, path[d], 0), tl.where(valid, (kpath[d] * df) * gsc, 0.0), mask=act)
    else:
        late = valid & (big != big) & (~bad)
        if tl.max(late.to(tl.int32), axis=0) > 0:  # sm90: cold
            nanrow = ()
            for i in tl.static_range(G):
                nanrow = nanrow + (tl.full([BLOCK_P], float("nan"), ACC),)
            for v in tl.static_range(0, V, G):
                T.store_group(s_ptr, spix, 1, late, nanrow[:min(G, V - v)], CH, V, v, G)


# Consecutive pixels per thread on NCHW: 16 bytes (float32 4, bfloat16 8 pixels; 128-bit loads of the logits) in
# every pass of both losses. Every [pixels] load of a program (labels, the label's path) shares the logits' register
# layout (see the kernel's x0).
NCHW_BYTES = 16
CL_VEC = 2  # channels_last: one pixel per thread (gpu_blocks), VEC only the labels' contiguity hint
# Whether the tree-min gradient on NCHW keeps M_v of every internal node in the gradient's own element between its
# two passes (:func:`_stashes`; else :func:`_packs` decides between packed argmax fields and M_v in registers).
GRAD_STASH = True
# The tree-min gradient of 2-byte logits on NCHW with GRAD_STASH (_shape): NCHW_BYTES of pixels per thread (8, 128-bit
# loads) and the nodes per step of its bottom-up pass (G) and of its top-down pass (GT).
NARROW_STASH_GROUPS = (T.GROUP, 4)
# The same without GRAD_STASH (_shape, _packs): pixels per thread, G and GT, and whether it packs its argmax fields.
NARROW_GRAD_VEC = 2
NARROW_GRAD_GROUPS = (T.GROUP, T.GROUP)
NARROW_GRAD_PACKS = False
# The tree-min loss's focal terms at γ = 2, eps = 0 of 2-byte NCHW logits (:func:`_pair`): -1 one at a time
# (_focal2), 0 two pixels of a thread at a time with one MUFU reciprocal for both (_focal2_pair), n > 0 the same
# with every n-th node's reciprocals from FMAs (_rcp_fma). sm_90 model, bfloat16 NCHW forward (issue / MUFU ms,
# floor 0.844): -1 0.757 / 0.998, 2 0.82 / 0.748, 4 0.788 / 0.79.
FORWARD_PAIR = 4


def _shape(logits, use_extrema=False, two_pass=False, grad=None):
    """(VEC, G, GT) of a compiled launch on NCHW: NCHW_BYTES of consecutive pixels per thread (VEC) and T.GROUP
    nodes per step (G; GT: of the tree-min gradient's top-down pass), but for 2-byte logits: G = 2 in the
    tree-min forward (8 made ptxas spill 304 bytes at 8 pixels), G = 4 in the tree BCE, and the tree-min
    gradient G, GT = NARROW_STASH_GROUPS (8, 4) with its M_v stashed in the gradient (:func:`_stashes`, of the gradient
    ``grad`` where given: one of another dtype takes the shapes without the stash).

    What the gradient's shapes gave (sm_90 model, python -m benchmarks.sm90 --backend triton --op tree_min
    --pass backward --layout nchw --upsample 1, Vistas 2.0; bytes spilled per thread, SASS instructions per
    element, issue ms against the floor). Stashed, bfloat16 at 8 pixels: G = 8, GT = 4 no spill (220
    registers), 33.5, 1.39 / 1.67 ms; G = 8, GT = 2 the same (221 registers); G = GT = 8 128 bytes; G = 4, GT = 8
    112 bytes (before the top-down pass's opaque stride, see the kernel: G = GT = 8 1.8 KB). Stashed, float32 at
    4 pixels: G = GT = 8 no spill (147 registers), 30.7, 1.28 / 3.31 ms; GT = 4 no spill (123 registers), 30.9.
    Without the stash (GRAD_STASH False; the shapes then: float32 4 pixels, G = GT = 8, packed fields; 2-byte
    logits NARROW_GRAD_VEC = 2 pixels, 4 bytes, unpacked, :func:`_packs`): float32 24 bytes (31.7, 1.32 ms;
    G = 8, GT = 4 736 bytes; G = 4, GT = 8 576 bytes); bfloat16 at 2 pixels 32 bytes (37.9, 1.58 ms), every
    other shape tried spilled more: 8 pixels 1.2-1.6 KB unpacked (G = 4, 8), 1.8-2.8 KB packed (G = GT = 2);
    4 pixels 0.5 KB unpacked (G = 8), packed 536 bytes (G = GT = 8), 352 (G = 2, GT = 8: 64-bit loads, 36.4
    instructions per element against 37.9 here), 1032 (G = 2, GT = 4). Channels_last: CL_VEC."""
    if logits.shape[1] > 1 and logits.stride(1) == 1:
        return CL_VEC, T.GROUP, T.GROUP
    size = logits.element_size()
    vec = max(NCHW_BYTES // size, 1)
    if size == 2 and two_pass:
        if _stashes(logits, two_pass, grad):
            return (vec,) + tuple(NARROW_STASH_GROUPS)
        return (NARROW_GRAD_VEC,) + tuple(NARROW_GRAD_GROUPS)
    if size == 2:
        g = 2 if use_extrema else 4
        return vec, g, g
    return vec, T.GROUP, T.GROUP


def _launch(logits, target, tab, k, gamma, eps, ignore_index, use_extrema, *, loss_mode, loss=None,
            grad=None, grad_out=None, grad_mode=C.GRAD_NONE, sizes=None, class_weight=None, pixel_weight=None):
    L, D = sizes[:2]
    V = logits.shape[1]
    sizes = _compiled_sizes(tab, V, sizes)
    ch, dep, leaf, idx = T.compiled_tree(tuple(sizes[4:4 + V]), tuple(sizes[4 + V:4 + 2 * V]))
    gmode = _gmode(gamma)
    two_pass = grad_mode != C.GRAD_NONE and use_extrema
    vec, group, group_td = _shape(logits, use_extrema, two_pass, grad)
    return C.launch_loss_kernel(
        _tree_min_kernel, logits, target, (tab, k, tab, tab), (float(gamma), float(eps), int(ignore_index)),
        loss_mode=loss_mode, loss=loss, grad=grad, grad_out=grad_out, grad_mode=grad_mode,
        class_weight=class_weight, pixel_weight=pixel_weight, blocks=_blocks(logits, two_pass, use_extrema, grad),
        V=V, L=L, D=D, CH=ch, DEP=dep, LEAF=leaf, IDX=idx, USE_EXTREMA=use_extrema, GMODE=gmode, HAS_EPS=eps > 0,
        FLAT=C.flat_pixels(logits, target, grad, grad_out if grad_mode == C.GRAD_PER_PIXEL else None),
        FAST=C.fast_exp(logits), G=group, GT=group_td, PIN=C.fast_exp(logits), VEC=vec,
        ADDR_PIN=_addr_pin(logits, grad) if use_extrema else 0, UPSAMPLE=False,
        PAIR=_pair(logits, loss_mode, grad_mode), STASH=_stashes(logits, two_pass, grad),
        **(dict(zip(("ORD", "WORD", "SHIFT", "MASK", "NW"), argmax_fields(dep)))
           if _packs(logits, two_pass, grad) else {}),
    )


def _pair(logits, loss_mode, grad_mode):
    """The kernel's PAIR: FORWARD_PAIR for the loss alone (no gradient) of 2-byte logits (float32 math) not on
    channels_last (NCHW or strided: 8 pixels per thread, :func:`_shape`; one pixel per thread on channels_last, where
    a pair would cross threads), else -1 (one term at a time). The kernel pairs only the tree-min's terms at γ = 2,
    eps = 0. 4-byte logits keep one term at a time: their forward is bound by its memory floor, and pairs cost
    (sm_90 model, float32 NCHW: 17.5 -> 19.0 instructions per element, 185 -> 255 registers, MUFU 0.998 -> 0.748 ms
    against a 1.67 ms floor)."""
    if (logits.element_size() != 2 or loss_mode == C.LOSS_NONE or grad_mode != C.GRAD_NONE
            or (logits.shape[1] > 1 and logits.stride(1) == 1)):
        return -1
    return FORWARD_PAIR


def _stashes(logits, two_pass, grad=None):
    """Whether the tree-min gradient keeps M_v of every internal node in the gradient's own element of that node
    between its two passes (the kernel's STASH): on NCHW (GRAD_STASH) where the gradient has the logits' dtype (M_v
    is one of the pixel's logits: exact there), not on channels_last (one pixel per thread: M_v in registers costs
    fewer instructions and no spill). The gradient's shapes it gave: :func:`_shape`. The single pass (loss and
    gradient in one launch, ``single_pass=True``; Vistas 2.0, sm_90 model, bytes spilled per thread) spills less
    with it too: float32 1440 -> 296 bytes, bfloat16 1256 (2 pixels per thread) -> 976 (8 pixels)."""
    return (GRAD_STASH and two_pass and not (logits.shape[1] > 1 and logits.stride(1) == 1)
            and (grad is None or grad.dtype == logits.dtype))


def _packs(logits, two_pass, grad=None):
    """Whether the tree-min gradient packs its argmax fields (``argmax_fields``): never where it stashes M_v
    (:func:`_stashes`, every NCHW launch with GRAD_STASH); else on NCHW with 4-byte or wider logits (4 pixels
    per thread, where M_v of every internal node in registers spilled), not on channels_last (one pixel per
    thread: keeping M_v costs fewer instructions), and for 2-byte logits as NARROW_GRAD_PACKS says (no: at 2
    pixels per thread, :func:`_shape`, packed, ptxas spilled 0.5-0.9 KB per thread where M_v spills 32 bytes)."""
    return (two_pass and not (logits.shape[1] > 1 and logits.stride(1) == 1) and not _stashes(logits, two_pass, grad)
            and (logits.element_size() >= 4 or NARROW_GRAD_PACKS))


@functools.lru_cache(maxsize=64)
def argmax_fields(depths):
    """The gradient's packed argmax fields (``_tree_min_kernel``'s ORD, WORD, SHIFT, MASK, NW) of a tree given by its
    nodes' depths in pre-order: ORD per node its 1-based ordinal among its siblings; per internal node (by its
    ordinal IDX) the int32 word, bit offset and mask of a field holding 0 .. its number of children (the
    smallest width that does; fields never straddle two words); NW the number of words."""
    V = len(depths)
    ords, children, open_ = [], [], {}  # open_: depth -> [the open node's internal ordinal, children so far]
    for i in range(V):
        d = depths[i]
        for dd in [k for k in open_ if k >= d]:
            del open_[dd]
        parent = open_.get(d - 1)
        if parent is not None:
            parent[1] += 1
            children[parent[0]] += 1
        ords.append(parent[1] if parent is not None else 0)
        if i + 1 < V and depths[i + 1] > d:
            open_[d] = [len(children), 0]
            children.append(0)
    word, shift, mask, w, b = [], [], [], 0, 0
    for n in children:
        bits = max(int(n).bit_length(), 1)
        if b + bits > 32:
            w, b = w + 1, 0
        word.append(w)
        shift.append(b)
        mask.append((1 << bits) - 1)
        b += bits
    return tuple(ords), tuple(word), tuple(shift), tuple(mask), (w + 1 if children else 0)


def _addr_pin(logits, grad):
    """The kernel's ADDR_PIN (``_tree.channel_offsets``) for the tree-min (the tree BCE keeps its address chains,
    which cost fewer instructions and no spill): 0 (no pin) without PIN or where a channel stride is 1
    (channels_last: the compiler's constant), else the channel strides' common alignment (16 or 1)."""
    strides = [logits.stride(1)] + ([grad.stride(1)] if grad is not None else [])
    if not C.fast_exp(logits) or logits.shape[1] <= 1 or any(s == 1 for s in strides):
        return 0
    return 16 if all(s % 16 == 0 for s in strides) else 1


def _tree_sizes(tree: Tree) -> List[int]:
    """The ``sizes`` argument of the custom ops: ``tables.tree_min_sizes`` (L, D, DI, I), then the channels in
    pre-order and their depths (the tree the kernel compiles in)."""
    return tree.cached("triton_tree_min_sizes", lambda: list(tables.tree_min_sizes(tree)) + list(tree.dfs_order)
                       + [tree.depths[c] for c in tree.dfs_order])


def _blocks(logits, two_pass, use_extrema=False, grad=None):
    """(BLOCK_C, BLOCK_P, num_warps): :func:`gpu_blocks` when compiled; under the interpreter, which pays
    per program and per operation, one channel and ``_common.interpreter_pixels`` pixels."""
    if C.interpreted(logits.device):
        return 1, C.interpreter_pixels(C.shape_args(logits)[0]), 4
    return gpu_blocks(logits, two_pass, use_extrema, grad)


def gpu_blocks(logits, two_pass=False, use_extrema=False, grad=None):
    """(BLOCK_C, BLOCK_P, num_warps) of a compiled launch (BLOCK_C unused: the tree is walked G nodes at a
    time). Channel rows in memory (NCHW): VEC consecutive pixels per thread (:func:`_shape`: NCHW_BYTES, 16
    bytes). Channels contiguous (channels_last): one pixel per thread.
    ``two_pass``: the tree-min gradient; ``use_extrema``: the tree-min (else the tree BCE); ``grad``: the gradient it
    writes, if known (:func:`_stashes`)."""
    if logits.shape[1] > 1 and logits.stride(1) == 1:
        return 1, 128, 4
    return 1, _shape(logits, use_extrema, two_pass, grad)[0] * 32 * 4, 4


def _compiled_sizes(tab, V, sizes):
    """The ``sizes`` argument with the compiled-in tree (``_tree_sizes``), rebuilt from the table for a direct
    call of an op with ``tables.tree_min_sizes`` alone."""
    if len(sizes) < 4 + 2 * V:
        t = tab.cpu().tolist()
        sizes = list(sizes[:4]) + t[V:2 * V] + [t[c] for c in t[V:2 * V]]
    return sizes


def _up_blocks(logits, backward=False):
    """(BLOCK_P or BLOCK_Q, num_warps) of the upsampled kernels: under the interpreter up to 1024 pixels at a
    time (the forward; the backward's block is cut to the image's low-resolution pixels); compiled, one pixel
    per thread (every logit is four gathered loads)."""
    if C.interpreted(logits.device):
        return 1024, 4
    return 128, 4


def _launch_up_fwd(logits, target, tab, k, gamma, eps, ignore_index, use_extrema, sizes, align_corners, loss_mode,
                   loss, class_weight=None, pixel_weight=None):
    """The forward of the upsampled loss: ``_tree_min_kernel`` with UPSAMPLE over the target's pixels (1-D
    grid, programs within one image: :func:`_common.up_image_pixels`), groups of G = 2 nodes (4 for float64
    logits; the tree-min's each group four gathered [pixels, G] tiles, the BCE's each node four gathered loads:
    :func:`_load_nodes_up`; wider tiles, fewer memory ops for Triton's coalescing pass, made ptxas spill); returns
    (partials, counts, weight sums) as :func:`_common.launch_loss_kernel`."""
    N, V, h, w = logits.shape
    _, H, W = target.shape
    L, D = sizes[:2]
    sizes = _compiled_sizes(tab, V, sizes)
    ch, dep, leaf, idx = T.compiled_tree(tuple(sizes[4:4 + V]), tuple(sizes[4 + V:4 + 2 * V]))
    acc = C.acc_dtype(logits.dtype)
    ui, ul, _, _, _ = C.up_tables(h, w, H, W, bool(align_corners), acc, logits.device)
    P = N * H * W
    block_p, warps = _up_blocks(logits)
    if C.interpreted(logits.device):
        block_p = min(max(triton.next_power_of_2(max(P, 1)), 16), block_p)
    grid = C.up_grid(target, block_p)
    partials, counts, wsums = C.new_partials(grid[0] if loss_mode == C.LOSS_PARTIALS else 1, logits, class_weight)
    if P == 0:  # no pixel: nothing to read (the kernel's stencil loads are unmasked)
        for t in (partials, counts, wsums):
            t.zero_()
        return partials, counts, wsums
    C.launch(
        _tree_min_kernel, grid, logits,
        logits, target, tab, k, ui, ul, partials if loss is None else loss, partials, counts,
        *C.weight_ptrs(class_weight, pixel_weight, wsums, partials), partials, partials,
        P, max(H * W, 1), max(W, 1),
        *logits.stride(), *target.stride(), 0, 0, 0, 0, 0, 0, 0,
        float(gamma), float(eps), int(ignore_index),
        V=V, L=L, D=D, CH=ch, DEP=dep, LEAF=leaf, IDX=idx, BLOCK_C=1, BLOCK_P=block_p, ACC=C.tl_acc(logits.dtype),
        USE_EXTREMA=use_extrema, GMODE=_gmode(gamma), HAS_EPS=eps > 0, LOSS_MODE=loss_mode, GRAD_MODE=C.GRAD_NONE,
        FLAT=False, FAST=C.fast_exp(logits), G=4 if logits.dtype == torch.float64 else 2, PIN=C.fast_exp(logits),
        VEC=1, ADDR_PIN=0, UPSAMPLE=True,
        HAS_CW=class_weight is not None, HAS_PW=pixel_weight is not None, OFF64=C.up_off64(logits),
        SXC=C.up_sxc(logits), num_warps=warps,
    )
    return partials, counts, wsums


def _launch_up_bwd(grad, grad_out, grad_mode, logits, target, tab, k, gamma, eps, ignore_index, use_extrema,
                   sizes, align_corners, class_weight=None, pixel_weight=None):
    """Writes ``grad`` (the low-resolution logits' gradient) band by band (``_upsample.backward_in_bands``): per
    band of full-resolution rows ``_tree_min_up_rows_kernel`` (the band's gradient rows into the scratch), then
    ``_up_gather_kernel`` (onto the low-resolution rows; 2 launches per band, no host synchronisation)."""
    N, V, h, w = logits.shape
    _, H, W = target.shape
    if N == 0:
        return
    if N > 65535 and logits.device.type == "cuda":  # the images are the grids' second / third axis
        raise ValueError(f"tree_min_loss / tree_bce_loss with upsample='bilinear' on the Triton backend: a batch "
                         f"of at most 65535 images per backward call on CUDA, got {N}")
    L, D = sizes[:2]
    sizes = _compiled_sizes(tab, V, sizes)
    ch, dep, leaf, idx = T.compiled_tree(tuple(sizes[4:4 + V]), tuple(sizes[4 + V:4 + 2 * V]))
    acc = C.acc_dtype(logits.dtype)
    ui, ul, _, _, _ = C.up_tables(h, w, H, W, bool(align_corners), acc, logits.device)
    block_p, warps = _up_blocks(logits, backward=True)
    gos = grad_out.stride() if grad_mode == C.GRAD_PER_PIXEL else (0, 0, 0)
    cw, pw = C.weight_ptrs(class_weight, pixel_weight, None, grad)[:2]

    def launch_rows(scratch, Y0, Y1, block_p):
        C.launch(
            _tree_min_up_rows_kernel, (triton.cdiv((Y1 - Y0) * W, block_p), N), logits,
            logits, target, tab, k, ui, ul, scratch, grad_out, cw, pw,
            H, W, Y0, (Y1 - Y0) * W,
            *logits.stride(), *target.stride(), *scratch.stride()[:3], *gos,
            float(gamma), float(eps), int(ignore_index),
            V=V, L=L, D=D, CH=ch, DEP=dep, LEAF=leaf, IDX=idx, BLOCK_P=block_p, ACC=C.tl_acc(logits.dtype),
            USE_EXTREMA=use_extrema, GMODE=_gmode(gamma), HAS_EPS=eps > 0, GRAD_MODE=grad_mode,
            FAST=C.fast_exp(logits), G=T.GROUP, PIN=C.fast_exp(logits), HAS_CW=class_weight is not None,
            HAS_PW=pixel_weight is not None, OFF64=C.up_off64(logits), SXC=sxc, num_warps=warps,
        )

    sxc = C.up_sxc(logits)
    U.backward_in_bands(launch_rows, grad, logits, H, W, align_corners, block_p, block_p, warps)


def _gmode(gamma):
    """The kernels' GMODE: 0 for gamma = 0, 2 for gamma = 2, 1 for any other gamma."""
    return 0 if gamma == 0 else 2 if gamma == 2 else 1


# ----------------------------------------------------------------------------------- custom ops
# Weights as in hierarchical_softmax.py: ``class_weight`` L values in the accumulation dtype, ``pixel_weight``
# the target's shape, contiguous (``_common.weight_args``); the forwards return ``weight_sum`` (0-dim with
# class_weight, else empty), which the backwards take back for "mean".
@torch.library.custom_op("hss_triton::tree_min_fwd", mutates_args=())
def _tree_min_fwd(logits: torch.Tensor, target: torch.Tensor, tab: torch.Tensor, k: torch.Tensor, sizes: List[int],
              gamma: float, eps: float, ignore_index: int, reduction: str, use_extrema: bool, single_pass: bool,
              class_weight: Optional[torch.Tensor] = None, pixel_weight: Optional[torch.Tensor] = None,
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (loss, count of non-ignored pixels, weight sum (empty without class_weight), gradient if single_pass
    else empty)."""
    N, V, H, W = logits.shape
    C.check_weight_ops(class_weight, pixel_weight, sizes[0], logits, target)
    acc = C.acc_dtype(logits.dtype)
    dev = logits.device
    grad = torch.empty_like(logits) if single_pass else logits.new_empty((0,))
    kw = dict(class_weight=class_weight, pixel_weight=pixel_weight)
    if single_pass:
        scale = C.single_pass_scale(target, ignore_index, reduction, acc, class_weight)
        kw.update(grad=grad, grad_out=scale, grad_mode=C.GRAD_SCALAR)
    if reduction == "none":
        loss = torch.empty((N, H, W), dtype=acc, device=dev)
        _launch(logits, target, tab, k, gamma, eps, ignore_index, use_extrema, loss_mode=C.LOSS_PER_PIXEL,
                loss=loss, sizes=sizes, **kw)
        count = torch.zeros((), dtype=torch.int64, device=dev)
        wsum = logits.new_zeros((0,) if class_weight is None else (), dtype=acc)
    else:
        partials, counts, wsums = _launch(logits, target, tab, k, gamma, eps, ignore_index, use_extrema,
                                          loss_mode=C.LOSS_PARTIALS, sizes=sizes, **kw)
        wsum = C.weight_sum(wsums, class_weight)
        loss = C.reduce_partials(partials, counts, reduction, wsum)
        count = counts.sum(dtype=torch.int64)
    return loss, count, wsum, grad


@_tree_min_fwd.register_fake
def _(logits, target, tab, k, sizes, gamma, eps, ignore_index, reduction, use_extrema, single_pass, class_weight=None,
      pixel_weight=None):
    C.check_weight_ops(class_weight, pixel_weight, sizes[0], logits, target)
    N, V, H, W = logits.shape
    acc = C.acc_dtype(logits.dtype)
    loss = logits.new_empty((N, H, W) if reduction == "none" else (), dtype=acc)
    count = logits.new_empty((), dtype=torch.int64)
    wsum = logits.new_empty((0,) if class_weight is None else (), dtype=acc)
    grad = torch.empty_like(logits) if single_pass else logits.new_empty((0,))
    return loss, count, wsum, grad


@torch.library.custom_op("hss_triton::tree_min_bwd", mutates_args=())
def _tree_min_bwd(grad_out: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, tab: torch.Tensor,
              k: torch.Tensor, count: torch.Tensor, sizes: List[int], gamma: float, eps: float, ignore_index: int,
              reduction: str, use_extrema: bool, weight_sum: Optional[torch.Tensor] = None,
              class_weight: Optional[torch.Tensor] = None, pixel_weight: Optional[torch.Tensor] = None
              ) -> torch.Tensor:
    C.check_weight_ops(class_weight, pixel_weight, sizes[0], logits, target)
    grad = torch.empty_like(logits)
    go, mode = C.backward_grad_out(grad_out, count, reduction, C.acc_dtype(logits.dtype), weight_sum)
    _launch(logits, target, tab, k, gamma, eps, ignore_index, use_extrema, loss_mode=C.LOSS_NONE, grad=grad,
            grad_out=go, grad_mode=mode, sizes=sizes, class_weight=class_weight, pixel_weight=pixel_weight)
    return grad


@_tree_min_bwd.register_fake
def _(grad_out, logits, target, tab, k, count, sizes, gamma, eps, ignore_index, reduction, use_extrema,
      weight_sum=None, class_weight=None, pixel_weight=None):
    C.check_weight_ops(class_weight, pixel_weight, sizes[0], logits, target)
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, tab, k, sizes, gamma, eps, ignore_index, reduction, use_extrema, single_pass = inputs[:11]
    cw, pw = (tuple(inputs[11:]) + (None, None))[:2]  # the weights (absent: None)
    loss, count, wsum, grad = output
    ctx.opts = (sizes, gamma, eps, ignore_index, reduction, use_extrema, single_pass)
    if single_pass:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(logits, target, tab, k, count, wsum, cw, pw)


def _backward(ctx, g_loss, g_count, g_wsum, g_grad):
    sizes, gamma, eps, ignore_index, reduction, use_extrema, single_pass = ctx.opts
    if single_pass:
        (grad,) = ctx.saved_tensors
        dx = grad * g_loss.to(grad.dtype)  # a new tensor: the saved gradient is never written to
    else:
        logits, target, tab, k, count, wsum, cw, pw = ctx.saved_tensors
        dx = _tree_min_bwd(g_loss, logits, target, tab, k, count, sizes, gamma, eps, ignore_index, reduction,
                       use_extrema, wsum, cw, pw)
    return (dx,) + (None,) * 12


_tree_min_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("hss_triton::tree_min_up_fwd", mutates_args=())
def _tree_min_up_fwd(logits: torch.Tensor, target: torch.Tensor, tab: torch.Tensor, k: torch.Tensor, sizes: List[int],
                     gamma: float, eps: float, ignore_index: int, reduction: str, use_extrema: bool,
                     align_corners: bool, class_weight: Optional[torch.Tensor] = None,
                     pixel_weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of low-resolution node logits ``(N, V, h, w)`` bilinearly upsampled to the target's ``(H, W)``:
    → (loss, count of non-ignored pixels, weight sum (empty without class_weight))."""
    N = logits.shape[0]
    _, H, W = target.shape
    C.check_weight_ops(class_weight, pixel_weight, sizes[0], logits, target)
    acc = C.acc_dtype(logits.dtype)
    dev = logits.device
    args = (logits, target, tab, k, gamma, eps, ignore_index, use_extrema, sizes, align_corners)
    if reduction == "none":
        loss = torch.empty((N, H, W), dtype=acc, device=dev)
        _launch_up_fwd(*args, C.LOSS_PER_PIXEL, loss, class_weight, pixel_weight)
        count = torch.zeros((), dtype=torch.int64, device=dev)
        wsum = logits.new_zeros((0,) if class_weight is None else (), dtype=acc)
    else:
        partials, counts, wsums = _launch_up_fwd(*args, C.LOSS_PARTIALS, None, class_weight, pixel_weight)
        wsum = C.weight_sum(wsums, class_weight)
        loss = C.reduce_partials(partials, counts, reduction, wsum)
        count = counts.sum(dtype=torch.int64)
    return loss, count, wsum


@_tree_min_up_fwd.register_fake
def _(logits, target, tab, k, sizes, gamma, eps, ignore_index, reduction, use_extrema, align_corners,
      class_weight=None, pixel_weight=None):
    C.check_weight_ops(class_weight, pixel_weight, sizes[0], logits, target)
    N, H, W = target.shape
    acc = C.acc_dtype(logits.dtype)
    loss = logits.new_empty((N, H, W) if reduction == "none" else (), dtype=acc)
    wsum = logits.new_empty((0,) if class_weight is None else (), dtype=acc)
    return loss, logits.new_empty((), dtype=torch.int64), wsum


@torch.library.custom_op("hss_triton::tree_min_up_bwd", mutates_args=())
def _tree_min_up_bwd(grad_out: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, tab: torch.Tensor,
                     k: torch.Tensor, count: torch.Tensor, sizes: List[int], gamma: float, eps: float,
                     ignore_index: int, reduction: str, use_extrema: bool, align_corners: bool,
                     weight_sum: Optional[torch.Tensor] = None, class_weight: Optional[torch.Tensor] = None,
                     pixel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient of the low-resolution logits, in their dtype (and strides where dense)."""
    C.check_weight_ops(class_weight, pixel_weight, sizes[0], logits, target)
    grad = torch.empty_like(logits)
    go, mode = C.backward_grad_out(grad_out, count, reduction, C.acc_dtype(logits.dtype), weight_sum)
    _launch_up_bwd(grad, go, mode, logits, target, tab, k, gamma, eps, ignore_index, use_extrema, sizes,
                   align_corners, class_weight, pixel_weight)
    return grad


@_tree_min_up_bwd.register_fake
def _(grad_out, logits, target, tab, k, count, sizes, gamma, eps, ignore_index, reduction, use_extrema,
      align_corners, weight_sum=None, class_weight=None, pixel_weight=None):
    C.check_weight_ops(class_weight, pixel_weight, sizes[0], logits, target)
    return torch.empty_like(logits)


def _up_setup_context(ctx, inputs, output):
    logits, target, tab, k, sizes, gamma, eps, ignore_index, reduction, use_extrema, align_corners = inputs[:11]
    cw, pw = (tuple(inputs[11:]) + (None, None))[:2]  # the weights (absent: None)
    loss, count, wsum = output
    ctx.opts = (sizes, gamma, eps, ignore_index, reduction, use_extrema, align_corners)
    ctx.save_for_backward(logits, target, tab, k, count, wsum, cw, pw)


def _up_backward(ctx, g_loss, g_count, g_wsum):
    logits, target, tab, k, count, wsum, cw, pw = ctx.saved_tensors
    dx = _tree_min_up_bwd(g_loss, logits, target, tab, k, count, *ctx.opts, wsum, cw, pw)
    return (dx,) + (None,) * 12


_tree_min_up_fwd.register_autograd(_up_backward, setup_context=_up_setup_context)


# ----------------------------------------------------------------------------------- public
def _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, single_pass,
               use_extrema, with_grad=False, upsample=None, align_corners=False, class_weight=None, pixel_weight=None):
    C.check_call(logits, target, reduction, single_pass, "V")
    if upsample is not None:
        C.check_upsample(logits, target, upsample, single_pass)
    dev = logits.device
    acc = C.acc_dtype(logits.dtype)
    tab = tables.tree_min_table(tree, dev)
    k = tables.node_weight_vector(tree, scale, normalize, acc, dev)
    sizes = _tree_sizes(tree)
    cw, pw = C.weight_args(class_weight, pixel_weight, logits, target)
    if upsample is not None:
        loss, _, _ = _tree_min_up_fwd(logits, target, tab, k, sizes, float(gamma), float(eps), int(ignore_index),
                                      reduction, use_extrema, bool(align_corners), cw, pw)
        return loss
    if with_grad:
        with torch.no_grad():
            loss, _, _, grad = _tree_min_fwd(logits.detach(), target, tab, k, sizes, float(gamma), float(eps),
                                             int(ignore_index), reduction, use_extrema, True, cw, pw)
        return loss, grad
    loss, _, _, _ = _tree_min_fwd(logits, target, tab, k, sizes, float(gamma), float(eps), int(ignore_index),
                                  reduction, use_extrema, bool(single_pass), cw, pw)
    return loss


def tree_min_loss(logits: torch.Tensor, target: torch.Tensor, tree: Tree, gamma: float = 2.0, scale: float = 1.0,
                  eps: float = 0.0, normalize: str = "level", ignore_index: int = 255, reduction: str = "mean",
                  single_pass: bool = False, upsample: Optional[str] = None,
                  align_corners: bool = False, class_weight: Optional[torch.Tensor] = None,
                  pixel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Focal tree-min loss on the Triton backend (see ``hss_kernels.tree_min_loss``).

    ``logits``: ``(N, V, H, W)`` node logits, float16/bfloat16/float32/float64, any strides;
    ``target``: ``(N, H, W)`` integer leaf labels or ``ignore_index``. Loss in float32 (float64 for
    float64 logits), gradient in the logits' dtype. ``single_pass=True`` (``mean``/``sum`` only)
    writes the gradient during the forward; backward scales it by the incoming gradient (one
    elementwise pass; :func:`tree_min_loss_and_grad` skips it).

    ``upsample="bilinear"``: ``logits`` ``(N, V, h, w)`` at most the target's ``(N, H, W)`` size; the loss of
    the logits interpolated as ``F.interpolate(mode="bilinear", align_corners=align_corners)`` in float32
    (float64), fused: the forward interpolates each pixel's logits from its 2x2 stencil; the backward computes
    each full-resolution pixel's gradient row once, a band of rows at a time, into a scratch of at most 32 MiB
    and a tenth of the full-resolution logits (``_upsample.UP_BWD_SCRATCH_BYTES``), and gathers it onto each
    low-resolution element in a fixed order (no atomics, bitwise reproducible); neither the full-resolution
    logits nor their whole gradient is stored. Not with ``single_pass``.

    ``class_weight`` (L, float, by leaf label) and ``pixel_weight`` (the target's ``(N, H, W)``, float) are fused
    into the kernels (docs/MATH.md §6.6): each labelled pixel's loss and gradient times cw[y] * pw[p], ``"mean"``
    divided by the sum of the labelled pixels' class weights (their count without class weights); cw is read
    as an L-value table, pw once per labelled pixel (made contiguous first), forward and backward. Also with
    ``single_pass`` and ``upsample``.

    Raises ValueError for a non-4-D input, ``single_pass`` with ``reduction="none"`` or with ``upsample``, an
    ``upsample`` other than None or "bilinear", or a target smaller than the logits or of another batch; the
    options are the public API's to check.
    """
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, single_pass,
                      True, upsample=upsample, align_corners=align_corners, class_weight=class_weight,
                      pixel_weight=pixel_weight)


def tree_bce_loss(logits: torch.Tensor, target: torch.Tensor, tree: Tree, gamma: float = 0.0, scale: float = 1.0,
                  eps: float = 0.0, normalize: str = "level", ignore_index: int = 255, reduction: str = "mean",
                  single_pass: bool = False, upsample: Optional[str] = None,
                  align_corners: bool = False, class_weight: Optional[torch.Tensor] = None,
                  pixel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Multi-label (focal) BCE over every node on the Triton backend (see ``hss_kernels.tree_bce_loss``).
    Same arguments (``upsample`` and the weights fused the same way), dtypes and errors as
    :func:`tree_min_loss`."""
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, single_pass,
                      False, upsample=upsample, align_corners=align_corners, class_weight=class_weight,
                      pixel_weight=pixel_weight)


tree_min_loss.takes_upsample = True  # functional.py passes upsample= / align_corners= through
tree_bce_loss.takes_upsample = True
tree_min_loss.takes_weights = True  # ... and class_weight= / pixel_weight= (fused in the kernels)
tree_bce_loss.takes_weights = True


def tree_min_loss_and_grad(logits: torch.Tensor, target: torch.Tensor, tree: Tree, gamma: float = 2.0,
                           scale: float = 1.0, eps: float = 0.0, normalize: str = "level", ignore_index: int = 255,
                           reduction: str = "mean", class_weight: Optional[torch.Tensor] = None,
                           pixel_weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, d loss / d logits)`` in one pass over the logits, outside autograd (docs/MATH.md §5.6); then
    ``logits.backward(grad)``. ``reduction``: ``mean`` or ``sum``. Arguments (the weights included) as
    :func:`tree_min_loss`."""
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, True, True,
                      with_grad=True, class_weight=class_weight, pixel_weight=pixel_weight)


def tree_bce_loss_and_grad(logits: torch.Tensor, target: torch.Tensor, tree: Tree, gamma: float = 0.0,
                           scale: float = 1.0, eps: float = 0.0, normalize: str = "level", ignore_index: int = 255,
                           reduction: str = "mean", class_weight: Optional[torch.Tensor] = None,
                           pixel_weight: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Single-pass ``(loss, gradient)`` of :func:`tree_bce_loss`, as :func:`tree_min_loss_and_grad`."""
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, True, False,
                      with_grad=True, class_weight=class_weight, pixel_weight=pixel_weight)
