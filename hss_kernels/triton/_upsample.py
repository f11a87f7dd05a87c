"""What the fused-upsampling backwards of the Triton losses share (docs/MATH.md §6.4): the band loop.

With ``upsample="bilinear"`` a loss's backward writes the gradient of the low-resolution logits directly, band
by band of full-resolution rows (all images at once), two launches per band and no host synchronisation: the
op's own rows kernel computes each full-resolution pixel's gradient row d(weighted loss)/d(upsampled logits)
once into a bounded scratch ``[N, rows, W, channels padded to a step]`` in the accumulation dtype, then
``_up_gather_kernel`` adds it onto the low-resolution elements in a fixed order (no atomics; a low-resolution
row whose window goes on past the band keeps its partial sum in a few carry rows for the next band): bitwise
the same for every band height. Neither the full-resolution logits nor their whole gradient is stored.
:func:`backward_in_bands` is the loop; an op (``tree_min.py``: the tree-min and the tree BCE) brings its rows
kernel as a launch callback.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from . import _common as C

__all__ = ["UP_BWD_SCRATCH_BYTES", "UP_GATHER_BYTES", "gather_step", "up_band_rows", "up_bands", "up_columns",
           "backward_in_bands"]


# The upsampled backward's scratch: the gradient rows of a band of full-resolution rows of every image, in ACC,
# [N, rows, W, channels padded to gather_step]. At most UP_BWD_SCRATCH_BYTES (sized to stay in an H100's 50 MB
# L2 between the two kernels) and a tenth of the full-resolution logits (at least 1 MiB); at least one row.
UP_BWD_SCRATCH_BYTES = 32 << 20
UP_GATHER_BYTES = 128  # per pixel and step of _up_gather_kernel: its scratch and carry loads, 8 of 16 bytes


def gather_step(acc_bytes):
    """Channels per step of _up_gather_kernel (GB), the scratch's channel padding: UP_GATHER_BYTES of the
    accumulation dtype (32 float32, 16 float64)."""
    return UP_GATHER_BYTES // acc_bytes


def up_band_rows(N, V, H, W, acc_bytes, logit_bytes):
    """Full-resolution rows per band of the upsampled backward (see UP_BWD_SCRATCH_BYTES)."""
    gb = gather_step(acc_bytes)
    row = max(N * W * triton.cdiv(V, gb) * gb * acc_bytes, 1)
    budget = min(UP_BWD_SCRATCH_BYTES, max(N * V * H * W * logit_bytes // 10, 1 << 20))
    return max(1, min(H, budget // row))


@functools.lru_cache(maxsize=64)
def up_bands(h, H, rows, align_corners, dtype):
    """The bands of the upsampled backward: [(Y0, Y1, I0, I1)], full-resolution rows [Y0, Y1) and the
    low-resolution rows [I0, I1) whose gradient _up_gather_kernel adds them to (the rows whose window meets the
    band; a row with an empty window goes with the band of its window's start), and AM, the most low-resolution
    rows of a band (the carry's height: the rows a band leaves open are distinct modulo AM)."""
    _, _, _, start, count = C.up_axis(h, H, align_corners, dtype)
    end = start + count
    anchor = np.minimum(start, H - 1)
    bands = []
    for Y0 in range(0, H, rows):
        Y1 = min(Y0 + rows, H)
        mine = np.where(count > 0, (start < Y1) & (end > Y0), (anchor >= Y0) & (anchor < Y1))
        idx = np.flatnonzero(mine)
        if idx.size:
            I0, I1 = int(idx[0]), int(idx[-1]) + 1
            assert idx.size == I1 - I0, "a band's low-resolution rows are one run"
            bands.append((Y0, Y1, I0, I1))
    return tuple(bands), max(b[3] - b[2] for b in bands)


@functools.lru_cache(maxsize=64)
def up_columns(w, W, align_corners, dtype, device):
    """_up_gather_kernel's column tables, per low-resolution column j and step k < KX of its window: X (int32) and
    its weight wx (the accumulation dtype, computed as the kernels interpolate: (1 - lambda) where i0 is j, plus
    lambda where i1 is j); past the window, the window's first column and weight 0: its element is in the sum
    anyway, so 0 times it adds nothing (and a NaN there makes the sum NaN already; an infinite one, +-inf in the
    sum, turns it into NaN), and the kernel's loads need no mask. Every window holds a column (W >= w). Cached
    per device as C.up_tables: no host-to-device copy per call."""
    i0, i1, lam, start, count = C.up_axis(w, W, align_corners, dtype)
    assert W >= w and (w == 0 or int(count.min()) >= 1), "every low-resolution column's window holds a column"
    kx = max(int(count.max(initial=0)), 1)
    k = np.arange(kx)[None, :]
    X = start[:, None] + k
    inside = k < count[:, None]
    Xc = np.where(inside, X, 0)
    j = np.arange(w)[:, None]
    one = lam.dtype.type(1)
    wx = np.where(i0[Xc] == j, one - lam[Xc], lam.dtype.type(0)) + np.where(i1[Xc] == j, lam[Xc], lam.dtype.type(0))
    cx = torch.from_numpy(np.where(inside, X, start[:, None]).astype(np.int32).reshape(-1))
    cw = torch.from_numpy(np.where(inside, wx, lam.dtype.type(0)).astype(lam.dtype).reshape(-1))
    return cx.to(device), cw.to(device), kx


@triton.jit(do_not_specialize=["Y0", "Y1", "I0"])
def _up_gather_kernel(
    s_ptr, a_ptr, g_ptr, ui_ptr, ul_ptr, win_ptr, cx_ptr, cw_ptr,
    Hh, hl, wl, Y0, Y1, I0, AM,
    ssn, ssy, ssx,
    san, sah, saw,
    sgn, sgc, sgh, sgw,
    V: tl.constexpr, BLOCK_Q: tl.constexpr, GB: tl.constexpr, GS: tl.constexpr, KX: tl.constexpr,
    ROWS: tl.constexpr, ACC: tl.constexpr,
):
    # The upsampled backward's second half, for the band [Y0, Y1) whose gradient rows the op's rows kernel
    # left in the scratch (s_ptr, [N, rows, W, channels]): a program owns BLOCK_Q low-resolution pixels (i, j)
    # of one row i = I0 + program_id(1) of image program_id(2) and GB channels at a time, and adds
    # wy * wx * g over the full-resolution pixels (Y, X) of the band whose stencil holds (i, j) (the row's
    # window of outputs whose i0 is i - 1 or i, intersected with the band; columns: the window of j, at most
    # KX, as the tables cx (X) and cw (wx) per (j, step) give them: steps past the window repeat its first
    # column with weight 0, so no load is masked), in the order (Y, X):
    # the same sum as one pass over the whole window, wherever the bands cut it. A row whose window goes on
    # past the band keeps its partial sum in ACC in the carry rows (a_ptr: [N, AM, wl, channels], row i % AM,
    # channel stride 1) for the next band; the band that holds its last row writes the gradient. No atomics:
    # bitwise reproducible, and the same for every band height. The GB channels of a step are GB / GS tiles of
    # [BLOCK_Q, GS] (GS: 16 bytes of ACC), one pixel per thread: the per-pixel values (window
    # columns, weights, addresses) are [BLOCK_Q, 1] in the tiles' own layout, computed once per step for all
    # of them, and no value changes threads in the loops (one [BLOCK_Q, GB] tile would spread a pixel's
    # channels over 4 threads, and every per-pixel load would go through shared memory to reach them).
    i = I0 + tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    j = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)[:, None]
    jmask = j < wl
    j = tl.where(jmask, j, 0)
    ys = tl.load(win_ptr + i)
    ye = ys + tl.load(win_ptr + hl + i)
    first = ys >= Y0  # no earlier band held a row of the window
    last = ye <= Y1  # the window ends in this band
    ylo = tl.maximum(ys, Y0)
    yhi = tl.minimum(ye, Y1)
    cc = tl.arange(0, GS)[None, :]
    j64 = j.to(tl.int64)
    apix = n * san + (i % AM).to(tl.int64) * sah + j64 * saw
    gpix = n * sgn + i.to(tl.int64) * sgh + j64 * sgw
    sbase = s_ptr + n * ssn
    for c0 in range(0, V, GB):  # sm90: trips=cdiv(V, GB)
        acc = ()
        for k in tl.static_range(GB // GS):  # the carried partial sums, or 0 in the window's first band
            ch = c0 + k * GS + cc
            acc = acc + (tl.load(a_ptr + apix + ch, mask=jmask & (ch < V) & (not first), other=0.0),)
        Y = ylo
        while Y < yhi:  # sm90: trips=2 * H / (h + (2 - 2 * h / H) * cdiv(H, ROWS))
            iy0 = tl.load(ui_ptr + Y)
            iy1 = tl.load(ui_ptr + Hh + Y)
            ly = tl.load(ul_ptr + Y)
            wy = tl.where(iy0 == i, 1.0 - ly, 0.0) + tl.where(iy1 == i, ly, 0.0)
            srow = sbase + (Y - Y0).to(tl.int64) * ssy + c0
            for dx in range(0, KX):  # sm90: trips=KX; mem=2 + GB // GS
                X = tl.load(cx_ptr + j * KX + dx)  # j is in range (clamped; its stores are masked)
                wx = tl.load(cw_ptr + j * KX + dx)
                spx = srow + X.to(tl.int64) * ssx
                wt = wy * wx
                nxt = ()
                for k in tl.static_range(GB // GS):
                    t = tl.load(spx + (k * GS + cc))
                    nxt = nxt + (acc[k] + wt * t,)
                acc = nxt
            Y += 1
        if last:
            for k in tl.static_range(GB // GS):
                ch = c0 + k * GS + cc
                tl.store(g_ptr + gpix + ch.to(tl.int64) * sgc, acc[k].to(g_ptr.dtype.element_ty),
                         mask=jmask & (ch < V))
        else:
            for k in tl.static_range(GB // GS):
                ch = c0 + k * GS + cc
                tl.store(a_ptr + apix + ch, acc[k], mask=jmask & (ch < V))


def backward_in_bands(launch_rows, grad, logits, H, W, align_corners, block_p, block_q, num_warps):
    """Writes ``grad`` (the gradient of the low-resolution logits ``(N, V, h, w)``, for labels ``(N, H, W)``) band
    by band: per band of full-resolution rows ``launch_rows(scratch, Y0, Y1, block_p)`` (the op's rows kernel:
    the gradient rows of the full-resolution rows [Y0, Y1) of every image, row Y at ``scratch[:, Y - Y0]``,
    channel stride 1), then ``_up_gather_kernel`` onto the low-resolution rows, BLOCK_Q columns a program.
    Under the interpreter the blocks are cut to the band's pixels and the image's columns (at least 16). On a GPU
    the device guard is entered once around the bands (:func:`_common.held_device_guard`)."""
    N, V, h, w = logits.shape
    acc = C.acc_dtype(logits.dtype)
    ui, ul, win, _, _ = C.up_tables(h, w, H, W, bool(align_corners), acc, logits.device)
    rows = up_band_rows(N, V, H, W, torch.finfo(acc).bits // 8, logits.element_size())
    bands, am = up_bands(h, H, rows, bool(align_corners), acc)
    gb = gather_step(torch.finfo(acc).bits // 8)
    vp = triton.cdiv(V, gb) * gb
    scratch = torch.empty((N, rows, W, vp), dtype=acc, device=logits.device)
    carry = torch.empty((N, am, w, vp), dtype=acc, device=logits.device)
    if C.interpreted(logits.device):
        block_p = min(block_p, max(triton.next_power_of_2(rows * W), 16))
        block_q = min(block_q, max(triton.next_power_of_2(w), 16))
    cx, cwx, kx = up_columns(w, W, bool(align_corners), acc, logits.device)
    with C.held_device_guard(logits):  # once for all the bands' launches
        for Y0, Y1, I0, I1 in bands:
            launch_rows(scratch, Y0, Y1, block_p)
            C.launch(
                _up_gather_kernel, (triton.cdiv(w, block_q), I1 - I0, N), logits,
                scratch, carry, grad, ui, ul, win, cx, cwx,
                H, h, w, Y0, Y1, I0, am,
                *scratch.stride()[:3], *carry.stride()[:3], *grad.stride(),
                V=V, BLOCK_Q=block_q, GB=gb, GS=128 // torch.finfo(acc).bits, KX=kx, ROWS=rows,
                ACC=C.tl_acc(logits.dtype), num_warps=num_warps,
            )
