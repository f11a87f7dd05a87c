"""Hierarchical softmax loss (docs/MATH.md §2) in Triton: one kernel, three modes.

Per pixel with label y, leaves j, level weights w_d and the nested groups G_1(y) ⊇ ... ⊇ G_D(y):

    lse   = log Σ_j e^{z_j}            lse_d = log Σ_{j ∈ G_d(y)} e^{z_j}
    ℓ     = Σ_d w_d (lse − lse_d)       (eps > 0: ℓ = −Σ_d w_d log(e^{lse_d − lse} + eps))

Gradient, with p_j = e^{z_j − lse} and d_j the deepest level whose group holds j (0 if none), P_d = e^{lse_d − lse}:

    eps = 0:  ∂ℓ/∂z_j = W p_j − e^{z_j − lse_{d_j}} F_{d_j} = e^{z_j − lse_{d_j}} (W P_{d_j} − F_{d_j}),
              W = Σ_d w_d,
              F_k = Σ_{d ≤ k} w_d e^{lse_k − lse_d} = E_k F_{k−1} + w_k,   P_k = E_k P_{k−1},
              E_k = e^{lse_k − lse_{k−1}}   (lse_0 = lse, P_0 = 1, F_0 = 0)
              (lse_k ≤ lse_{k−1} because the groups are nested: no factor ever exceeds 1, and z_j ≤ lse_{d_j})
    eps > 0:  ∂ℓ/∂z_j = p_j (A − B_{d_j}),
              A = Σ_d w_d P_d / (P_d + eps),  B_k = Σ_{d ≤ k} w_d / (P_d + eps)

Either way one exponential per element: e^{z_j − lse_{d_j}} (eps = 0) or p_j (eps > 0), times a per-pixel
coefficient that d_j selects.

Shape of ``_hierarchical_softmax_kernel`` (segmentation: millions of pixels, tens of leaves): a program
owns BLOCK_P pixels, a few consecutive ones per thread, and walks the leaves in chunks of BLOCK_C held in
that thread's registers, so no reduction over channels leaves a thread. The forward keeps an online
log-sum-exp (a running max, rescaling the sums once per chunk: one exp per element) and, for levels
1 .. D-1, the group sums of the same exponentials; level D's group is the label alone, so lse_D = z_y
(one gathered load). Where a group's sum underflows next to the pixel's max (sum < TINY), a cold branch
redoes that group with its own max (docs/MATH.md §2.6). NCHW logits are read 16 bytes of pixels per
thread and channel row; channels_last one channel per chunk. H and W form one pixel axis on a
(pixel blocks, N) grid when the strides allow (always for NCHW and channels_last).

Modes:
* forward: lse and lse_1..lse_D, written as the saved statistics ``(D + 1, P)``, and the loss (per
  pixel, or per-program partial sums for the reduction);
* backward: reads the logits and the statistics, writes the gradient (one exp per element);
* single pass: the forward that also writes the gradient (docs/MATH.md §5.6), reading the program's
  logits a second time (from cache) for it.

Low-resolution logits (``upsample="bilinear"``, docs/MATH.md §6): the forward runs with UPSAMPLE over the
target's pixels, each logit the interpolation of the pixel's 2x2 stencil (``_up_lse``: programs within one
image, int32 stencil offsets, each leaf a [pixels] vector, one exponential per element); the backward is
``_hierarchical_softmax_up_bwd_kernel``: each full-resolution pixel's gradient row is computed once (per
program whose tile holds it; the halo twice), split by its four weights into per-lane sums that a lane
shift adds up (no atomics). Neither the full-resolution logits nor their gradient is stored. (The tree losses'
banded form, a rows kernel and ``_upsample``'s gather, models slower here: docs/MATH.md §6.4.)
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Tuple

import numpy as np
import torch
import triton
import triton.language as tl

from .. import tables
from ..tree import Tree
from . import _common as C

__all__ = ["hierarchical_softmax_loss", "hierarchical_softmax_loss_and_grad"]


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _leaves(x_ptr, c0, sxc, xpix, pmask, OTHER: tl.constexpr, L: tl.constexpr, BLOCK_C: tl.constexpr, ACC: tl.constexpr):
    """Leaves c0 .. c0 + BLOCK_C - 1 of the program's pixels, [BLOCK_C, BLOCK_P] in ACC: (leaf ids, their
    mask, logits), OTHER past the last leaf and past the last pixel. For the cold branch's loops: the hot
    loops load inline (through a call, the sm_90 forward costs 6 % more instructions)."""
    c = c0 + tl.arange(0, BLOCK_C)
    cmask = c < L
    x = tl.load(x_ptr + c.to(tl.int64)[:, None] * sxc + xpix[None, :],
                mask=cmask[:, None] & pmask[None, :], other=OTHER).to(ACC)
    return c, cmask, x


@triton.jit
def _element_grad(x, lse, coef, sel_r, sel_f, HAS_EPS: tl.constexpr, FAST: tl.constexpr):
    """dl/dz of the [chunk, pixels] logits x (before grad_output), one exponential per element (module
    docstring): e^{z_j − lse_{d_j}} (W P_{d_j} − F_{d_j}) with sel_r = lse_{d_j} log2(e) and sel_f = W P_{d_j} −
    F_{d_j} (lse log2(e) and W where no level holds j), or p_j (A − B_{d_j}) for eps > 0 with sel_f = B_{d_j}
    (0 where none), as selected per element by its deepest level (:func:`_grad_sel_init`)."""
    if HAS_EPS:
        prob = C.exp2(x * LOG2E - (lse * LOG2E)[None, :], FAST)
        return prob * (coef[None, :] - sel_f)
    return C.exp2(x * LOG2E - sel_r, FAST) * sel_f


@triton.jit
def _grad_sel_init(lse, coef, BLOCK_C: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
                   HAS_EPS: tl.constexpr):
    """The [BLOCK_C, BLOCK] selections (sel_r, sel_f) of :func:`_element_grad` for an element that no level's
    group holds: (lse log2(e), W) for eps = 0, (unused, 0) for eps > 0. ``lse``, ``coef``: [BLOCK] vectors
    (W or A) or [1, BLOCK] rows."""
    zero = tl.zeros([BLOCK_C, BLOCK], dtype=ACC)
    if HAS_EPS:
        return zero, zero
    return zero + lse * LOG2E, zero + coef


@triton.jit
def _grad_coefs(lse, lse2, w_ptr, eps, dl, D: tl.constexpr, DP: tl.constexpr, BLOCK: tl.constexpr,
                ACC: tl.constexpr, HAS_EPS: tl.constexpr):
    """Per pixel, from lse and the rows lse_d of lse2 ([DP, BLOCK]): the gradient's coefficient W (A for
    eps > 0) and the rows W P_d − F_d (B_d for eps > 0) that the deepest level holding a leaf selects (module
    docstring)."""
    zero = tl.zeros([BLOCK], dtype=ACC)
    F = zero
    A = zero
    Bk = zero
    wsum = zero
    for d in tl.static_range(D):
        wsum += tl.load(w_ptr + d).to(ACC)
    Pk = zero + 1.0
    lse_prev = lse
    F2 = tl.zeros([DP, BLOCK], dtype=ACC)
    for d in tl.static_range(D):
        lse_d = tl.sum(tl.where((dl == d)[:, None], lse2, 0.0), axis=0)
        w_d = tl.load(w_ptr + d).to(ACC)
        if HAS_EPS:
            P_d = tl.exp(lse_d - lse)
            A += w_d * P_d / (P_d + eps)
            Bk += w_d / (P_d + eps)
            F2 = tl.where((dl == d)[:, None], Bk[None, :], F2)
        else:
            E = tl.exp(lse_d - lse_prev)
            F = E * F + w_d
            Pk = E * Pk
            lse_prev = lse_d
            F2 = tl.where((dl == d)[:, None], (wsum * Pk - F)[None, :], F2)
    coef = A if HAS_EPS else wsum
    return coef, F2


@triton.jit
def _up_chunk(xk, sxc, c0, u00, u01, u10, u11, w00, w01, w10, w11, m, s, sd, gy, lg_ptr, K: tl.constexpr,
              L: tl.constexpr, D: tl.constexpr, ACC: tl.constexpr, FAST: tl.constexpr):
    """Leaves c0 .. c0 + K - 1 (the first at scalar pointer xk) of the upsampled forward's online sums, in
    base-2 units (the stencil's four weights w00 .. w11 carry log2(e)): their values (interpolated with one
    multiply and three FMAs, K registers per pixel; F.interpolate's order would take six flops), the new
    max, the sums rescaled to it once, then one exponential per leaf: the max m, the sum s over all leaves,
    and the tuple sd of the sums over the label's groups at levels 1 .. D-1 (gy: their ids), one [BLOCK_P]
    row each (a [levels, pixels] tile would cost a shared-memory exchange per leaf). Returns them and the
    pointer past the chunk."""
    xs = ()
    for k in tl.static_range(K):
        x00 = tl.load(xk + u00).to(ACC)  # sm90: logits
        x01 = tl.load(xk + u01).to(ACC)  # sm90: logits
        x10 = tl.load(xk + u10).to(ACC)  # sm90: logits
        x11 = tl.load(xk + u11).to(ACC)  # sm90: logits
        xs = xs + (w00 * x00 + w01 * x01 + w10 * x10 + w11 * x11,)
        xk += sxc
    mx = m
    for k in tl.static_range(K):
        mx = tl.maximum(mx, xs[k])
    alpha = C.exp2(m - mx, FAST)
    s = s * alpha
    out = ()
    for d in tl.static_range(D - 1):
        out = out + (sd[d] * alpha,)
    for k in tl.static_range(K):
        e = C.exp2(xs[k] - mx, FAST)
        s += e
        acc = ()
        for d in tl.static_range(D - 1):
            acc = acc + (tl.where(tl.load(lg_ptr + d * L + c0 + k) == gy[d], out[d] + e, out[d]),)
        out = acc
    return mx, s, out, xk


@triton.jit
def _up_lse(xi, sxc, u00, u01, u10, u11, lx, ly, y, pmask, lg_ptr, dl, L: tl.constexpr, D: tl.constexpr,
            DP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr, TINY: tl.constexpr,
            FAST: tl.constexpr):
    """The upsampled forward's statistics: lse and the rows lse_1 .. lse_D of lse2 ([DP, BLOCK_P]) of the
    program's pixels, whose 2x2 stencils (offsets u00 .. u11, weights lx, ly) lie in the image at scalar
    pointer xi. The leaves go by in chunks of BLOCK_C (the rest in a last, shorter one),
    each through :func:`_up_chunk`; a group whose sum underflows next to the pixel's max gets the cold branch,
    as at the labels' size."""
    gy = ()
    sd = ()
    for d in tl.static_range(D - 1):
        gy = gy + (tl.load(lg_ptr + d * L + y),)
        sd = sd + (tl.zeros([BLOCK_P], dtype=ACC),)
    wx0 = 1.0 - lx
    wy0 = 1.0 - ly
    wy0l = wy0 * LOG2E
    wy1l = ly * LOG2E
    w00 = wy0l * wx0
    w01 = wy0l * lx
    w10 = wy1l * wx0
    w11 = wy1l * lx
    m = tl.full([BLOCK_P], float("-inf"), ACC)
    s = tl.zeros([BLOCK_P], dtype=ACC)
    xk = xi
    for c0 in range(0, L - L % BLOCK_C, BLOCK_C):  # sm90: trips=L // BLOCK_C
        m, s, sd, xk = _up_chunk(xk, sxc, c0, u00, u01, u10, u11, w00, w01, w10, w11, m, s, sd, gy, lg_ptr,
                                 BLOCK_C, L, D, ACC, FAST)
    if L % BLOCK_C > 0:
        m, s, sd, xk = _up_chunk(xk, sxc, L - L % BLOCK_C, u00, u01, u10, u11, w00, w01, w10, w11, m, s, sd, gy,
                                 lg_ptr, L % BLOCK_C, L, D, ACC, FAST)
    lse = (m + tl.log2(s)) * LN2
    far = tl.zeros([BLOCK_P], dtype=tl.int32)
    for d in tl.static_range(D - 1):
        far = far | ((sd[d] < TINY) & pmask).to(tl.int32)
    zy = C.lerp_at(xi + y * sxc, u00, u01, u10, u11, wx0, lx, wy0, ly, ACC)  # level D: the label alone
    lse2 = tl.where((dl == D - 1)[:, None], zy[None, :], 0.0)
    for d in tl.static_range(D - 1):
        lse_d = (m + tl.log2(tl.maximum(sd[d], TINY))) * LN2
        if tl.max(far, axis=0) > 0:  # sm90: cold
            # A group whose terms underflow next to the pixel's max: its own max, then its own sum (natural
            # units).
            mg = tl.full([BLOCK_P], float("-inf"), ACC)
            xk = xi
            for c in range(0, L):  # sm90: trips=0
                x = C.lerp_at(xk, u00, u01, u10, u11, wx0, lx, wy0, ly, ACC)
                mg = tl.where(tl.load(lg_ptr + d * L + c) == gy[d], tl.maximum(mg, x), mg)
                xk += sxc
            sg = tl.zeros([BLOCK_P], dtype=ACC)
            xk = xi
            for c in range(0, L):  # sm90: trips=0
                x = C.lerp_at(xk, u00, u01, u10, u11, wx0, lx, wy0, ly, ACC)
                sg += tl.where(tl.load(lg_ptr + d * L + c) == gy[d], tl.exp(x - mg), 0.0)
                xk += sxc
            lse_d = tl.where((sd[d] < TINY) & pmask, mg + tl.log(sg), lse_d)
        lse2 = tl.where((dl == d)[:, None], lse_d[None, :], lse2)
    return lse, lse2


@triton.jit
def _hierarchical_softmax_kernel(
    x_ptr, t_ptr, lg_ptr, w_ptr, stats_ptr, ui_ptr, ul_ptr, loss_ptr, part_ptr, cnt_ptr, cw_ptr, pw_ptr, ws_ptr,
    g_ptr, go_ptr,
    P, HW, W,
    sxn, sxc, sxh, sxw,
    stn, sth, stw,
    sgn, sgc, sgh, sgw,
    son, soh, sow,
    eps, ignore_index,
    L: tl.constexpr, D: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
    HAS_EPS: tl.constexpr, COMPUTE_STATS: tl.constexpr, WRITE_STATS: tl.constexpr,
    LOSS_MODE: tl.constexpr, GRAD_MODE: tl.constexpr, TINY: tl.constexpr, DP: tl.constexpr,
    FLAT: tl.constexpr, FAST: tl.constexpr, UPSAMPLE: tl.constexpr, HAS_CW: tl.constexpr, HAS_PW: tl.constexpr,
    OFF64: tl.constexpr, SXC: tl.constexpr = 0,
):
    # A program owns BLOCK_P pixels, a few consecutive ones per thread (one 16-byte load per channel
    # row); the channels go by in chunks of BLOCK_C held in the thread's registers, so every reduction
    # over channels stays inside a thread. Levels 1 .. D-1 are rows of [DP, BLOCK_P] tiles (also
    # in-thread); level D's group is the label alone (lse_D = z_y, gathered).
    # UPSAMPLE (forward only, 1-D grid): P, HW and W are the target's; every logit of a pixel is the
    # interpolation of its 2x2 stencil in the low-resolution logits (ui_ptr, ul_ptr: the per-axis tables); SXC > 0:
    # their channel stride, compiled in (_common.up_sxc).
    if UPSAMPLE:
        pid, n, p, pmask, h, w = C.up_image_pixels(P, HW, W, BLOCK_P)
        tpix = n * stn + h.to(tl.int64) * sth + w.to(tl.int64) * stw
        u00, u01, u10, u11, lx, ly = C.up_stencil(ui_ptr, ul_ptr, h, w, HW // W, W, sxh, sxw, OFF64)
        xi = x_ptr + n * sxn  # the image's logits
    else:
        pid, p, pmask, xpix, tpix, gpix, opix = C.pixel_offsets(P, HW, W, sxn, sxh, sxw, stn, sth, stw, sgn, sgh,
                                                               sgw, son, soh, sow, BLOCK_P, FLAT, BLOCK_P)
    P64 = tl.zeros_like(p) + P  # (d + 1) * P in 64 bits: the statistics rows may pass 2^31 in all
    y, valid, bad = C.load_labels(t_ptr + tpix, pmask, ignore_index, L)

    dl = tl.arange(0, DP)
    dmask = dl < D
    w2 = tl.load(w_ptr + dl, mask=dmask, other=0.0).to(ACC)[:, None]  # [DP, 1]
    # The label's group id at each level, one row per level (rows past D: -1, no channel's id).
    gy = tl.full([DP, BLOCK_P], -1, tl.int32)
    for d in tl.static_range(D):
        gy = tl.where((dl == d)[:, None], tl.load(lg_ptr + d * L + y, mask=pmask, other=-1)[None, :], gy)

    if COMPUTE_STATS:
        if UPSAMPLE:
            lse, lse2 = _up_lse(xi, SXC if SXC > 0 else sxc, u00, u01, u10, u11, lx, ly, y, pmask, lg_ptr, dl, L, D,
                                DP, BLOCK_C, BLOCK_P, ACC, TINY, FAST)
        else:
            m = tl.full([BLOCK_P], float("-inf"), ACC)
            s = tl.zeros([BLOCK_P], dtype=ACC)
            sd = tl.zeros([DP, BLOCK_P], dtype=ACC)
            for c0 in range(0, L, BLOCK_C):  # sm90: trips=cdiv(L, BLOCK_C)
                c = c0 + tl.arange(0, BLOCK_C)
                cmask = c < L
                x = tl.load(x_ptr + c.to(tl.int64)[:, None] * sxc + xpix[None, :],  # sm90: logits
                            mask=cmask[:, None] & pmask[None, :], other=float("-inf")).to(ACC)
                m_new = tl.maximum(m, tl.max(x, axis=0))
                alpha = C.exp2((m - m_new) * LOG2E, FAST)
                e = C.exp2(x * LOG2E - (m_new * LOG2E)[None, :], FAST)
                s = s * alpha + tl.sum(e, axis=0)
                sd = sd * alpha[None, :]
                for d in tl.static_range(D - 1):
                    g_c = tl.load(lg_ptr + d * L + c, mask=cmask, other=-2)
                    g_y = tl.sum(tl.where((dl == d)[:, None], gy, 0), axis=0)
                    part = tl.sum(tl.where(g_c[:, None] == g_y[None, :], e, 0.0), axis=0)
                    sd = tl.where((dl == d)[:, None], sd + part[None, :], sd)
                m = m_new
            lse = m + tl.log(s)
            zy = tl.load(x_ptr + y * sxc + xpix, mask=pmask, other=0.0).to(ACC)
            lse2 = m[None, :] + tl.log(tl.maximum(sd, TINY))
            far = (sd < TINY) & (dl < D - 1)[:, None] & pmask[None, :]
            # Levels first (inside a thread), then across the block.
            if tl.max(tl.max(far.to(tl.int32), axis=0), axis=0) > 0:  # sm90: cold
                # A group whose terms underflow next to the pixel's max: its own max, then its own sum.
                mg = tl.full([DP, BLOCK_P], float("-inf"), ACC)
                for c0 in range(0, L, BLOCK_C):  # sm90: trips=0
                    c, cmask, x = _leaves(x_ptr, c0, sxc, xpix, pmask, float("-inf"), L, BLOCK_C, ACC)
                    for d in tl.static_range(D - 1):
                        g_c = tl.load(lg_ptr + d * L + c, mask=cmask, other=-2)
                        g_y = tl.sum(tl.where((dl == d)[:, None], gy, 0), axis=0)
                        part = tl.max(tl.where(g_c[:, None] == g_y[None, :], x, float("-inf")), axis=0)
                        mg = tl.where((dl == d)[:, None], tl.maximum(mg, part[None, :]), mg)
                sg = tl.zeros([DP, BLOCK_P], dtype=ACC)
                for c0 in range(0, L, BLOCK_C):  # sm90: trips=0
                    c, cmask, x = _leaves(x_ptr, c0, sxc, xpix, pmask, float("-inf"), L, BLOCK_C, ACC)
                    for d in tl.static_range(D - 1):
                        g_c = tl.load(lg_ptr + d * L + c, mask=cmask, other=-2)
                        g_y = tl.sum(tl.where((dl == d)[:, None], gy, 0), axis=0)
                        m_d = tl.sum(tl.where((dl == d)[:, None], mg, 0.0), axis=0)
                        part = tl.sum(tl.where(g_c[:, None] == g_y[None, :], tl.exp(x - m_d[None, :]), 0.0), axis=0)
                        sg = tl.where((dl == d)[:, None], sg + part[None, :], sg)
                lse2 = tl.where(far, mg + tl.log(sg), lse2)
            lse2 = tl.where((dl == D - 1)[:, None], zy[None, :], lse2)
        if WRITE_STATS:
            tl.store(stats_ptr + p, lse, mask=pmask)
            tl.store(stats_ptr + (dl[:, None] + 1) * P64[None, :] + p[None, :], lse2,
                     mask=dmask[:, None] & pmask[None, :])
    else:
        lse = tl.load(stats_ptr + p, mask=pmask, other=0.0)
        lse2 = tl.load(stats_ptr + (dl[:, None] + 1) * P64[None, :] + p[None, :],
                       mask=dmask[:, None] & pmask[None, :], other=0.0)

    if LOSS_MODE != 0:
        if HAS_EPS:
            loss = tl.sum(-w2 * tl.log(tl.exp(lse2 - lse[None, :]) + eps), axis=0)
        else:
            loss = tl.sum(w2 * (lse[None, :] - lse2), axis=0)
        C.store_loss(loss, valid, bad, p, pmask, pid, loss_ptr, part_ptr, cnt_ptr, LOSS_MODE, y, cw_ptr, pw_ptr,
                     ws_ptr, ACC, HAS_CW, HAS_PW)

    if GRAD_MODE != 0:
        # Per pixel: lse_d and F_d (B_d for eps > 0) per level, then per element the deepest level
        # whose group holds it selects them.
        if GRAD_MODE == 1:
            gsc = tl.zeros([BLOCK_P], dtype=ACC) + tl.load(go_ptr).to(ACC)
        else:
            gsc = tl.load(go_ptr + opix, mask=pmask, other=0.0).to(ACC)
        gsc = C.weigh(gsc, y, p, valid, cw_ptr, pw_ptr, ACC, HAS_CW, HAS_PW)  # the pixel's weight w_p
        gsc = tl.where(valid, tl.where(bad, float("nan"), gsc), 0.0)
        coef, F2 = _grad_coefs(lse, lse2, w_ptr, eps, dl, D, DP, BLOCK_P, ACC, HAS_EPS)
        for c0 in range(0, L, BLOCK_C):  # sm90: trips=cdiv(L, BLOCK_C)
            c = c0 + tl.arange(0, BLOCK_C)
            cmask = c < L
            mask2 = cmask[:, None] & pmask[None, :]
            x = tl.load(x_ptr + c.to(tl.int64)[:, None] * sxc + xpix[None, :], mask=mask2,  # sm90: logits
                        other=0.0).to(ACC)
            sel_r, sel_f = _grad_sel_init(lse, coef, BLOCK_C, BLOCK_P, ACC, HAS_EPS)
            for d in tl.static_range(D):
                g_c = tl.load(lg_ptr + d * L + c, mask=cmask, other=-2)
                g_y = tl.sum(tl.where((dl == d)[:, None], gy, 0), axis=0)
                in_g = g_c[:, None] == g_y[None, :]
                if not HAS_EPS:
                    sel_r = tl.where(in_g, tl.sum(tl.where((dl == d)[:, None], lse2 * LOG2E, 0.0), axis=0)[None, :], sel_r)
                sel_f = tl.where(in_g, tl.sum(tl.where((dl == d)[:, None], F2, 0.0), axis=0)[None, :], sel_f)
            grad = _element_grad(x, lse, coef, sel_r, sel_f, HAS_EPS, FAST)
            # The difference first, then the scale: both passes round the same terms the same way.
            grad = tl.where(valid[None, :], grad * gsc[None, :], 0.0)  # an ignored pixel's NaN logits give 0, not 0 * NaN
            tl.store(g_ptr + c.to(tl.int64)[:, None] * sgc + gpix[None, :], grad.to(g_ptr.dtype.element_ty),
                     mask=mask2)


@triton.jit
def _up_bwd_chunk(c0, KW, x_ptr, sxc, u00, u01, u10, u11, lane, own, ys, yn, ny, xs, xn, nx, ul_ptr, Hh, W, n, t_ptr,
                  stn, sth, stw, ignore_index, stats_ptr, P64, go_ptr, son, soh, sow, g1, cw_ptr, pw_ptr, lvl_ptr,
                  w_ptr, wsum, eps, xe, ye, q, g_ptr, sgn, sgc, sgh, sgw, i64, j64, L: tl.constexpr, D: tl.constexpr,
                  NCHUNK: tl.constexpr, BLOCK_C: tl.constexpr, TJ: tl.constexpr, BLOCK_Q: tl.constexpr,
                  ACC: tl.constexpr, HAS_EPS: tl.constexpr, GRAD_MODE: tl.constexpr, FAST: tl.constexpr,
                  HAS_CW: tl.constexpr, HAS_PW: tl.constexpr):
    """Leaves c0 .. c0 + BLOCK_C - 1 (those below L) of :func:`_hierarchical_softmax_up_bwd_kernel`'s tile: their
    stencils loaded once, every pixel of the lanes' runs through them, the four run sums shifted into the lanes'
    elements and stored. KW: the chunk's word in the packed level table (NCHUNK words per label)."""
    # Lane q's left neighbour (q - 1) and the one above (q - TJ), for the shift (halo lanes read any lane).
    qc = tl.zeros([BLOCK_C, BLOCK_Q], dtype=tl.int32) + q
    left = tl.maximum(qc - 1, 0)
    up = tl.maximum(qc - TJ, 0)
    c = (c0 + tl.arange(0, BLOCK_C))[:, None]
    cmask = c < L
    xc = x_ptr + c.to(tl.int64) * sxc
    m2 = cmask & lane
    x00 = tl.load(xc + u00, mask=m2, other=0.0).to(ACC)  # sm90: logits
    x01 = tl.load(xc + u01, mask=m2, other=0.0).to(ACC)  # sm90: logits
    x10 = tl.load(xc + u10, mask=m2, other=0.0).to(ACC)  # sm90: logits
    x11 = tl.load(xc + u11, mask=m2, other=0.0).to(ACC)  # sm90: logits
    a00 = tl.zeros([BLOCK_C, BLOCK_Q], dtype=ACC)
    a01 = tl.zeros([BLOCK_C, BLOCK_Q], dtype=ACC)
    a10 = tl.zeros([BLOCK_C, BLOCK_Q], dtype=ACC)
    a11 = tl.zeros([BLOCK_C, BLOCK_Q], dtype=ACC)
    ry = 0
    while ry < ny:  # sm90: trips=cdiv(H, h) + cdiv(H, 2 * h) / cdiv(h, TI - 1)
        yok = lane & (ry < yn)
        Y = tl.where(yok, ys + ry, 0).to(tl.int64)
        ly = tl.load(ul_ptr + Y, mask=yok, other=0.0)
        # The stencil's two columns interpolated at the row, times log2(e): z log2(e) is then one lerp.
        r0 = ((1.0 - ly) * x00 + ly * x10) * LOG2E
        r1 = ((1.0 - ly) * x01 + ly * x11) * LOG2E
        t0 = tl.zeros([BLOCK_C, BLOCK_Q], dtype=ACC)
        t1 = tl.zeros([BLOCK_C, BLOCK_Q], dtype=ACC)
        rx = 0
        while rx < nx:  # sm90: trips=cdiv(W, w) + cdiv(W, 2 * w) / cdiv(w, TJ - 1)
            ok = yok & (rx < xn)
            X = tl.where(ok, xs + rx, 0).to(tl.int64)
            lx = tl.load(ul_ptr + Hh + X, mask=ok, other=0.0)
            p = (n * Hh + Y) * W + X
            y, valid, bad = C.load_labels(t_ptr + n * stn + Y * sth + X * stw, ok, ignore_index, L)
            lse = tl.load(stats_ptr + p, mask=ok, other=0.0)
            if GRAD_MODE == 1:
                gsc = tl.zeros([1, BLOCK_Q], dtype=ACC) + g1
            else:
                gsc = tl.load(go_ptr + n * son + Y * soh + X * sow, mask=ok, other=0.0).to(ACC)
            gsc = C.weigh(gsc, y, p, valid, cw_ptr, pw_ptr, ACC, HAS_CW, HAS_PW)  # the pixel's weight w_p
            gsc = tl.where(valid, tl.where(bad, float("nan"), gsc), 0.0)
            # The deepest level whose group holds both the label and the leaf (-1: none) selects, per
            # element, lse_d log2(e) and (W P_d − F_d) times grad_output (B_d for eps > 0), built level by
            # level (module docstring). The table packs, per label, the chunk's BLOCK_C levels into one
            # word (byte k: leaf c0 + k; 255: none), read per pixel and unpacked per element.
            pk = tl.load(lvl_ptr + y * NCHUNK + KW, mask=ok, other=0)
            dj = ((pk >> (8 * (c - c0)).to(pk.dtype)) & 255).to(tl.int32)
            sel_r, sel_f = _grad_sel_init(lse, wsum * gsc, BLOCK_C, BLOCK_Q, ACC, HAS_EPS)
            F = tl.zeros([1, BLOCK_Q], dtype=ACC)
            A = tl.zeros([1, BLOCK_Q], dtype=ACC)
            Pk = F + 1.0
            lse_prev = lse
            for d in tl.static_range(D):
                lse_d = tl.load(stats_ptr + (d + 1) * P64 + p, mask=ok, other=0.0)
                w_d = tl.load(w_ptr + d).to(ACC)
                if HAS_EPS:
                    P_d = C.exp2((lse_d - lse) * LOG2E, FAST)
                    A += w_d * P_d / (P_d + eps)
                    F += w_d / (P_d + eps)
                    sel_f = tl.where(dj == d, F * gsc, sel_f)
                else:
                    E = C.exp2((lse_d - lse_prev) * LOG2E, FAST)
                    F = E * F + w_d
                    Pk = E * Pk
                    lse_prev = lse_d
                    sel_r = tl.where(dj == d, lse_d * LOG2E, sel_r)
                    sel_f = tl.where(dj == d, (wsum * Pk - F) * gsc, sel_f)
            # The pixel's logits times log2(e), from the row's two columns (the forward's values up to
            # rounding: it interpolates the columns first).
            zl = (1.0 - lx) * r0 + lx * r1
            if HAS_EPS:
                grad = C.exp2(zl - lse * LOG2E, FAST) * (A * gsc - sel_f)
            else:
                grad = C.exp2(zl - sel_r, FAST) * sel_f
            # 0 at ignored pixels and off the run (whatever their logits); a zero weight times a NaN
            # gradient stays NaN, as in F.interpolate's backward.
            grad = tl.where(valid, grad, 0.0)
            t0 += (1.0 - lx) * grad
            t1 += lx * grad
            rx += 1
        a00 += (1.0 - ly) * t0
        a01 += (1.0 - ly) * t1
        a10 += ly * t0
        a11 += ly * t1
        ry += 1
    # The last column's (row's) second weight belongs to the lane itself.
    a00 = tl.where(xe, a00 + a01, a00)
    a10 = tl.where(xe, a10 + a11, a10)
    a00 = tl.where(ye, a00 + a10, a00)
    a01 = tl.where(ye, a01 + a11, a01)
    a01 = tl.where(xe, 0.0, a01)
    a10 = tl.where(ye, 0.0, a10)
    a11 = tl.where(xe | ye, 0.0, a11)
    row = a10 + tl.gather(a11, left, 1)  # to (i + 1, j), from the lanes (i, j) and (i, j - 1)
    acc = a00 + tl.gather(a01, left, 1)
    acc += tl.gather(row, up, 1)
    tl.store(g_ptr + n * sgn + c.to(tl.int64) * sgc + i64 * sgh + j64 * sgw, acc.to(g_ptr.dtype.element_ty),
             mask=cmask & own)


@triton.jit
def _hierarchical_softmax_up_bwd_kernel(
    x_ptr, t_ptr, lvl_ptr, w_ptr, stats_ptr, ul_ptr, run_ptr, g_ptr, go_ptr, cw_ptr, pw_ptr,
    P, Hh, W, hl, wl, TILES_I, TILES_J,
    sxn, sxc, sxh, sxw,
    stn, sth, stw,
    sgn, sgc, sgh, sgw,
    son, soh, sow,
    eps, ignore_index,
    L: tl.constexpr, D: tl.constexpr, NCHUNK: tl.constexpr,
    BLOCK_C: tl.constexpr, TI: tl.constexpr, TJ: tl.constexpr, ACC: tl.constexpr,
    HAS_EPS: tl.constexpr, GRAD_MODE: tl.constexpr, FAST: tl.constexpr, HAS_CW: tl.constexpr,
    HAS_PW: tl.constexpr, BLOCK_CR: tl.constexpr = 1,
):
    # The backward of the upsampled loss (docs/MATH.md §6.4). Every full-resolution pixel (Y, X) belongs to
    # the low-resolution pixel (i, j) = (i0(Y), i0(X)) of its stencil's first row and column: its "run" (per
    # axis the outputs whose i0 is i, a contiguous window of the tables). All pixels of a run read the same
    # 2x2 stencil z[i .. i1, j .. j1], loaded once per chunk of leaves; each pixel's gradient row g is
    # computed once and split by its weights into four sums per run: a00 (to (i, j)), a01 (to (i, j + 1)),
    # a10 (to (i + 1, j)), a11 (to (i + 1, j + 1)), over the run's columns first (t0, t1), then its rows.
    # Element (i, j) of the gradient is a00(i, j) + a01(i, j - 1) + a10(i - 1, j) + a11(i - 1, j - 1): the
    # lanes' sums shifted by one lane (tl.gather). A program owns a TI x TJ tile of lanes, one per thread:
    # its first row and column are the halo (runs that the tiles above and to the left own too), the
    # other (TI - 1) x (TJ - 1) lanes are the elements it writes. Each element is written by one program,
    # its terms added in a fixed order: no atomics, bitwise reproducible. Per-lane and per-pixel values
    # are [1, TI * TJ] tiles, in the layout of the [BLOCK_C, TI * TJ] ones (no conversions).
    BLOCK_Q: tl.constexpr = TI * TJ
    pid = tl.program_id(0)
    tiles = TILES_I * TILES_J
    n = (pid // tiles).to(tl.int64)
    tile = pid % tiles
    q = tl.arange(0, BLOCK_Q)[None, :]
    i = (tile // TILES_J) * (TI - 1) - 1 + q // TJ
    j = (tile % TILES_J) * (TJ - 1) - 1 + q % TJ
    lane = (i >= 0) & (i < hl) & (j >= 0) & (j < wl)
    own = lane & (q // TJ >= 1) & (q % TJ >= 1)
    i = tl.where(lane, i, 0)
    j = tl.where(lane, j, 0)
    ys = tl.load(run_ptr + i)
    yn = tl.where(lane, tl.load(run_ptr + hl + i), 0)
    xs = tl.load(run_ptr + 2 * hl + j)
    xn = tl.where(lane, tl.load(run_ptr + 2 * hl + wl + j), 0)
    # The tile's longest runs: the loops' trips (while loops: the interpreter's range takes no tensor). The
    # model's trips: H / h, and in the first row (column) of tiles half a run more (align_corners=False).
    ny = tl.max(tl.max(yn, axis=1), axis=0)
    nx = tl.max(tl.max(xn, axis=1), axis=0)
    ye = i == hl - 1  # the last row (column): i1 = i0, the second weight goes to the lane itself
    xe = j == wl - 1
    i64 = i.to(tl.int64)
    j64 = j.to(tl.int64)
    u00 = n * sxn + i64 * sxh + j64 * sxw
    u01 = tl.where(xe, u00, u00 + sxw)
    u10 = tl.where(ye, u00, u00 + sxh)
    u11 = tl.where(xe, u10, u10 + sxw)
    P64 = tl.zeros([1, BLOCK_Q], dtype=tl.int64) + P
    if GRAD_MODE == 1:
        g1 = tl.load(go_ptr).to(ACC)
    wsum = 0.0
    for d in tl.static_range(D):
        wsum += tl.load(w_ptr + d).to(ACC)
    # The leaves in chunks of BLOCK_C, the last L % BLOCK_C in a chunk of their own (BLOCK_CR, a power of two
    # at least as large): a full chunk for two leaves would cost 8 leaves' element work (Vistas: 66 = 8 * 8 + 2).
    if GRAD_MODE != 1:
        g1 = 0.0
    for c0 in range(0, L - L % BLOCK_C, BLOCK_C):  # sm90: trips=L // BLOCK_C
        _up_bwd_chunk(c0, c0 // BLOCK_C, x_ptr, sxc, u00, u01, u10, u11, lane, own, ys, yn, ny, xs, xn, nx, ul_ptr,
                      Hh, W, n, t_ptr, stn, sth, stw, ignore_index, stats_ptr, P64, go_ptr, son, soh, sow, g1,
                      cw_ptr, pw_ptr, lvl_ptr, w_ptr, wsum, eps, xe, ye, q, g_ptr, sgn, sgc, sgh, sgw, i64, j64, L,
                      D, NCHUNK, BLOCK_C, TJ, BLOCK_Q, ACC, HAS_EPS, GRAD_MODE, FAST, HAS_CW, HAS_PW)
    if L % BLOCK_C > 0:
        _up_bwd_chunk(L - L % BLOCK_C, L // BLOCK_C, x_ptr, sxc, u00, u01, u10, u11, lane, own, ys, yn, ny, xs, xn,
                      nx, ul_ptr, Hh, W, n, t_ptr, stn, sth, stw, ignore_index, stats_ptr, P64, go_ptr, son, soh, sow,
                      g1, cw_ptr, pw_ptr, lvl_ptr, w_ptr, wsum, eps, xe, ye, q, g_ptr, sgn, sgc, sgh, sgw, i64, j64,
                      L, D, NCHUNK, BLOCK_CR, TJ, BLOCK_Q, ACC, HAS_EPS, GRAD_MODE, FAST, HAS_CW, HAS_PW)


# A group sum of e^{z - max} below TINY may have lost terms to underflow (float32 normals end at 1e-38,
# so terms 1e-18 below the largest one are still exact; float64 ends at 1e-308).
_TINY = {torch.float32: 1e-20, torch.float64: 1e-200}


def _launch(logits, target, leaf_group, level_w, eps, ignore_index, *, stats, compute_stats, write_stats,
            loss_mode, loss=None, grad=None, grad_out=None, grad_mode=C.GRAD_NONE, class_weight=None,
            pixel_weight=None):
    """Runs ``_hierarchical_softmax_kernel`` once; returns (partials, counts, weight sums) when ``loss_mode`` is
    LOSS_PARTIALS."""
    return C.launch_loss_kernel(
        _hierarchical_softmax_kernel, logits, target, (leaf_group, level_w, stats, stats, stats),
        (float(eps), int(ignore_index)),
        loss_mode=loss_mode, loss=loss, grad=grad, grad_out=grad_out, grad_mode=grad_mode,
        class_weight=class_weight, pixel_weight=pixel_weight,
        L=logits.shape[1], D=leaf_group.shape[0], HAS_EPS=eps > 0, COMPUTE_STATS=compute_stats,
        WRITE_STATS=write_stats, TINY=_TINY[C.acc_dtype(logits.dtype)],
        DP=triton.next_power_of_2(leaf_group.shape[0]), blocks=_blocks(logits),
        FAST=C.fast_exp(logits),
        FLAT=C.flat_pixels(logits, target, grad, grad_out if grad_mode == C.GRAD_PER_PIXEL else None),
        UPSAMPLE=False, OFF64=False,
    )


def _blocks(logits):
    """(BLOCK_C, BLOCK_P, num_warps): :func:`gpu_blocks` when compiled; under the interpreter, which pays
    per program and per loop iteration, 256 pixels and 8 leaves at a time."""
    if C.interpreted(logits.device):
        return 8, 256, 4
    return gpu_blocks(logits)


def gpu_blocks(logits):
    """(BLOCK_C, BLOCK_P, num_warps) of a compiled launch. Channel rows in memory (NCHW): 16 bytes of
    consecutive pixels per thread and row, chunks of 32 values per thread (fp32: 8 leaves x 4 pixels,
    bf16: 4 x 8). Channels contiguous (channels_last): one leaf per chunk, 4 pixels per thread (the pixel
    stride rarely lets a thread load more than one value per instruction; the other leaves of its pixels
    come from L1 in the next iterations)."""
    if logits.shape[1] > 1 and logits.stride(1) == 1:
        return 1, 512, 4
    vec = max(1, 16 // logits.element_size())
    return max(1, 32 // vec), vec * 32 * 4, 4


@functools.lru_cache(maxsize=64)
def _axis(n_in: int, n_out: int, align_corners: bool, dtype: torch.dtype):
    """:func:`_common.interp_axis`'s (i0, i1, lambda), and per input index i the run of outputs whose i0 is i
    (contiguous, i0 being nondecreasing), as (start, count)."""
    i0, i1, lam = C.interp_axis(n_in, n_out, align_corners, dtype)
    idx = np.arange(n_in)
    start = np.searchsorted(i0, idx, side="left")
    count = np.searchsorted(i0, idx, side="right") - start
    return i0, i1, lam, start, count


@functools.lru_cache(maxsize=64)
def _up_tables(h: int, w: int, H: int, W: int, align_corners: bool, dtype: torch.dtype, device: torch.device):
    """The kernels' interpolation tables on ``device``: indices int32 [i0 (H), i1 (H), i0 (W), i1 (W)] (the
    forward's), weights in ``dtype`` [lambda (H), lambda (W)], and the backward's runs int32 [start (h),
    count (h), start (w), count (w)]."""
    ry, rx = _axis(h, H, align_corners, dtype), _axis(w, W, align_corners, dtype)
    idx = torch.from_numpy(np.concatenate([ry[0], ry[1], rx[0], rx[1]]).astype(np.int32))
    lam = torch.from_numpy(np.concatenate([ry[2], rx[2]]))
    runs = torch.from_numpy(np.concatenate([ry[3], ry[4], rx[3], rx[4]]).astype(np.int32))
    return idx.to(device), lam.to(device), runs.to(device)


def _up_blocks(logits):
    """(BLOCK_C, BLOCK_P, num_warps) of the upsampled forward: under the interpreter 8 leaves and 256 pixels
    at a time; compiled, chunks of 16 leaves (one rescale each) and two pixels per thread, which shares each
    leaf's scalar work (its pointer, its group ids) between them (sm_90: 96 registers, no spill)."""
    if C.interpreted(logits.device):
        return 8, 256, 4
    return 16, 256, 4


def _up_bwd_blocks(logits, h: int, w: int):
    """(BLOCK_C, TI, TJ, num_warps) of the upsampled backward: tiles of TI x TJ lanes (low-resolution pixels,
    one per thread, halo included), 16 x 16 at most (4 x 4 under the interpreter, so that the tests' small
    images span several tiles), no larger than the image and its halo need; chunks of 8 leaves (4 for
    float64 logits), whose four stencil values and four sums per lane stay in registers."""
    cap = 4 if C.interpreted(logits.device) else 16
    ti = min(max(triton.next_power_of_2(h + 1), 2), cap)
    tj = min(max(triton.next_power_of_2(w + 1), 2), cap)
    tj = max(tj, 16 // ti)  # at least 16 lanes
    block_c = 4 if logits.dtype == torch.float64 else 8
    return block_c, ti, tj, max(1, min(8, ti * tj // 32))


def _launch_up_fwd(logits, target, leaf_group, level_w, eps, ignore_index, stats, align_corners, loss_mode, loss,
                   class_weight=None, pixel_weight=None):
    """The forward of the upsampled loss: ``_hierarchical_softmax_kernel`` with UPSAMPLE over the target's
    pixels (1-D grid); returns (partials, counts, weight sums) as :func:`_common.launch_loss_kernel`."""
    N, L, h, w = logits.shape
    _, H, W = target.shape
    acc = C.acc_dtype(logits.dtype)
    idx, lam, _ = _up_tables(h, w, H, W, bool(align_corners), acc, logits.device)
    P = N * H * W
    block_c, block_p, warps = _up_blocks(logits)
    grid = C.up_grid(target, block_p)
    partials, counts, wsums = C.new_partials(grid[0] if loss_mode == C.LOSS_PARTIALS else 1, logits, class_weight)
    if P == 0:  # no pixel: nothing to read (the kernel's stencil loads are unmasked)
        for t in (partials, counts, wsums):
            t.zero_()
        return partials, counts, wsums
    C.launch(
        _hierarchical_softmax_kernel, grid, logits,
        logits, target, leaf_group, level_w, stats, idx, lam, partials if loss is None else loss, partials, counts,
        *C.weight_ptrs(class_weight, pixel_weight, wsums, partials), partials, partials,
        P, max(H * W, 1), max(W, 1),
        *logits.stride(), *target.stride(), 0, 0, 0, 0, 0, 0, 0,
        float(eps), int(ignore_index),
        L=L, D=leaf_group.shape[0], BLOCK_C=block_c, BLOCK_P=block_p, ACC=C.tl_acc(logits.dtype),
        HAS_EPS=eps > 0, COMPUTE_STATS=True, WRITE_STATS=True, LOSS_MODE=loss_mode, GRAD_MODE=C.GRAD_NONE,
        TINY=_TINY[acc], DP=triton.next_power_of_2(leaf_group.shape[0]), FLAT=False, FAST=C.fast_exp(logits),
        UPSAMPLE=True, HAS_CW=class_weight is not None, HAS_PW=pixel_weight is not None, num_warps=warps,
        OFF64=C.up_off64(logits), SXC=C.up_sxc(logits),
    )
    return partials, counts, wsums


def _deepest_shared_level(leaf_group, block_c: int):
    """The backward's per-element selector (module docstring: d_j for label y): for labels y and leaves c, the
    deepest level whose group holds both (255: none), from the ``(D, L)`` group ids, as bytes packed per
    label and chunk of ``block_c`` leaves (4 or 8) into one int32 or int64 word, byte k for leaf c0 + k
    (little-endian): ``(L, cdiv(L, block_c))``."""
    D, L = leaf_group.shape
    same = leaf_group[:, :, None] == leaf_group[:, None, :]
    levels = torch.arange(D, dtype=torch.int16, device=leaf_group.device)[:, None, None]
    deepest = torch.where(same, levels, torch.full_like(levels, -1)).amax(0)  # [y, c], symmetric
    chunks = triton.cdiv(L, block_c)
    packed = torch.full((L, chunks * block_c), 255, dtype=torch.uint8, device=leaf_group.device)
    packed[:, :L] = torch.where(deepest < 0, 255, deepest).to(torch.uint8)
    return packed.view(torch.int64 if block_c == 8 else torch.int32)


def _launch_up_bwd(grad, grad_out, grad_mode, logits, target, leaf_group, level_w, stats, eps, ignore_index,
                   align_corners, class_weight=None, pixel_weight=None):
    """Writes ``grad`` (the low-resolution logits' gradient) with ``_hierarchical_softmax_up_bwd_kernel``."""
    N, L, h, w = logits.shape
    _, H, W = target.shape
    if N == 0:
        return
    acc = C.acc_dtype(logits.dtype)
    _, lam, runs = _up_tables(h, w, H, W, bool(align_corners), acc, logits.device)
    block_c, ti, tj, warps = _up_bwd_blocks(logits, h, w)
    tiles_i, tiles_j = triton.cdiv(h, ti - 1), triton.cdiv(w, tj - 1)
    gos = grad_out.stride() if grad_mode == C.GRAD_PER_PIXEL else (0, 0, 0)
    C.launch(
        _hierarchical_softmax_up_bwd_kernel, (N * tiles_i * tiles_j,), logits,
        logits, target, _deepest_shared_level(leaf_group, block_c), level_w, stats, lam, runs, grad, grad_out,
        *C.weight_ptrs(class_weight, pixel_weight, None, grad)[:2],
        N * H * W, H, W, h, w, tiles_i, tiles_j,
        *logits.stride(), *target.stride(), *grad.stride(), *gos,
        float(eps), int(ignore_index),
        L=L, D=leaf_group.shape[0], NCHUNK=triton.cdiv(L, block_c), BLOCK_C=block_c, TI=ti, TJ=tj,
        ACC=C.tl_acc(logits.dtype), BLOCK_CR=triton.next_power_of_2(max(L % block_c, 1)),
        HAS_EPS=eps > 0, GRAD_MODE=grad_mode, FAST=C.fast_exp(logits), HAS_CW=class_weight is not None,
        HAS_PW=pixel_weight is not None, num_warps=warps,
    )


# ----------------------------------------------------------------------------------- custom ops
# Weights (docs/MATH.md §6.6): ``class_weight`` L values in the accumulation dtype, ``pixel_weight`` the
# target's shape, contiguous, any float dtype (``_common.weight_args``); the forwards return ``weight_sum``
# (0-dim, the sum of the labelled pixels' class weights) with class_weight, else an empty tensor, and the
# backwards take it back for "mean".
@torch.library.custom_op("hss_triton::hierarchical_softmax_fwd", mutates_args=())
def _hierarchical_softmax_fwd(logits: torch.Tensor, target: torch.Tensor, leaf_group: torch.Tensor, level_w: torch.Tensor,
             eps: float, ignore_index: int, reduction: str, single_pass: bool,
             class_weight: Optional[torch.Tensor] = None, pixel_weight: Optional[torch.Tensor] = None,
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (loss, statistics (D+1, P) (empty if single_pass), count of non-ignored pixels, weight sum (empty
    without class_weight), gradient (empty unless single_pass))."""
    N, L, H, W = logits.shape
    C.check_weight_ops(class_weight, pixel_weight, L, logits, target)
    D = leaf_group.shape[0]
    acc = C.acc_dtype(logits.dtype)
    P = N * H * W
    dev = logits.device
    # The single pass needs no statistics: it returns an empty tensor in their place.
    stats = torch.empty((0, P) if single_pass else (D + 1, P), dtype=acc, device=dev)
    grad = torch.empty_like(logits) if single_pass else logits.new_empty((0,))
    kw = dict(stats=stats, compute_stats=True, write_stats=not single_pass, class_weight=class_weight,
              pixel_weight=pixel_weight)
    if single_pass:
        scale = C.single_pass_scale(target, ignore_index, reduction, acc, class_weight)
        kw.update(grad=grad, grad_out=scale, grad_mode=C.GRAD_SCALAR)
    wsum = logits.new_empty((0,) if class_weight is None else (), dtype=acc)
    if reduction == "none":
        loss = torch.empty((N, H, W), dtype=acc, device=dev)
        _launch(logits, target, leaf_group, level_w, eps, ignore_index, loss_mode=C.LOSS_PER_PIXEL,
                loss=loss, **kw)
        count = torch.zeros((), dtype=torch.int64, device=dev)
        if class_weight is not None:
            wsum.zero_()
    else:
        partials, counts, wsums = _launch(logits, target, leaf_group, level_w, eps, ignore_index,
                                          loss_mode=C.LOSS_PARTIALS, **kw)
        wsum = C.weight_sum(wsums, class_weight)
        loss = C.reduce_partials(partials, counts, reduction, wsum)
        count = counts.sum(dtype=torch.int64)
    return loss, stats, count, wsum, grad


@_hierarchical_softmax_fwd.register_fake
def _(logits, target, leaf_group, level_w, eps, ignore_index, reduction, single_pass, class_weight=None,
      pixel_weight=None):
    C.check_weight_ops(class_weight, pixel_weight, logits.shape[1], logits, target)
    N, L, H, W = logits.shape
    acc = C.acc_dtype(logits.dtype)
    loss = logits.new_empty((N, H, W) if reduction == "none" else (), dtype=acc)
    stats = logits.new_empty((0 if single_pass else leaf_group.shape[0] + 1, N * H * W), dtype=acc)
    count = logits.new_empty((), dtype=torch.int64)
    wsum = logits.new_empty((0,) if class_weight is None else (), dtype=acc)
    grad = torch.empty_like(logits) if single_pass else logits.new_empty((0,))
    return loss, stats, count, wsum, grad


@torch.library.custom_op("hss_triton::hierarchical_softmax_bwd", mutates_args=())
def _hierarchical_softmax_bwd(grad_out: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, leaf_group: torch.Tensor,
             level_w: torch.Tensor, stats: torch.Tensor, count: torch.Tensor, eps: float, ignore_index: int,
             reduction: str, weight_sum: Optional[torch.Tensor] = None, class_weight: Optional[torch.Tensor] = None,
             pixel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    C.check_weight_ops(class_weight, pixel_weight, logits.shape[1], logits, target)
    grad = torch.empty_like(logits)
    go, mode = C.backward_grad_out(grad_out, count, reduction, C.acc_dtype(logits.dtype), weight_sum)
    _launch(logits, target, leaf_group, level_w, eps, ignore_index, stats=stats, compute_stats=False,
            write_stats=False, loss_mode=C.LOSS_NONE, grad=grad, grad_out=go, grad_mode=mode,
            class_weight=class_weight, pixel_weight=pixel_weight)
    return grad


@_hierarchical_softmax_bwd.register_fake
def _(grad_out, logits, target, leaf_group, level_w, stats, count, eps, ignore_index, reduction, weight_sum=None,
      class_weight=None, pixel_weight=None):
    C.check_weight_ops(class_weight, pixel_weight, logits.shape[1], logits, target)
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, leaf_group, level_w, eps, ignore_index, reduction, single_pass = inputs[:8]
    cw, pw = (tuple(inputs[8:]) + (None, None))[:2]  # the weights (absent: None)
    loss, stats, count, wsum, grad = output
    ctx.opts = (eps, ignore_index, reduction, single_pass)
    if single_pass:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(logits, target, leaf_group, level_w, stats, count, wsum, cw, pw)


def _backward(ctx, g_loss, g_stats, g_count, g_wsum, g_grad):
    eps, ignore_index, reduction, single_pass = ctx.opts
    if single_pass:
        (grad,) = ctx.saved_tensors
        # A new tensor: the saved gradient itself is never written to.
        dx = grad * g_loss.to(grad.dtype)
    else:
        logits, target, leaf_group, level_w, stats, count, wsum, cw, pw = ctx.saved_tensors
        dx = _hierarchical_softmax_bwd(g_loss, logits, target, leaf_group, level_w, stats, count, eps, ignore_index,
                                       reduction, wsum, cw, pw)
    return dx, None, None, None, None, None, None, None, None, None


_hierarchical_softmax_fwd.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("hss_triton::hierarchical_softmax_up_fwd", mutates_args=())
def _hierarchical_softmax_up_fwd(logits: torch.Tensor, target: torch.Tensor, leaf_group: torch.Tensor,
                                 level_w: torch.Tensor, eps: float, ignore_index: int, reduction: str,
                                 align_corners: bool, class_weight: Optional[torch.Tensor] = None,
                                 pixel_weight: Optional[torch.Tensor] = None,
                                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The loss of low-resolution logits ``(N, L, h, w)`` bilinearly upsampled to the target's ``(H, W)``:
    → (loss, statistics (D+1, N*H*W), count of non-ignored pixels, weight sum (empty without class_weight))."""
    N = logits.shape[0]
    _, H, W = target.shape
    C.check_weight_ops(class_weight, pixel_weight, logits.shape[1], logits, target)
    D = leaf_group.shape[0]
    acc = C.acc_dtype(logits.dtype)
    stats = torch.empty((D + 1, N * H * W), dtype=acc, device=logits.device)
    wk = dict(class_weight=class_weight, pixel_weight=pixel_weight)
    if reduction == "none":
        loss = torch.empty((N, H, W), dtype=acc, device=logits.device)
        _launch_up_fwd(logits, target, leaf_group, level_w, eps, ignore_index, stats, align_corners,
                       C.LOSS_PER_PIXEL, loss, **wk)
        count = torch.zeros((), dtype=torch.int64, device=logits.device)
        wsum = logits.new_zeros((0,) if class_weight is None else (), dtype=acc)
    else:
        partials, counts, wsums = _launch_up_fwd(logits, target, leaf_group, level_w, eps, ignore_index, stats,
                                                 align_corners, C.LOSS_PARTIALS, None, **wk)
        wsum = C.weight_sum(wsums, class_weight)
        loss = C.reduce_partials(partials, counts, reduction, wsum)
        count = counts.sum(dtype=torch.int64)
    return loss, stats, count, wsum


@_hierarchical_softmax_up_fwd.register_fake
def _(logits, target, leaf_group, level_w, eps, ignore_index, reduction, align_corners, class_weight=None,
      pixel_weight=None):
    C.check_weight_ops(class_weight, pixel_weight, logits.shape[1], logits, target)
    N, H, W = target.shape
    acc = C.acc_dtype(logits.dtype)
    loss = logits.new_empty((N, H, W) if reduction == "none" else (), dtype=acc)
    stats = logits.new_empty((leaf_group.shape[0] + 1, N * H * W), dtype=acc)
    wsum = logits.new_empty((0,) if class_weight is None else (), dtype=acc)
    return loss, stats, logits.new_empty((), dtype=torch.int64), wsum


@torch.library.custom_op("hss_triton::hierarchical_softmax_up_bwd", mutates_args=())
def _hierarchical_softmax_up_bwd(grad_out: torch.Tensor, logits: torch.Tensor, target: torch.Tensor,
                                 leaf_group: torch.Tensor, level_w: torch.Tensor, stats: torch.Tensor,
                                 count: torch.Tensor, eps: float, ignore_index: int, reduction: str,
                                 align_corners: bool, weight_sum: Optional[torch.Tensor] = None,
                                 class_weight: Optional[torch.Tensor] = None,
                                 pixel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The gradient of the low-resolution logits, in their dtype (and strides where dense)."""
    C.check_weight_ops(class_weight, pixel_weight, logits.shape[1], logits, target)
    grad = torch.empty_like(logits)
    go, mode = C.backward_grad_out(grad_out, count, reduction, C.acc_dtype(logits.dtype), weight_sum)
    _launch_up_bwd(grad, go, mode, logits, target, leaf_group, level_w, stats, eps, ignore_index, align_corners,
                   class_weight, pixel_weight)
    return grad


@_hierarchical_softmax_up_bwd.register_fake
def _(grad_out, logits, target, leaf_group, level_w, stats, count, eps, ignore_index, reduction, align_corners,
      weight_sum=None, class_weight=None, pixel_weight=None):
    C.check_weight_ops(class_weight, pixel_weight, logits.shape[1], logits, target)
    return torch.empty_like(logits)


def _up_setup_context(ctx, inputs, output):
    logits, target, leaf_group, level_w, eps, ignore_index, reduction, align_corners = inputs[:8]
    cw, pw = (tuple(inputs[8:]) + (None, None))[:2]  # the weights (absent: None)
    loss, stats, count, wsum = output
    ctx.opts = (eps, ignore_index, reduction, align_corners)
    ctx.save_for_backward(logits, target, leaf_group, level_w, stats, count, wsum, cw, pw)


def _up_backward(ctx, g_loss, g_stats, g_count, g_wsum):
    logits, target, leaf_group, level_w, stats, count, wsum, cw, pw = ctx.saved_tensors
    dx = _hierarchical_softmax_up_bwd(g_loss, logits, target, leaf_group, level_w, stats, count, *ctx.opts, wsum,
                                      cw, pw)
    return dx, None, None, None, None, None, None, None, None, None


_hierarchical_softmax_up_fwd.register_autograd(_up_backward, setup_context=_up_setup_context)


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
    upsample: Optional[str] = None,
    align_corners: bool = False,
    class_weight: Optional[torch.Tensor] = None,
    pixel_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Hierarchical softmax loss on the Triton backend (see ``hss_kernels.hierarchical_softmax_loss``).

    ``logits``: ``(N, L, H, W)`` float16/bfloat16/float32/float64, any strides (NCHW, channels_last);
    ``target``: ``(N, H, W)`` integer leaf labels or ``ignore_index``. Returns a float32 loss (float64
    for float64 logits): a scalar, or ``(N, H, W)`` for ``reduction="none"``. The gradient comes back
    in the logits' dtype and layout.

    ``single_pass=True`` (``mean``/``sum`` only) writes the gradient during the forward, reading the
    logits once instead of twice; backward then scales the saved gradient by the incoming one (an
    elementwise pass over the gradient: :func:`hierarchical_softmax_loss_and_grad` skips even that).

    ``upsample="bilinear"``: ``logits`` ``(N, L, h, w)`` at most the target's ``(N, H, W)`` size; the loss of
    the logits interpolated as ``F.interpolate(mode="bilinear", align_corners=align_corners)`` in float32
    (float64), fused: neither the full-resolution logits nor their gradient is stored (the backward sums
    each low-resolution element's terms in a fixed order, without atomics). Not with ``single_pass``.

    ``class_weight`` (L, float) and ``pixel_weight`` (the target's ``(N, H, W)``, float) are fused into the
    kernels (docs/MATH.md §6.6): each labelled pixel's loss and gradient times cw[y] * pw[p], ``"mean"``
    divided by the sum of the labelled pixels' class weights (their count without class weights). The
    kernels read cw as an L-value table and pw once per labelled pixel, forward and backward (pw is made
    contiguous first: a copy when it is not, e.g. expanded). Also with ``single_pass`` and ``upsample``.

    Raises ValueError for a non-4-D input, ``single_pass`` with ``reduction="none"`` or with ``upsample``,
    an ``upsample`` other than None or "bilinear", or a target smaller than the logits or of another batch.
    """
    C.check_call(logits, target, reduction, single_pass, "L")
    acc = C.acc_dtype(logits.dtype)
    leaf_group, level_w = _tables(tree, level_weights, acc, logits.device)
    cw, pw = C.weight_args(class_weight, pixel_weight, logits, target)
    if upsample is not None:
        C.check_upsample(logits, target, upsample, single_pass)
        loss, _, _, _ = _hierarchical_softmax_up_fwd(logits, target, leaf_group, level_w, float(eps),
                                                     int(ignore_index), reduction, bool(align_corners), cw, pw)
        return loss
    loss, _, _, _, _ = _hierarchical_softmax_fwd(logits, target, leaf_group, level_w, float(eps), int(ignore_index),
                                                 reduction, bool(single_pass), cw, pw)
    return loss


hierarchical_softmax_loss.takes_upsample = True  # functional.py passes upsample= / align_corners= through
hierarchical_softmax_loss.takes_weights = True  # ... and class_weight= / pixel_weight= (fused in the kernels)


def hierarchical_softmax_loss_and_grad(
    logits: torch.Tensor,
    target: torch.Tensor,
    tree: Tree,
    level_weights: Optional[Sequence[float]] = None,
    eps: float = 0.0,
    ignore_index: int = 255,
    reduction: str = "mean",
    class_weight: Optional[torch.Tensor] = None,
    pixel_weight: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, d loss / d logits)`` in one pass over the logits, outside autograd (docs/MATH.md §5.6).

    The fewest bytes a training step can move: read the logits once, write the gradient once. Use it
    as ``loss, g = ...(logits.detach(), ...)`` then ``logits.backward(g)``. ``reduction``: ``mean`` or
    ``sum``. Same arguments (the weights included), dtypes and errors as :func:`hierarchical_softmax_loss`.
    """
    C.check_call(logits, target, reduction, True, "L")
    acc = C.acc_dtype(logits.dtype)
    leaf_group, level_w = _tables(tree, level_weights, acc, logits.device)
    cw, pw = C.weight_args(class_weight, pixel_weight, logits, target)
    with torch.no_grad():
        loss, _, _, _, grad = _hierarchical_softmax_fwd(logits.detach(), target, leaf_group, level_w, float(eps),
                                                        int(ignore_index), reduction, True, cw, pw)
    return loss, grad
