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
node, with pixels across threads (16 bytes per thread and node on NCHW). The forward walks the nodes
bottom-up (reverse pre-order) keeping one running maximum per depth; the gradient adds a top-down pass
that routes each off-path weight to its subtree's argmax. Nothing is saved for the backward: it
recomputes the extrema from the logits (one more read, no argmin/argmax tensor of size P·V).
``USE_SCAN = True`` selects the previous tile kernel (``_tile_kernel``, a segmented scan per internal depth).
"""
from __future__ import annotations

import functools
from typing import List, Tuple

import torch
import triton
import triton.language as tl

from .. import tables
from ..tree import Tree
from . import _common as C

__all__ = ["tree_min_loss", "tree_bce_loss", "tree_min_loss_and_grad", "tree_bce_loss_and_grad"]


LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2(x): lg2.approx.ftz.f32 on the GPU (FAST), else tl.log2."""
    if FAST:
        return tl.inline_asm_elementwise("lg2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return tl.log2(x)


@triton.jit
def _rcp(x, FAST: tl.constexpr):
    """1/x: rcp.approx.ftz.f32 on the GPU (FAST), else a division."""
    if FAST:
        return tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return 1.0 / x


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
    soft = _log2(p, FAST)  # log2(1 + e)
    r = _rcp(p, FAST)
    er = e * r
    neg = w <= 0  # z >= 0
    s = tl.where(neg, er, r)
    if HAS_EPS:
        q = tl.where(neg, r, er)
        qe = q + eps
        nlt = -_log2(qe, FAST)  # −log2(q + eps)
        ratio = q * _rcp(qe, FAST)
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


@triton.jit
def _pin(x, PIN: tl.constexpr):
    """x through an opaque instruction with side effects (PIN; else x itself): the compiler must have
    computed x here, and keeps later loads after it, so the unrolled tree's values do not pile up."""
    if PIN:
        return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=1)
    else:
        return x


@triton.jit
def _pin_all(t, PIN: tl.constexpr):
    out = ()
    for i in tl.static_range(len(t)):
        out = out + (_pin(t[i], PIN),)
    return out


@triton.jit
def _set(t, i: tl.constexpr, v):
    """The tuple t with element i replaced by v (i a constexpr: per-depth state held in registers)."""
    return t[:i] + (v,) + t[i + 1:]


@triton.jit
def _tree_min_kernel(
    x_ptr, t_ptr, tab_ptr, k_ptr, loss_ptr, part_ptr, cnt_ptr, g_ptr, go_ptr,
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
    FENCE: tl.constexpr, PIN: tl.constexpr,
):
    # The tree is compiled in: CH, DEP, LEAF, IDX are per pre-order position the node's channel, depth
    # (1 = a child of the root), whether it is a leaf and its ordinal among the internal nodes (-1: a
    # leaf). A program owns BLOCK_P pixels, a few consecutive ones per thread; every node is one
    # [BLOCK_P] vector of straight-line code, every per-depth state a tuple of such vectors.
    OFF_PATH: tl.constexpr = 4 * V
    if FLAT:
        pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        hw = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
        hw = hw.to(tl.int64)
        p = n * HW + hw
        pmask = (hw < HW) & (p < P)  # P = 0 when H or W is 0 (HW is then 1)
        xpix = n * sxn + hw * sxw
        tpix = n * stn + hw * stw
        gpix = n * sgn + hw * sgw
        opix = n * son + hw * sow
    else:
        pid = tl.program_id(0)
        p, pmask, n, h, w = C.pixel_coords(pid, P, HW, W, BLOCK_P)
        xpix = n * sxn + h * sxh + w * sxw
        tpix = n * stn + h * sth + w * stw
        gpix = n * sgn + h * sgh + w * sgw
        opix = n * son + h * soh + w * sow
    y, valid, bad = C.load_labels(t_ptr + tpix, pmask, ignore_index, L)
    sxc64 = tl.cast(sxc, tl.int64)  # channel offsets in 64 bits
    sgc64 = tl.cast(sgc, tl.int64)
    WANT_LOSS: tl.constexpr = LOSS_MODE != 0
    WANT_GRAD: tl.constexpr = GRAD_MODE != 0

    zero = tl.zeros([BLOCK_P], dtype=ACC)
    # The label's path a_d(y) (-1 past its leaf), and for the tree-min the running minimum of the path
    # logits (strict <: ties stay with the shallower node; kept negated) and, for the gradient, the weight each path
    # node receives as the argmin of deeper path nodes (K_u of docs/MATH.md §3.6, path side). Element
    # d - 1 of these tuples is depth d.
    path = ()
    cmin = ()
    kpath = ()
    cur = zero
    arg = tl.zeros([BLOCK_P], dtype=tl.int32)
    for d in tl.static_range(D):
        a = tl.load(tab_ptr + OFF_PATH + y * D + d, mask=pmask, other=-1)
        path = path + (a,)
        if USE_EXTREMA:
            act = pmask & (a >= 0)
            a0 = tl.where(act, a, 0)
            xa = tl.load(x_ptr + xpix + a0.to(tl.int64) * sxc, mask=act, other=0.0).to(ACC)
            if d == 0:
                take = act
            else:
                take = act & (xa < cur)
            cur = tl.where(take, xa, cur)
            cmin = cmin + (-cur,)  # negated: the focal takes w = −z
            if WANT_GRAD:
                arg = tl.where(take, d, arg)
                ka = tl.load(k_ptr + a0, mask=act, other=0.0).to(ACC)
                kpath = kpath + (zero,)
                for j in tl.static_range(d + 1):
                    kpath = _set(kpath, j, kpath[j] + tl.where(act & (arg == j), ka, 0.0))

    if WANT_GRAD:
        if GRAD_MODE == 1:
            gsc = zero + tl.load(go_ptr).to(ACC)
        else:
            gsc = tl.load(go_ptr + opix, mask=pmask, other=0.0).to(ACC)
    acc = zero
    if USE_EXTREMA:
        # Bottom-up, in reverse pre-order: M_v = max(x_v, the children's M), one running max per depth
        # (element d of cm: the max over the finished children, at depth d + 1, of the open node at depth
        # d); node v's term is f(cmin) on the path, f(−M_v) off it. The gradient keeps M_v of every
        # internal node (mi, by IDX) for the top-down pass.
        cm = ()
        for d in tl.static_range(D + 1):
            cm = cm + (zero - float("inf"),)
        mi = ()
        for i in tl.static_range(V):
            if not LEAF[i]:
                mi = mi + (zero,)
        for j in tl.static_range(V):
            if PIN and j % FENCE == FENCE - 1:
                acc = _pin(acc, PIN)
                cm = _pin_all(cm, PIN)
                mi = _pin_all(mi, PIN)
            x = tl.load(x_ptr + xpix + CH[V - 1 - j] * sxc64, mask=pmask, other=0.0).to(ACC)  # sm90: logits
            if LEAF[V - 1 - j]:
                m = x
            else:
                m = tl.maximum(x, cm[DEP[V - 1 - j]], propagate_nan=tl.PropagateNan.ALL)
                cm = _set(cm, DEP[V - 1 - j], zero - float("inf"))
                if WANT_GRAD:
                    mi = _set(mi, IDX[V - 1 - j], m)
            cm = _set(cm, DEP[V - 1 - j] - 1,
                      tl.maximum(cm[DEP[V - 1 - j] - 1], m, propagate_nan=tl.PropagateNan.ALL))
            if WANT_LOSS:
                w = tl.where(path[DEP[V - 1 - j] - 1] == CH[V - 1 - j], cmin[DEP[V - 1 - j] - 1], m)
                f, _ = _focal2(w, gamma, eps, True, False, GMODE, HAS_EPS, FAST)
                acc += tl.load(k_ptr + CH[V - 1 - j]).to(ACC) * f
        # The maxima propagate NaN (GPU max/min otherwise drop it): a NaN logit anywhere reaches the
        # max over the depth-1 nodes, cm[0] (docs/MATH.md §5.3).
        nan = cm[0] != cm[0]
        bad = bad | (valid & nan)
        if WANT_GRAD:
            gsc = tl.where(valid, tl.where(bad, float("nan"), gsc), 0.0)
            # Top-down, in pre-order: an off-path node's weight k_v goes to M_v's argmax (first in
            # pre-order: v itself if x_v = M_v, else the first child with the same maximum). Element
            # d - 1 of `pend` holds what the open node at depth d still owes one of its children.
            mo = ()
            pend = ()
            for d in tl.static_range(D):
                mo = mo + (zero,)
                pend = pend + (zero,)
            for i in tl.static_range(V):
                x = tl.load(x_ptr + xpix + CH[i] * sxc64, mask=pmask, other=0.0).to(ACC)  # sm90: logits
                on = path[DEP[i] - 1] == CH[i]
                if LEAF[i]:
                    m = x
                else:
                    m = mi[IDX[i]]
                kin = tl.where(on, 0.0, tl.load(k_ptr + CH[i]).to(ACC))
                if DEP[i] > 1:
                    hit = m == mo[DEP[i] - 2]
                    kin += tl.where(hit, pend[DEP[i] - 2], 0.0)
                    pend = _set(pend, DEP[i] - 2, tl.where(hit, 0.0, pend[DEP[i] - 2]))
                if LEAF[i]:
                    kk = kin
                else:
                    own = x >= m
                    kk = tl.where(own, kin, 0.0)
                    pend = _set(pend, DEP[i] - 1, tl.where(own, 0.0, kin))
                    mo = _set(mo, DEP[i] - 1, m)
                kk = tl.where(on, kpath[DEP[i] - 1], kk)
                _, df = _focal2(tl.where(on, -x, x), gamma, eps, False, True, GMODE, HAS_EPS, FAST)
                g = kk * df
                g = tl.where(on, g, -g)
                g = tl.where(valid, g * gsc, 0.0)  # an ignored pixel's NaN logits give 0, not 0 * NaN
                tl.store(g_ptr + gpix + CH[i] * sgc64, g.to(g_ptr.dtype.element_ty), mask=pmask)
    else:
        # Tree BCE: every node its own extremum, one pass: loss and gradient share the sigmoids. The
        # gradient rows are written before the pixel's NaN scan is complete; the rare pixel with a NaN
        # logit gets its NaN row afterwards (cold).
        if WANT_GRAD:
            gsc = tl.where(valid, tl.where(bad, float("nan"), gsc), 0.0)
        big = zero - float("inf")
        for i in tl.static_range(V):
            if PIN and i % FENCE == FENCE - 1:
                acc = _pin(acc, PIN)
                big = _pin(big, PIN)
            x = tl.load(x_ptr + xpix + CH[i] * sxc64, mask=pmask, other=0.0).to(ACC)  # sm90: logits
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
                tl.store(g_ptr + gpix + CH[i] * sgc64, g.to(g_ptr.dtype.element_ty), mask=pmask)
        nan = big != big
        late = valid & nan & (~bad)
        bad = bad | (valid & nan)
        if WANT_GRAD:
            if tl.max(late.to(tl.int32), axis=0) > 0:  # sm90: cold
                for i in tl.static_range(V):
                    tl.store(g_ptr + gpix + CH[i] * sgc64,
                             tl.full([BLOCK_P], float("nan"), ACC).to(g_ptr.dtype.element_ty), mask=late)
    if WANT_LOSS:
        C.store_loss(acc * LN2, valid, bad, p, pmask, pid, loss_ptr, part_ptr, cnt_ptr, LOSS_MODE)


@triton.jit
def _focal(z, gamma, eps, FOCAL: tl.constexpr, HAS_EPS: tl.constexpr):
    """(f(z), f'(z)) with f(z) = −σ(−z)^γ log(σ(z) + eps), from log-sigmoids (no log 0, no 1 − 1)."""
    soft = tl.log(1.0 + tl.exp(-tl.abs(z)))
    log_q = tl.minimum(z, 0.0) - soft  # log σ(z)
    log_1mq = tl.minimum(-z, 0.0) - soft  # log σ(−z)
    one_m_q = tl.exp(log_1mq)
    if HAS_EPS:
        q = tl.exp(log_q)
        log_term = tl.log(q + eps)
        ratio = q / (q + eps)
    else:
        log_term = log_q
        ratio = 1.0
    if FOCAL:
        wgt = tl.exp(gamma * log_1mq)  # σ(−z)^γ
        loss = -wgt * log_term
        dz = gamma * tl.exp(log_q) * wgt * log_term - wgt * one_m_q * ratio
    else:
        loss = -log_term
        dz = -one_m_q * ratio
    return loss, dz


@triton.jit
def _seg_max(f1, v1, f2, v2):
    """Segmented running max: a row with flag 1 starts a new segment."""
    return f1 | f2, tl.where(f2 != 0, v2, tl.maximum(v1, v2))


@triton.jit
def _seg_argmax(f1, v1, i1, f2, v2, i2):
    """Segmented running (max, argmax); ties keep the earlier row (earlier in pre-order)."""
    take2 = (f2 != 0) | (v2 > v1)
    return f1 | f2, tl.where(take2, v2, v1), tl.where(take2, i2, i1)


@triton.jit
def _tile_kernel(
    x_ptr, t_ptr, tab_ptr, k_ptr, loss_ptr, part_ptr, cnt_ptr, g_ptr, go_ptr,
    P, HW, W,
    sxn, sxc, sxh, sxw,
    stn, sth, stw,
    sgn, sgc, sgh, sgw,
    son, soh, sow,
    gamma, eps, ignore_index,
    V: tl.constexpr, L: tl.constexpr, D: tl.constexpr, DI: tl.constexpr, I: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, ACC: tl.constexpr,
    USE_EXTREMA: tl.constexpr, FOCAL: tl.constexpr, HAS_EPS: tl.constexpr,
    LOSS_MODE: tl.constexpr, GRAD_MODE: tl.constexpr, SCAN: tl.constexpr,
):
    # Offsets of the packed int32 table (tables.tree_min_table): per channel its depth, the channel of
    # each pre-order row, per channel its row and subtree size, path_nodes (L, D) (the native kernels'
    # tree_index so far), then for each internal depth l = 1..DI the row of each row's depth-l internal
    # ancestor-or-self (-1: none), and per internal node (in pre-order) its row, size, channel, depth.
    OFF_DEPTH: tl.constexpr = 0
    OFF_ORDER: tl.constexpr = V
    OFF_POS: tl.constexpr = 2 * V
    OFF_SIZE: tl.constexpr = 3 * V
    OFF_PATH: tl.constexpr = 4 * V
    OFF_ANC: tl.constexpr = 4 * V + L * D
    OFF_INT: tl.constexpr = 4 * V + L * D + DI * V

    pid = tl.program_id(0)
    p, pmask, n, h, w = C.pixel_coords(pid, P, HW, W, BLOCK_P)
    r = tl.arange(0, BLOCK_C)  # tile row = pre-order position
    rmask = r < V
    mask2 = rmask[:, None] & pmask[None, :]
    chan = tl.load(tab_ptr + OFF_ORDER + r, mask=rmask, other=0)
    k_row = tl.load(k_ptr + chan, mask=rmask, other=0.0).to(ACC)

    y, valid, bad = C.load_labels(t_ptr + n * stn + h * sth + w * stw, pmask, ignore_index, L)

    pix_x = n * sxn + h * sxh + w * sxw
    x_off = pix_x[None, :] + chan[:, None].to(tl.int64) * sxc
    x = tl.load(x_ptr + x_off, mask=mask2, other=0.0).to(ACC)  # sm90: logits
    # A NaN logit anywhere in a labelled pixel: a NaN loss and gradient row, as for a bad label (compiled
    # max/min skip NaN, so the tree walk alone would not always reach it).
    bad = bad | (valid & (tl.sum((x != x).to(tl.int32), axis=0) > 0))

    on_path = r[:, None] < 0  # all False
    for d in tl.static_range(D):
        node = tl.load(tab_ptr + OFF_PATH + y * D + d, mask=pmask, other=-1)
        on_path = on_path | (chan[:, None] == node[None, :])

    zero = tl.zeros([BLOCK_P], dtype=ACC)
    loss = zero
    grad = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    if USE_EXTREMA:
        size = tl.load(tab_ptr + OFF_SIZE + chan, mask=rmask, other=1)
        if SCAN:
            # Negative side. r_v's logit: x_v at a leaf; at an internal node of depth l the max
            # over its subtree, a contiguous run of rows. The subtrees of one depth are disjoint, so
            # one segmented scan down the rows per depth gives all their maxima at once (read at
            # each run's last row).
            depth = tl.load(tab_ptr + OFF_DEPTH + chan, mask=rmask, other=0)
            izero = tl.zeros([BLOCK_C, BLOCK_P], dtype=tl.int32)
            rows = r[:, None] + izero
            x_scan = tl.where(rmask[:, None], x, float("-inf"))
            m_val = x
            m_row = rows
            for lvl in tl.static_range(1, DI + 1):
                seg = ((depth <= lvl) | (~rmask)).to(tl.int32)[:, None] + izero
                at_l = (depth == lvl) & (size > 1)
                last = (tl.where(at_l, r + size - 1, r))[:, None] + izero
                if GRAD_MODE != 0:
                    _, run_v, run_i = tl.associative_scan((seg, x_scan, rows), 0, _seg_argmax)
                    m_row = tl.where(at_l[:, None], tl.gather(run_i, last, 0), m_row)
                else:
                    _, run_v = tl.associative_scan((seg, x_scan), 0, _seg_max)
                m_val = tl.where(at_l[:, None], tl.gather(run_v, last, 0), m_val)
            neg = rmask[:, None] & (~on_path)
            f, df = _focal(-m_val, gamma, eps, FOCAL, HAS_EPS)
            loss += tl.sum(tl.where(neg, k_row[:, None] * f, 0.0), axis=0)
            if GRAD_MODE != 0:
                coef = tl.where(neg, -k_row[:, None] * df, 0.0)  # owed to row m_row
                grad = tl.where((size == 1)[:, None], coef, grad)  # a leaf owes itself
                for lvl in tl.static_range(1, DI + 1):
                    # Row j receives from its depth-l internal ancestor a if a's argmax is j.
                    anc = tl.load(tab_ptr + OFF_ANC + (lvl - 1) * V + r, mask=rmask, other=-1)
                    has = anc >= 0
                    src = tl.where(has, anc, r)[:, None] + izero
                    hit = has[:, None] & (tl.gather(m_row, src, 0) == rows)
                    grad += tl.where(hit, tl.gather(coef, src, 0), 0.0)
        else:
            # Negative side, one internal node at a time: a masked max over its run of rows (costs
            # I passes over the tile, but only plain reductions: fast under the interpreter too).
            neg_leaf = (size == 1)[:, None] & (~on_path)
            f, df = _focal(-x, gamma, eps, FOCAL, HAS_EPS)
            loss += tl.sum(tl.where(neg_leaf, k_row[:, None] * f, 0.0), axis=0)
            grad = tl.where(neg_leaf, -k_row[:, None] * df, grad)
            for i in range(I):  # sm90: trips=I
                # (loop-local names differ from the path loop's: Triton wants loop-carried types fixed)
                start = tl.load(tab_ptr + OFF_INT + 4 * i)
                size_i = tl.load(tab_ptr + OFF_INT + 4 * i + 1)
                v = tl.load(tab_ptr + OFF_INT + 4 * i + 2)
                depth_i = tl.load(tab_ptr + OFF_INT + 4 * i + 3)
                on_v = tl.load(tab_ptr + OFF_PATH + y * D + depth_i - 1, mask=pmask, other=-1) == v
                off = pmask & (~on_v)
                sub = (r >= start) & (r < start + size_i)
                xs = tl.where(sub[:, None], x, float("-inf"))
                mval = tl.max(xs, axis=0)
                k_i = tl.load(k_ptr + v).to(ACC)
                f_i, df_i = _focal(-mval, gamma, eps, FOCAL, HAS_EPS)
                loss += tl.where(off, k_i * f_i, 0.0)
                if GRAD_MODE != 0:
                    a_row = tl.argmax(xs, axis=0)  # first maximum: earliest in pre-order
                    hit_i = (r[:, None] == a_row[None, :]) & off[None, :]
                    grad += tl.where(hit_i, (-k_i * df_i)[None, :], 0.0)

        # Positive side: running min from the root, strict < so that ties stay with the shallower node.
        cur = zero
        min_row = tl.zeros([BLOCK_P], dtype=tl.int32)
        for d in tl.static_range(D):
            node = tl.load(tab_ptr + OFF_PATH + y * D + d, mask=pmask, other=-1)
            act = pmask & (node >= 0)
            node = tl.where(act, node, 0)
            xv = tl.load(x_ptr + pix_x + node.to(tl.int64) * sxc, mask=act, other=0.0).to(ACC)
            pos = tl.load(tab_ptr + OFF_POS + node, mask=act, other=0)
            if d == 0:
                take = act
            else:
                take = act & (xv < cur)
            cur = tl.where(take, xv, cur)
            min_row = tl.where(take, pos, min_row)
            k_v = tl.load(k_ptr + node, mask=act, other=0.0).to(ACC)
            f_p, df_p = _focal(cur, gamma, eps, FOCAL, HAS_EPS)
            loss += tl.where(act, k_v * f_p, 0.0)
            if GRAD_MODE != 0:
                hit_p = (r[:, None] == min_row[None, :]) & act[None, :]
                grad += tl.where(hit_p, (k_v * df_p)[None, :], 0.0)
    else:
        z = tl.where(on_path, x, -x)
        f, df = _focal(z, gamma, eps, FOCAL, HAS_EPS)
        kf = tl.where(rmask[:, None], k_row[:, None], 0.0)
        loss += tl.sum(kf * f, axis=0)
        grad = tl.where(on_path, kf * df, -kf * df)

    C.store_loss(loss, valid, bad, p, pmask, pid, loss_ptr, part_ptr, cnt_ptr, LOSS_MODE)

    if GRAD_MODE != 0:
        g_off = (n * sgn + h * sgh + w * sgw)[None, :] + chan[:, None].to(tl.int64) * sgc
        C.store_grad(grad, g_ptr + g_off, go_ptr, n * son + h * soh + w * sow, valid, bad, pmask, mask2, GRAD_MODE)


# True: the previous kernel, a [channels, pixels] tile per program whose subtree maxima come from one
# segmented scan per internal depth (_tile_kernel; its masked-max loop is no longer launched); kept while
# tests/triton/test_triton_scan.py compares it with the compiled-in tree. False (default): _tree_min_kernel.
USE_SCAN = False


# Compiled with float32 math, every FENCE nodes the kernel's running values pass through an opaque
# instruction (_pin): without it LLVM leaves the arithmetic of the unrolled tree after all of its loads,
# whose registers exceed 255 on the big trees (ptxas then spills).
FENCE = 8


def _launch(logits, target, tab, k, gamma, eps, ignore_index, use_extrema, *, loss_mode, loss=None,
            grad=None, grad_out=None, grad_mode=C.GRAD_NONE, sizes=None):
    L, D, DI, I = sizes[:4]
    V = logits.shape[1]
    if USE_SCAN:
        return C.launch_loss_kernel(
            _tile_kernel, logits, target, (tab, k), (float(gamma), float(eps), int(ignore_index)),
            loss_mode=loss_mode, loss=loss, grad=grad, grad_out=grad_out, grad_mode=grad_mode,
            V=V, L=L, D=D, DI=DI, I=I, USE_EXTREMA=use_extrema, FOCAL=gamma != 0, HAS_EPS=eps > 0, SCAN=True,
        )
    if len(sizes) < 4 + 2 * V:  # tables.tree_min_sizes alone (a direct call of the op): the tree from the table
        t = tab.cpu().tolist()
        sizes = list(sizes[:4]) + t[V:2 * V] + [t[c] for c in t[V:2 * V]]
    ch, dep, leaf, idx = _compiled_tree(tuple(sizes[4:4 + V]), tuple(sizes[4 + V:4 + 2 * V]))
    gmode = 0 if gamma == 0 else 2 if gamma == 2 else 1
    return C.launch_loss_kernel(
        _tree_min_kernel, logits, target, (tab, k), (float(gamma), float(eps), int(ignore_index)),
        loss_mode=loss_mode, loss=loss, grad=grad, grad_out=grad_out, grad_mode=grad_mode,
        blocks=_blocks(logits, grad_mode != C.GRAD_NONE and use_extrema),
        V=V, L=L, D=D, CH=ch, DEP=dep, LEAF=leaf, IDX=idx, USE_EXTREMA=use_extrema, GMODE=gmode, HAS_EPS=eps > 0,
        FLAT=_flat(logits, target, grad, grad_out if grad_mode == C.GRAD_PER_PIXEL else None),
        FAST=C.fast_exp(logits), FENCE=FENCE, PIN=C.fast_exp(logits),
    )


@functools.lru_cache(maxsize=64)
def _compiled_tree(order, depths):
    """The kernel's tree constexprs from the pre-order channels and their depths: (CH, DEP, LEAF, IDX),
    LEAF[i] = 1 when the next node in pre-order is no deeper, IDX[i] the ordinal of an internal node."""
    V = len(order)
    leaf = tuple(int(i + 1 == V or depths[i + 1] <= depths[i]) for i in range(V))
    idx, n = [], 0
    for i in range(V):
        idx.append(-1 if leaf[i] else n)
        n += not leaf[i]
    return tuple(order), tuple(depths), leaf, tuple(idx)


def _tree_sizes(tree: Tree) -> List[int]:
    """The ``sizes`` argument of the custom ops: ``tables.tree_min_sizes`` (L, D, DI, I), then the channels in
    pre-order and their depths (the tree the kernel compiles in)."""
    return list(tables.tree_min_sizes(tree)) + list(tree.dfs_order) + [tree.depths[c] for c in tree.dfs_order]


def _flat(logits, *tensors):
    """True when every tensor's H and W axes are one run of pixels (stride_h == W * stride_w): the kernel
    then indexes pixels as n, h*W + w on a 2-D grid (as the hierarchical softmax does)."""
    if logits.shape[0] > 65535:  # the grid's second axis
        return False
    for t in (logits,) + tensors:
        if t is not None and t.dim() >= 3 and t.shape[-2] > 1 and t.stride(-2) != t.shape[-1] * t.stride(-1):
            return False
    return True


def _blocks(logits, two_pass):
    """(BLOCK_C, BLOCK_P, num_warps): :func:`gpu_blocks` when compiled; under the interpreter, which pays
    per program and per operation, ``_common.block_sizes``' pixel block for one channel (up to 1024)."""
    P = C.shape_args(logits)[0]
    interp = C.block_sizes(1, P, C.interpreted(logits.device))
    if C.interpreted(logits.device):
        return interp
    return gpu_blocks(logits, two_pass)


def gpu_blocks(logits, two_pass=False):
    """(BLOCK_C, BLOCK_P, num_warps) of a compiled launch (BLOCK_C unused: one node at a time). Channel rows
    in memory (NCHW): 16 bytes of consecutive pixels per thread and node. Channels contiguous
    (channels_last): one pixel per thread. ``two_pass`` (the tree-min gradient, which reads the
    program's logits twice): 2-byte dtypes keep 8 pixels per thread too."""
    if logits.shape[1] > 1 and logits.stride(1) == 1:
        return 1, 128, 4
    vec = max(1, 16 // logits.element_size())
    return 1, vec * 32 * 4, 4


# ----------------------------------------------------------------------------------- custom ops
@torch.library.custom_op("hss_triton::tree_min_fwd", mutates_args=())
def _tree_min_fwd(logits: torch.Tensor, target: torch.Tensor, tab: torch.Tensor, k: torch.Tensor, sizes: List[int],
              gamma: float, eps: float, ignore_index: int, reduction: str, use_extrema: bool, single_pass: bool
              ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """→ (loss, count of non-ignored pixels, gradient if single_pass else empty)."""
    N, V, H, W = logits.shape
    acc = C.acc_dtype(logits.dtype)
    dev = logits.device
    grad = torch.empty_like(logits) if single_pass else logits.new_empty((0,))
    kw = {}
    if single_pass:
        count = (target != ignore_index).sum()
        scale = C.grad_scale(torch.ones((), dtype=acc, device=dev), count, reduction, acc)
        kw = dict(grad=grad, grad_out=scale, grad_mode=C.GRAD_SCALAR)
    if reduction == "none":
        loss = torch.empty((N, H, W), dtype=acc, device=dev)
        _launch(logits, target, tab, k, gamma, eps, ignore_index, use_extrema, loss_mode=C.LOSS_PER_PIXEL,
                loss=loss, sizes=sizes, **kw)
        count = torch.zeros((), dtype=torch.int64, device=dev)
    else:
        partials, counts = _launch(logits, target, tab, k, gamma, eps, ignore_index, use_extrema,
                                   loss_mode=C.LOSS_PARTIALS, sizes=sizes, **kw)
        loss = C.reduce_partials(partials, counts, reduction)
        if not single_pass:
            count = counts.sum(dtype=torch.int64)
    return loss, count, grad


@_tree_min_fwd.register_fake
def _(logits, target, tab, k, sizes, gamma, eps, ignore_index, reduction, use_extrema, single_pass):
    N, V, H, W = logits.shape
    acc = C.acc_dtype(logits.dtype)
    loss = logits.new_empty((N, H, W) if reduction == "none" else (), dtype=acc)
    count = logits.new_empty((), dtype=torch.int64)
    grad = torch.empty_like(logits) if single_pass else logits.new_empty((0,))
    return loss, count, grad


@torch.library.custom_op("hss_triton::tree_min_bwd", mutates_args=())
def _tree_min_bwd(grad_out: torch.Tensor, logits: torch.Tensor, target: torch.Tensor, tab: torch.Tensor,
              k: torch.Tensor, count: torch.Tensor, sizes: List[int], gamma: float, eps: float, ignore_index: int,
              reduction: str, use_extrema: bool) -> torch.Tensor:
    grad = torch.empty_like(logits)
    go, mode = C.backward_grad_out(grad_out, count, reduction, C.acc_dtype(logits.dtype))
    _launch(logits, target, tab, k, gamma, eps, ignore_index, use_extrema, loss_mode=C.LOSS_NONE, grad=grad,
            grad_out=go, grad_mode=mode, sizes=sizes)
    return grad


@_tree_min_bwd.register_fake
def _(grad_out, logits, target, tab, k, count, sizes, gamma, eps, ignore_index, reduction, use_extrema):
    return torch.empty_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, tab, k, sizes, gamma, eps, ignore_index, reduction, use_extrema, single_pass = inputs
    loss, count, grad = output
    ctx.opts = (sizes, gamma, eps, ignore_index, reduction, use_extrema, single_pass)
    if single_pass:
        ctx.save_for_backward(grad)
    else:
        ctx.save_for_backward(logits, target, tab, k, count)


def _backward(ctx, g_loss, g_count, g_grad):
    sizes, gamma, eps, ignore_index, reduction, use_extrema, single_pass = ctx.opts
    if single_pass:
        (grad,) = ctx.saved_tensors
        dx = grad * g_loss.to(grad.dtype)  # a new tensor: the saved gradient is never written to
    else:
        logits, target, tab, k, count = ctx.saved_tensors
        dx = _tree_min_bwd(g_loss, logits, target, tab, k, count, sizes, gamma, eps, ignore_index, reduction,
                       use_extrema)
    return (dx,) + (None,) * 10


_tree_min_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------- public
def _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, single_pass,
               use_extrema, with_grad=False):
    C.check_call(logits, target, reduction, single_pass, "V")
    dev = logits.device
    acc = C.acc_dtype(logits.dtype)
    tab = tables.tree_min_table(tree, dev)
    k = tables.node_weight_vector(tree, scale, normalize, acc, dev)
    sizes = _tree_sizes(tree)
    if with_grad:
        with torch.no_grad():
            loss, _, grad = _tree_min_fwd(logits.detach(), target, tab, k, sizes, float(gamma), float(eps),
                                      int(ignore_index), reduction, use_extrema, True)
        return loss, grad
    loss, _, _ = _tree_min_fwd(logits, target, tab, k, sizes, float(gamma), float(eps), int(ignore_index),
                           reduction, use_extrema, bool(single_pass))
    return loss


def tree_min_loss(logits: torch.Tensor, target: torch.Tensor, tree: Tree, gamma: float = 2.0, scale: float = 1.0,
                  eps: float = 0.0, normalize: str = "level", ignore_index: int = 255, reduction: str = "mean",
                  single_pass: bool = False) -> torch.Tensor:
    """Focal tree-min loss on the Triton backend (see ``hss_kernels.tree_min_loss``).

    ``logits``: ``(N, V, H, W)`` node logits, float16/bfloat16/float32/float64, any strides;
    ``target``: ``(N, H, W)`` integer leaf labels or ``ignore_index``. Loss in float32 (float64 for
    float64 logits), gradient in the logits' dtype. ``single_pass=True`` (``mean``/``sum`` only)
    writes the gradient during the forward; backward scales it by the incoming gradient (one
    elementwise pass; :func:`tree_min_loss_and_grad` skips it). Raises ValueError for a non-4-D input or
    ``single_pass`` with ``reduction="none"``; the options are the public API's to check.
    """
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, single_pass,
                      True)


def tree_bce_loss(logits: torch.Tensor, target: torch.Tensor, tree: Tree, gamma: float = 0.0, scale: float = 1.0,
                  eps: float = 0.0, normalize: str = "level", ignore_index: int = 255, reduction: str = "mean",
                  single_pass: bool = False) -> torch.Tensor:
    """Multi-label (focal) BCE over every node on the Triton backend (see ``hss_kernels.tree_bce_loss``).
    Same arguments, dtypes and errors as :func:`tree_min_loss`."""
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, single_pass,
                      False)


def tree_min_loss_and_grad(logits: torch.Tensor, target: torch.Tensor, tree: Tree, gamma: float = 2.0,
                           scale: float = 1.0, eps: float = 0.0, normalize: str = "level", ignore_index: int = 255,
                           reduction: str = "mean") -> Tuple[torch.Tensor, torch.Tensor]:
    """``(loss, d loss / d logits)`` in one pass over the logits, outside autograd (docs/MATH.md §5.6); then
    ``logits.backward(grad)``. ``reduction``: ``mean`` or ``sum``. Arguments as :func:`tree_min_loss`."""
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, True, True,
                      with_grad=True)


def tree_bce_loss_and_grad(logits: torch.Tensor, target: torch.Tensor, tree: Tree, gamma: float = 0.0,
                           scale: float = 1.0, eps: float = 0.0, normalize: str = "level", ignore_index: int = 255,
                           reduction: str = "mean") -> Tuple[torch.Tensor, torch.Tensor]:
    """Single-pass ``(loss, gradient)`` of :func:`tree_bce_loss`, as :func:`tree_min_loss_and_grad`."""
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, True, False,
                      with_grad=True)
