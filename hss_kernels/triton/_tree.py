"""The pieces of the Triton kernels that have the tree compiled in (``_tree_min_kernel``, ``_decode_kernel``;
docs/MATH.md §3.10, §4.3): the tree as constexpr tuples walked node by node in straight-line code, per-depth
state as tuples of pixel vectors, and the logits of GROUP consecutive walk steps moved as one
[pixels, GROUP] tile split into pixel vectors inside each thread.
"""
from __future__ import annotations

import functools

import triton
import triton.language as tl

# Nodes per step of a compiled-in tree: the kernels load (and store) the logits of GROUP nodes at a time as
# one [pixels, GROUP] tile, and compiled with float32 math pass their running values through an opaque
# instruction (pin) between steps: without it LLVM leaves the arithmetic of the unrolled tree after all of
# its loads, whose registers exceed 255 on the big trees (ptxas then spills). One load per node instead
# costs Triton's coalescing pass time quadratic in the node count (minutes for Vistas 2.0).
GROUP = 8


@triton.jit
def pin(x, PIN: tl.constexpr):
    """x through an opaque instruction with side effects (PIN; else x itself): the compiler must have
    computed x here, and keeps later loads after it, so the unrolled tree's values do not pile up."""
    if PIN:
        if x.dtype.primitive_bitwidth == 64:
            return tl.inline_asm_elementwise("mov.b64 $0, $1;", "=l,l", [x], dtype=x.dtype, is_pure=False, pack=1)
        else:
            return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [x], dtype=x.dtype, is_pure=False, pack=1)
    else:
        return x


@triton.jit
def pin_all(t, PIN: tl.constexpr):
    """pin on every element of the tuple t."""
    out = ()
    for i in tl.static_range(len(t)):
        out = out + (pin(t[i], PIN),)
    return out


@triton.jit
def replace(t, i: tl.constexpr, v):
    """The tuple t with element i replaced by v (i a constexpr: per-depth state held in registers)."""
    return t[:i] + (v,) + t[i + 1:]


@triton.jit
def group_channels(CH, V: tl.constexpr, start: tl.constexpr, G: tl.constexpr, REV: tl.constexpr):
    """[G] channels of the nodes at loop steps start .. start + G - 1, the steps walking the pre-order
    (REV: its reverse); steps past the last node repeat its channel (their lanes are masked off)."""
    r = tl.arange(0, G)
    ch = tl.zeros([G], dtype=tl.int32)
    for i in tl.static_range(G):
        if start + i < V:
            if REV:
                ch = tl.where(r == i, CH[V - 1 - start - i], ch)
            else:
                ch = tl.where(r == i, CH[start + i], ch)
        else:
            if REV:
                ch = tl.where(r == i, CH[0], ch)
            else:
                ch = tl.where(r == i, CH[V - 1], ch)
    return ch


@triton.jit
def unpack(t, G: tl.constexpr):
    """The G columns of a [pixels, G] tile as a tuple of pixel vectors (no data movement: a thread holds
    its pixels' G values)."""
    if G == 1:
        return (tl.reshape(t, (t.shape[0],)),)
    elif G == 2:
        a, b = tl.split(t)
        return (a, b)
    elif G == 4:
        a, b = tl.split(tl.reshape(t, (t.shape[0], 2, 2)))  # column 2i + j: a is j = 0
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        return (a0, b0, a1, b1)
    else:
        a, b = tl.split(tl.reshape(t, (t.shape[0], 2, 2, 2)))  # column 4i + 2j + k: a is k = 0
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        a00, a01 = tl.split(a0)
        a10, a11 = tl.split(a1)
        b00, b01 = tl.split(b0)
        b10, b11 = tl.split(b1)
        return (a00, b00, a10, b10, a01, b01, a11, b11)


@triton.jit
def pack(v, G: tl.constexpr):
    """The inverse of unpack: a tuple of G pixel vectors as a [pixels, G] tile."""
    if G == 1:
        return tl.reshape(v[0], (v[0].shape[0], 1))
    elif G == 2:
        return tl.join(v[0], v[1])
    elif G == 4:
        return tl.reshape(tl.join(tl.join(v[0], v[2]), tl.join(v[1], v[3])), (v[0].shape[0], 4))
    else:
        a = tl.join(tl.join(v[0], v[4]), tl.join(v[2], v[6]))
        b = tl.join(tl.join(v[1], v[5]), tl.join(v[3], v[7]))
        return tl.reshape(tl.join(a, b), (v[0].shape[0], 8))


@triton.jit
def channel_offsets(ch, sc64, PIN: tl.constexpr):
    """The [G] offsets ch * sc64 of a group's channels; with PIN > 0 from the channel stride through pin, the
    products declared multiples of PIN (the launcher's word: 16 when the strides are, else 1). Pinned, every
    group's [pixels, G] addresses are computed next to its load or store. Without it LLVM derives all V
    channel addresses of the unrolled tree from one another up front (one 64-bit chain) and keeps them live
    across the walk: 2 registers per node, spilled on Vistas 2.0. (Pinning the pixel offsets instead hides
    their contiguity, and a pinned stride without multiple_of its alignment: narrower accesses, layout
    conversions through shared memory.)"""
    if PIN > 0:
        return tl.multiple_of(ch.to(tl.int64) * pin(sc64, True), PIN)
    else:
        return ch.to(tl.int64) * sc64


@triton.jit
def load_group(x_ptr, xpix, sxc64, pmask, CH, V: tl.constexpr, start: tl.constexpr, G: tl.constexpr,
               REV: tl.constexpr, ACC: tl.constexpr, LAST: tl.constexpr = False, PIN: tl.constexpr = 0):
    """The logits of the G nodes at loop steps start .. start + G - 1 (one load of a [pixels, G] tile), as a
    tuple of pixel vectors. LAST: the program's last read of them (evict first; a load the compiler cannot
    merge with the first read, which would keep every logit of the pixel live between the two passes).
    PIN: the tile's addresses from a pinned channel stride (see :func:`channel_offsets`)."""
    ch = group_channels(CH, V, start, G, REV)
    ptr = x_ptr + xpix[:, None] + channel_offsets(ch, sxc64, PIN)[None, :]
    if LAST:
        t = tl.load(ptr, mask=pmask[:, None], other=0.0, eviction_policy="evict_first")  # sm90: logits
    else:
        t = tl.load(ptr, mask=pmask[:, None], other=0.0)  # sm90: logits
    return unpack(t.to(ACC), G)


@triton.jit
def store_group(g_ptr, gpix, sgc64, pmask, gs, CH, V: tl.constexpr, start: tl.constexpr, G: tl.constexpr,
                PIN: tl.constexpr = 0):
    """Stores the gradients gs of the nodes at pre-order steps start .. start + len(gs) - 1 (a tuple padded
    to G vectors) as one [pixels, G] tile. PIN: as :func:`load_group`."""
    n: tl.constexpr = len(gs)
    for i in tl.static_range(G - n):
        gs = gs + (gs[0],)
    ch = group_channels(CH, V, start, G, False)
    cmask = tl.arange(0, G) < n
    tl.store(g_ptr + gpix[:, None] + channel_offsets(ch, sgc64, PIN)[None, :],
             pack(gs, G).to(g_ptr.dtype.element_ty), mask=pmask[:, None] & cmask[None, :])


@functools.lru_cache(maxsize=64)
def compiled_tree(order, depths):
    """The kernel's tree constexprs from the pre-order channels and their depths: (CH, DEP, LEAF, IDX),
    LEAF[i] = 1 when the next node in pre-order is no deeper, IDX[i] the ordinal of an internal node."""
    V = len(order)
    leaf = tuple(int(i + 1 == V or depths[i + 1] <= depths[i]) for i in range(V))
    idx, n = [], 0
    for i in range(V):
        idx.append(-1 if leaf[i] else n)
        n += not leaf[i]
    return tuple(order), tuple(depths), leaf, tuple(idx)
