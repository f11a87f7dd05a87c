"""What the Triton kernels share: the launch, accumulation dtype, block sizes, reductions, in-kernel pieces.

Kernels read logits as ``[channels, pixels]`` tiles straight from an ``(N, C, H, W)`` tensor through its
four strides, so NCHW and channels_last need no copy. Pixels are numbered ``p = (n*H + h)*W + w`` over
the whole batch; a program owns ``BLOCK_P`` consecutive pixels and all (padded) channels.

Every kernel is launched through :func:`launch`: CUDA tensors run the compiled kernel, CPU tensors run
the same kernel under Triton's interpreter (``TRITON_INTERPRET`` need not be set), so one process can
test both, and a GPU machine never compiles interpreter-sized tiles.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Dict, Optional

import numpy as np
import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .._checks import acc_dtype, mean_denominator

# What the kernels do with the per-pixel loss / the gradient (constexpr switches).
LOSS_NONE, LOSS_PER_PIXEL, LOSS_PARTIALS = 0, 1, 2
GRAD_NONE, GRAD_SCALAR, GRAD_PER_PIXEL = 0, 1, 2


def interpreted(device) -> bool:
    """True when kernels on ``device`` run under Triton's interpreter: every device but CUDA, and CUDA
    too when Triton itself was put in interpreter mode (``TRITON_INTERPRET=1`` before import)."""
    return torch.device(device).type != "cuda" or triton.knobs.runtime.interpret


_interpreted_fns: Dict[int, InterpretedFunction] = {}  # by id: hashing a JITFunction walks its source
_interpreter_lock = threading.Lock()


def _interpreted(fn) -> InterpretedFunction:
    """The interpreter's version of a ``@triton.jit`` function (itself if Triton is interpreting)."""
    if isinstance(fn, InterpretedFunction):
        return fn
    if id(fn) not in _interpreted_fns:
        _interpreted_fns[id(fn)] = InterpretedFunction(fn.fn)
    return _interpreted_fns[id(fn)]


@contextlib.contextmanager
def _jit_calls_interpreted():
    """While an interpreted kernel runs, its calls of other ``@triton.jit`` helpers (compiled-mode
    JITFunctions, which refuse Python calls) run their interpreted versions.

    The interpreter swaps ``triton.language``'s builtins for its own while it runs and puts them back
    after a kernel, but not after a helper call (Triton 3.6 patches ``tl.core`` there and never restores
    it); left patched, the next compile in this process fails. Everything is put back here."""
    saved = JITFunction.__call__
    patched = (tl, tl.core, tl.tensor, tl.math, tl.core.tensor_descriptor_base)
    before = [dict(vars(obj)) for obj in patched]
    JITFunction.__call__ = lambda self, *args, **kwargs: _interpreted(self)(*args, **kwargs)
    try:
        yield
    finally:
        JITFunction.__call__ = saved
        for obj, old in zip(patched, before):
            for name, value in list(vars(obj).items()):
                if name not in old:
                    delattr(obj, name)
                elif value is not old[name]:
                    setattr(obj, name, old[name])


_held = threading.local()  # .device: the device whose guard held_device_guard holds on this thread


def launch(kernel, grid, like: torch.Tensor, *args, **kwargs) -> None:
    """Runs ``kernel[grid](*args, **kwargs)`` for tensors on ``like``'s device: compiled, inside
    :func:`device_guard` (entered here unless :func:`held_device_guard` holds it for that device), for CUDA
    tensors; under the interpreter for CPU tensors."""
    if not interpreted(like.device):
        if getattr(_held, "device", None) == like.device:
            kernel[grid](*args, **kwargs)
            return
        with device_guard(like):
            kernel[grid](*args, **kwargs)
        return
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
    with _interpreter_lock, _jit_calls_interpreted():
        _interpreted(kernel)[grid](*args, **kwargs)


def tl_acc(dtype: torch.dtype):
    """The ``ACC`` constexpr of a kernel: :func:`hss_kernels._checks.acc_dtype` as a Triton dtype."""
    return tl.float64 if acc_dtype(dtype) == torch.float64 else tl.float32


def device_guard(t: torch.Tensor):
    """Context in which to launch a kernel on ``t``'s device.

    Triton launches on the *current* CUDA device and stream, not on the device of its tensor arguments
    (triton-lang/triton#2441): without this, logits on ``cuda:1`` while ``cuda:0`` is current fail to
    launch ("Pointer argument cannot be accessed from Triton") or run on the wrong GPU. A no-op on
    the CPU (the interpreter).
    """
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


@contextlib.contextmanager
def held_device_guard(t: torch.Tensor):
    """:func:`device_guard` entered once around a loop of launches on ``t``'s device (the banded backwards:
    hundreds of launches), which :func:`launch` then does not enter again; a no-op on the CPU."""
    if t.device.type != "cuda":
        yield
        return
    prev = getattr(_held, "device", None)
    with device_guard(t):
        _held.device = t.device
        try:
            yield
        finally:
            _held.device = prev


def interpreter_pixels(pixels: int) -> int:
    """Pixels per program under the interpreter, which costs milliseconds per program whatever its size:
    the pixel count rounded up to a power of two, from 16 to 1024. (Compiled launches take each op's
    ``gpu_blocks``.)"""
    return min(max(triton.next_power_of_2(max(pixels, 1)), 16), 1024)


def shape_args(x: torch.Tensor):
    """P (pixels), HW and W of a 4-D tensor; HW and W never 0 (the kernels divide by them)."""
    N, _, H, W = x.shape
    return N * H * W, max(H * W, 1), max(W, 1)



def flat_pixels(logits, *tensors) -> bool:
    """True when every tensor's H and W axes are one run of pixels (stride_h == W * stride_w; NCHW and
    channels_last both are): a kernel then indexes pixels as (n, h*W + w) on a (pixel blocks, N) grid
    (``pixel_offsets`` with FLAT), which lets the compiler prove that pixels are contiguous."""
    if logits.shape[0] > 65535:  # the grid's second axis
        return False
    for t in (logits,) + tensors:
        if t is not None and t.dim() >= 3 and t.shape[-2] > 1 and t.stride(-2) != t.shape[-1] * t.stride(-1):
            return False
    return True

def launch_loss_kernel(kernel, logits: torch.Tensor, target: torch.Tensor, tables, scalars, *, loss_mode: int,
                       blocks, loss=None, grad=None, grad_out=None, grad_mode: int = GRAD_NONE,
                       class_weight=None, pixel_weight=None, **constexprs):
    """Runs a loss kernel (``_hierarchical_softmax_kernel``, ``_tree_min_kernel``) once over all pixels, ``logits.shape[1]``
    channels per tile; returns (partials, counts, weight sums), the per-program loss sums, pixel counts and
    (with ``class_weight``) sums of the labelled pixels' class weights when ``loss_mode`` is LOSS_PARTIALS
    (else one unwritten element each).

    The kernel's arguments: logits, target, ``*tables``, the loss, partials, counts, class weights, pixel
    weights, weight-sum partials, gradient and grad_output pointers, P, HW, W, the strides of logits,
    target, gradient (4) and grad_output (3, read for GRAD_PER_PIXEL only), ``*scalars``, then the
    constexprs BLOCK_C, BLOCK_P, ACC, LOSS_MODE, GRAD_MODE, HAS_CW, HAS_PW and ``**constexprs``. A pointer
    that ``loss_mode``/``grad_mode`` (or an absent weight) does not touch gets a dummy. The weights are as
    :func:`weight_args` makes them.
    """
    P, HW, Wd = shape_args(logits)
    block_c, block_p, warps = blocks
    grid = (max(triton.cdiv(P, block_p), 1),)
    if constexprs.get("FLAT"):
        grid = (max(triton.cdiv(HW, block_p), 1), logits.shape[0])
    programs = grid[0] * (grid[1] if len(grid) > 1 else 1)
    partials, counts, wsums = new_partials(programs if loss_mode == LOSS_PARTIALS else 1, logits, class_weight)
    dummy = partials  # stands for pointers a mode does not touch
    gs = grad.stride() if grad is not None else (0, 0, 0, 0)
    gos = grad_out.stride() if grad_out is not None and grad_mode == GRAD_PER_PIXEL else (0, 0, 0)
    launch(
        kernel, grid, logits,
        logits, target, *tables, dummy if loss is None else loss, partials, counts,
        *weight_ptrs(class_weight, pixel_weight, wsums, dummy),
        dummy if grad is None else grad, dummy if grad_out is None else grad_out,
        P, HW, Wd,
        *logits.stride(), *target.stride(), *gs, *gos,
        *scalars,
        BLOCK_C=block_c, BLOCK_P=block_p, ACC=tl_acc(logits.dtype), LOSS_MODE=loss_mode, GRAD_MODE=grad_mode,
        HAS_CW=class_weight is not None, HAS_PW=pixel_weight is not None,
        num_warps=warps, **constexprs,
    )
    return partials, counts, wsums


# ----------------------------------------------------------------------------------- class and pixel weights
# (docs/MATH.md §6.6) pixel p with leaf label y weighs w_p = cw[y] * pw[p]; the kernels read cw (an L-element
# table) by the label they already hold and pw (when given) once per labelled pixel, by its flat index
# p = (n*H + h)*W + w, and fold w_p into the per-pixel loss and the gradient's scale. "mean" divides by the
# sum of the labelled pixels' class weights (per-program partials next to the counts), or their number.

def weight_args(class_weight: Optional[torch.Tensor], pixel_weight: Optional[torch.Tensor], logits: torch.Tensor,
                target: torch.Tensor):
    """The weights as the Triton ops take them: ``class_weight`` contiguous in the accumulation dtype (L
    values), ``pixel_weight`` contiguous (the target's ``(N, H, W)``, indexed by the flat pixel; a copy only
    when it is not contiguous already, e.g. expanded) in its own float dtype (the kernels convert it as they
    read it); ``None`` where absent. TypeError / ValueError for a weight that is not a floating-point tensor
    on the logits' device of the right size."""
    if class_weight is not None:
        if not isinstance(class_weight, torch.Tensor) or not class_weight.dtype.is_floating_point:
            raise TypeError(f"class_weight must be a floating-point tensor, got "
                            f"{getattr(class_weight, 'dtype', type(class_weight).__name__)}")
        if class_weight.dim() != 1 or class_weight.device != logits.device:
            raise ValueError(f"class_weight must be one weight per leaf on {logits.device}, got shape "
                             f"{tuple(class_weight.shape)} on {class_weight.device}")
        class_weight = class_weight.to(acc_dtype(logits.dtype)).contiguous()
    if pixel_weight is not None:
        check_pixel_weight(pixel_weight, target)
        pixel_weight = pixel_weight.contiguous()
    return class_weight, pixel_weight


def check_pixel_weight(pixel_weight, target: torch.Tensor) -> None:
    """TypeError / ValueError for a ``pixel_weight`` that is not a floating-point tensor of the target's shape
    on its device (the custom ops' own check: the public API checks it first)."""
    if not isinstance(pixel_weight, torch.Tensor) or not pixel_weight.dtype.is_floating_point:
        raise TypeError(f"pixel_weight must be a floating-point tensor, got "
                        f"{getattr(pixel_weight, 'dtype', type(pixel_weight).__name__)}")
    if tuple(pixel_weight.shape) != tuple(target.shape) or pixel_weight.device != target.device:
        raise ValueError(f"pixel_weight must have the target's shape {tuple(target.shape)} on {target.device}, got "
                         f"{tuple(pixel_weight.shape)} on {pixel_weight.device}")


def check_class_weight(class_weight, L: int, logits: torch.Tensor) -> None:
    """TypeError / ValueError for a ``class_weight`` the kernels cannot read: L values in the accumulation
    dtype, contiguous, on the logits' device (what :func:`weight_args` makes)."""
    if not isinstance(class_weight, torch.Tensor) or class_weight.dtype != acc_dtype(logits.dtype):
        raise TypeError(f"class_weight must be a {acc_dtype(logits.dtype)} tensor (the accumulation dtype), got "
                        f"{getattr(class_weight, 'dtype', type(class_weight).__name__)}")
    if tuple(class_weight.shape) != (L,) or not class_weight.is_contiguous() or class_weight.device != logits.device:
        raise ValueError(f"class_weight must be {L} contiguous values on {logits.device}, got shape "
                         f"{tuple(class_weight.shape)} on {class_weight.device}")


def check_weight_ops(class_weight, pixel_weight, L: int, logits: torch.Tensor, target: torch.Tensor) -> None:
    """The custom ops' check of their weight arguments (a call straight to ``torch.ops.hss_triton``)."""
    if class_weight is not None:
        check_class_weight(class_weight, L, logits)
    if pixel_weight is not None:
        check_pixel_weight(pixel_weight, target)
        if not pixel_weight.is_contiguous():
            raise ValueError("pixel_weight must be contiguous (the kernels index it by the flat pixel)")


def new_partials(programs: int, logits: torch.Tensor, class_weight=None):
    """(partials, counts, weight sums) of ``programs`` programs: the accumulation dtype, int32, and the
    accumulation dtype again with ``class_weight`` (else an unwritten element)."""
    partials = torch.empty(programs, dtype=acc_dtype(logits.dtype), device=logits.device)
    counts = torch.empty_like(partials, dtype=torch.int32)
    wsums = torch.empty_like(partials) if class_weight is not None else partials[:1]
    return partials, counts, wsums


def weight_ptrs(class_weight, pixel_weight, wsums, dummy):
    """The kernels' (cw, pw, weight-sum partials) pointer arguments, ``dummy`` for an absent weight."""
    return (dummy if class_weight is None else class_weight, dummy if pixel_weight is None else pixel_weight,
            wsums)


def weight_sum(wsums: torch.Tensor, class_weight) -> torch.Tensor:
    """The forward ops' ``weight_sum`` output: the sum of the per-program partials (fixed order) with
    ``class_weight``, else an empty tensor (the count is the denominator)."""
    if class_weight is None:
        return wsums.new_empty((0,))
    return wsums.sum()


def reduce_partials(partials: torch.Tensor, counts: torch.Tensor, reduction: str,
                    wsum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fixed-order second stage of the batch reduction (no atomics: bitwise the same on every run); "mean"
    divides by the count of labelled pixels, or by ``wsum`` (the sum of their class weights, 0-dim) when
    it is given and not empty (docs/MATH.md §6.6); 0 when no pixel is labelled."""
    total = partials.sum()
    if reduction == "sum":
        return total
    return total / mean_denominator(counts.sum(), wsum, total.dtype)


def check_call(logits: torch.Tensor, target: torch.Tensor, reduction: str, single_pass: bool, channels: str):
    """ValueError for a call the kernels cannot take, which the public API never makes: logits not 4-D
    or target not 3-D (``channels`` names the logits' channel axis in the message: "L" leaves or "V"
    nodes), or single_pass (a keyword of this backend's own functions) with reduction="none"."""
    if logits.dim() != 4 or target.dim() != 3:
        raise ValueError(f"the Triton backend takes (N, {channels}, H, W) logits and (N, H, W) targets, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    if single_pass and reduction == "none":
        raise ValueError("single_pass needs reduction='mean' or 'sum' (the gradient of 'none' depends on "
                         "the incoming per-pixel gradient)")


def check_upsample(logits, target, upsample, single_pass):
    """ValueError for an ``upsample`` the fused kernels cannot take: other than "bilinear", with
    ``single_pass`` (the fused upsampling has its own backward), or sizes that do not fit."""
    if upsample != "bilinear":
        raise ValueError(f"upsample must be None or 'bilinear', got {upsample!r}")
    if single_pass:
        raise ValueError("single_pass does not take upsample: the fused upsampling has its own backward "
                         "(call without single_pass)")
    N, _, h, w = logits.shape
    if target.shape[0] != N or target.shape[1] < h or target.shape[2] < w or h < 1 or w < 1:
        raise ValueError(f"upsample='bilinear' takes logits (N, L, h, w), h, w >= 1, and a target (N, H, W) with "
                         f"H >= h, W >= w; got {tuple(logits.shape)} and {tuple(target.shape)}")


def grad_scale(grad_out: torch.Tensor, count: torch.Tensor, reduction: str, dtype: torch.dtype,
               wsum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The one-element factor d(loss)/d(weighted per-pixel loss) for mean/sum, on the device (no host sync);
    ``wsum``: as :func:`hss_kernels._checks.mean_denominator`'s ``weight_sum``."""
    g = grad_out.reshape(1).to(dtype)
    if reduction == "mean":
        g = g / mean_denominator(count, wsum, dtype)
    return g


def backward_grad_out(grad_out: torch.Tensor, count: torch.Tensor, reduction: str, dtype: torch.dtype,
                      wsum: Optional[torch.Tensor] = None):
    """(grad_output argument, GRAD_MODE) of a backward launch: the per-pixel grad_output itself for "none"
    (any strides, a stride-0 expand included), else its one-element scale (:func:`grad_scale`)."""
    if reduction == "none":
        return grad_out, GRAD_PER_PIXEL
    return grad_scale(grad_out, count, reduction, dtype, wsum), GRAD_SCALAR


def single_pass_scale(target: torch.Tensor, ignore_index: int, reduction: str, dtype: torch.dtype,
                      class_weight=None) -> torch.Tensor:
    """The single pass's one-element gradient scale, before the kernel runs: 1 for "sum", else one over the
    count of labelled pixels or (with ``class_weight``) the sum of their class weights."""
    valid = target != ignore_index
    count = valid.sum()
    wsum = None
    if class_weight is not None and reduction == "mean":
        cw = class_weight[target.long().clamp(0, class_weight.numel() - 1)]
        wsum = torch.where(valid, cw, torch.zeros((), dtype=cw.dtype, device=cw.device)).sum()
    return grad_scale(torch.ones((), dtype=dtype, device=target.device), count, reduction, dtype, wsum)


# ----------------------------------------------------------------------------------- in-kernel pieces
# Shared by the loss kernels (_hierarchical_softmax_kernel, _tree_min_kernel). LOSS_MODE and GRAD_MODE are
# the LOSS_* / GRAD_* values above, passed as constexprs.

def fast_exp(logits: torch.Tensor) -> bool:
    """Whether a kernel on ``logits`` may use :func:`exp2`'s hardware form: compiled, float32 math."""
    return not interpreted(logits.device) and acc_dtype(logits.dtype) == torch.float32


@triton.jit
def mufu(x, OP: tl.constexpr, FAST: tl.constexpr):
    """The special function OP ("ex2": 2^x, "lg2": log2 x, "rcp": 1/x) of float32 x. FAST: the GPU's
    OP.approx.ftz.f32 alone (one MUFU instruction; results below 2^-126 flush to 0, where tl.exp2 adds a
    denormal fix-up of three instructions around it); else tl.exp2 / tl.log2 / a division (float64, the
    interpreter)."""
    if FAST:
        return tl.inline_asm_elementwise(OP + ".approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)
    elif OP == "ex2":
        return tl.exp2(x)
    elif OP == "lg2":
        return tl.log2(x)
    else:
        return 1.0 / x


@triton.jit
def exp2(x, FAST: tl.constexpr):
    """2^x: mufu(x, "ex2", FAST)."""
    return mufu(x, "ex2", FAST)


@triton.jit
def pixel_offsets(P, HW, W, sxn, sxh, sxw, stn, sth, stw, sgn, sgh, sgw, son, soh, sow,
                  BLOCK_P: tl.constexpr, FLAT: tl.constexpr, VEC: tl.constexpr):
    """(pid, p, pmask, xpix, tpix, gpix, opix): the program's pixels p (int64), their mask and their offsets
    in the logits, target, gradient and per-pixel grad_output. FLAT: H×W is one run of pixels in every
    tensor, indexed as (n, h*W + w) on a (pixel blocks, N) grid, which lets the compiler prove that
    pixels are contiguous; VEC: the length of the runs of consecutive pixels it may assume (the widest
    load it makes). Else (n, h, w) from p on a 1-D grid."""
    if FLAT:
        pid = tl.program_id(1) * tl.num_programs(0) + tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)
        hw = tl.max_contiguous(tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P), VEC)
        hw = hw.to(tl.int64)
        p = n * HW + hw
        pmask = (hw < HW) & (p < P)  # P = 0 when H or W is 0 (HW is then 1)
        xpix = n * sxn + hw * sxw
        tpix = n * stn + hw * stw
        gpix = n * sgn + hw * sgw
        opix = n * son + hw * sow
    else:
        pid = tl.program_id(0)
        p, pmask, n, h, w = pixel_coords(pid, P, HW, W, BLOCK_P)
        xpix = n * sxn + h * sxh + w * sxw
        tpix = n * stn + h * sth + w * stw
        gpix = n * sgn + h * sgh + w * sgw
        opix = n * son + h * soh + w * sow
    return pid, p, pmask, xpix, tpix, gpix, opix


@triton.jit
def pixel_coords(pid, P, HW, W, BLOCK_P: tl.constexpr):
    """The program's pixels p = (n*H + h)*W + w (int64, so offsets may pass 2^31), their mask, n, h, w."""
    p = pid.to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P).to(tl.int64)
    pmask = p < P
    n = p // HW
    hw = p - n * HW
    h = hw // W
    w = hw - h * W
    return p, pmask, n, h, w


@triton.jit
def load_labels(t_ptrs, pmask, ignore_index, L: tl.constexpr):
    """(label, valid, bad) of each pixel from its label pointers: valid = counts (in range and not
    ignore_index), bad = counts but outside [0, L); label is 0 where not valid or bad, so that it is a
    safe table index."""
    y = tl.load(t_ptrs, mask=pmask, other=0).to(tl.int64)
    valid = pmask & (y != ignore_index)  # the pixels that count
    # A label outside [0, L) that is not ignore_index reads no table: the pixel's loss and gradient
    # are NaN (the public API rejects such labels, but not under torch.compile).
    bad = valid & ((y < 0) | (y >= L))
    y = tl.where(valid & ~bad, y, 0)
    return y, valid, bad


@triton.jit
def weigh(v, y, p, valid, cw_ptr, pw_ptr, ACC: tl.constexpr, HAS_CW: tl.constexpr, HAS_PW: tl.constexpr):
    """``v`` (per pixel: a loss or a gradient scale) times the pixel's class weight cw[y] (HAS_CW) and pixel
    weight pw[p] (HAS_PW; read at labelled pixels only), in that order (reference.weigh_loss's); ``v`` itself
    without weights. ``y`` must be a safe table index (as :func:`load_labels` gives)."""
    if HAS_CW:
        v = v * tl.load(cw_ptr + y, mask=valid, other=0.0).to(ACC)
    if HAS_PW:
        v = v * tl.load(pw_ptr + p, mask=valid, other=0.0).to(ACC)
    return v


@triton.jit
def store_loss(loss, valid, bad, p, pmask, pid, loss_ptr, part_ptr, cnt_ptr, LOSS_MODE: tl.constexpr,
               y, cw_ptr, pw_ptr, ws_ptr, ACC: tl.constexpr, HAS_CW: tl.constexpr, HAS_PW: tl.constexpr):
    """Per-pixel loss (0 where ignored, NaN at bad labels), times the pixel's weights (:func:`weigh`): stored
    per pixel (LOSS_PER_PIXEL), or this program's sum and count of counted pixels (LOSS_PARTIALS; with
    HAS_CW also the sum of their class weights at ws_ptr), or nothing."""
    loss = tl.where(bad, float("nan"), loss)
    loss = weigh(loss, y, p, valid, cw_ptr, pw_ptr, ACC, HAS_CW, HAS_PW)
    if LOSS_MODE == 1:
        tl.store(loss_ptr + p, tl.where(valid, loss, 0.0), mask=pmask)
    if LOSS_MODE == 2:
        tl.store(part_ptr + pid, tl.sum(tl.where(valid, loss, 0.0), axis=0))
        tl.store(cnt_ptr + pid, tl.sum(valid.to(tl.int32), axis=0))
        if HAS_CW:
            cw = tl.load(cw_ptr + y, mask=valid, other=0.0).to(ACC)
            tl.store(ws_ptr + pid, tl.sum(tl.where(valid, cw, 0.0), axis=0))


@triton.jit
def store_grad(grad, g_ptrs, go_ptr, go_off, valid, bad, pmask, mask2, GRAD_MODE: tl.constexpr):
    """Stores the [channels, pixels] tile d(per-pixel loss)/dx times grad_output (one value at go_ptr for
    GRAD_SCALAR, per pixel at go_ptr + go_off for GRAD_PER_PIXEL), NaN at bad labels, 0 at ignored pixels,
    in the gradient's dtype."""
    if GRAD_MODE == 1:
        grad = grad * tl.load(go_ptr).to(grad.dtype)
    else:
        grad = grad * tl.load(go_ptr + go_off, mask=pmask, other=0.0).to(grad.dtype)[None, :]
    grad = tl.where(valid[None, :], tl.where(bad[None, :], float("nan"), grad), 0.0)
    tl.store(g_ptrs, grad.to(g_ptrs.dtype.element_ty), mask=mask2)


# ----------------------------------------------------------------------------------- bilinear upsampling
# Shared by the kernels that fuse upsample="bilinear" (docs/MATH.md §6): the stencil of a full-resolution
# pixel, the interpolation itself, the argument check; the per-axis tables with each input index's window of
# outputs (the tree-min's gathering backward; the hierarchical softmax's backward has its own, with runs).

@functools.lru_cache(maxsize=64)
def interp_axis(n_in: int, n_out: int, align_corners: bool, dtype: torch.dtype):
    """One axis of the interpolation (docs/MATH.md §6.1, ATen's rule), computed in ``dtype`` (float32 or
    float64, as F.interpolate of the accumulation dtype does): (i0, i1, lambda) per output index, i0
    nondecreasing."""
    np_t = np.float64 if dtype == torch.float64 else np.float32
    dst = np.arange(n_out).astype(np_t)
    if align_corners:
        scale = np_t(n_in - 1) / np_t(n_out - 1) if n_out > 1 else np_t(0)
        src = scale * dst
    else:
        scale = np_t(n_in) / np_t(n_out)
        src = np.maximum(scale * (dst + np_t(0.5)) - np_t(0.5), np_t(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.where(i0 < n_in - 1, i0 + 1, i0)
    lam = np.clip(src - i0.astype(np_t), np_t(0), np_t(1)).astype(np_t)
    return i0, i1, lam


@functools.lru_cache(maxsize=64)
def up_axis(n_in: int, n_out: int, align_corners: bool, dtype: torch.dtype):
    """:func:`interp_axis`'s (i0, i1, lambda), and per input index i the window of outputs whose stencil
    holds it (those whose i0 is i - 1 or i: a run, i0 being nondecreasing), as (start, count)."""
    i0, i1, lam = interp_axis(n_in, n_out, align_corners, dtype)
    idx = np.arange(n_in)
    start = np.searchsorted(i0, idx - 1, side="left")
    count = np.searchsorted(i0, idx, side="right") - start
    return i0, i1, lam, start, count


@functools.lru_cache(maxsize=64)
def up_tables(h: int, w: int, H: int, W: int, align_corners: bool, dtype: torch.dtype, device: torch.device):
    """The kernels' interpolation tables on ``device``: indices int32 [i0 (H), i1 (H), i0 (W), i1 (W)],
    weights in ``dtype`` [lambda (H), lambda (W)], windows int32 [start (h), count (h), start (w),
    count (w)], and the longest window per axis (KY, KX)."""
    ry, rx = up_axis(h, H, align_corners, dtype), up_axis(w, W, align_corners, dtype)
    idx = torch.from_numpy(np.concatenate([ry[0], ry[1], rx[0], rx[1]]).astype(np.int32))
    lam = torch.from_numpy(np.concatenate([ry[2], rx[2]]))
    win = torch.from_numpy(np.concatenate([ry[3], ry[4], rx[3], rx[4]]).astype(np.int32))
    return (idx.to(device), lam.to(device), win.to(device), int(ry[4].max(initial=0)), int(rx[4].max(initial=0)))


@triton.jit
def lerp(ptrs, u00, u01, u10, u11, lx, ly, mask, ACC: tl.constexpr):
    """The bilinear interpolation (docs/MATH.md §6.1) at ``ptrs`` (the channels' base pointers) of the four
    stencil values at offsets u00 (row i0, column i0), u01, u10, u11 with weights lx, ly, in ACC, in
    F.interpolate's order (columns within each source row, then the rows); 0 where masked off."""
    x00 = tl.load(ptrs + u00, mask=mask, other=0.0).to(ACC)
    x01 = tl.load(ptrs + u01, mask=mask, other=0.0).to(ACC)
    x10 = tl.load(ptrs + u10, mask=mask, other=0.0).to(ACC)
    x11 = tl.load(ptrs + u11, mask=mask, other=0.0).to(ACC)
    return (1.0 - ly) * ((1.0 - lx) * x00 + lx * x01) + ly * ((1.0 - lx) * x10 + lx * x11)


# The fused forwards' stencils, per image: a program owns BLOCK_P pixels of one image (1-D grid of N x
# cdiv(H*W, BLOCK_P) programs), so the image's base is one scalar pointer and each stencil offset within it an
# int32 (int64 only where an image's logits pass 2^31 elements: OFF64); the pixels past the image are clamped
# to its last one, so that no stencil load needs a mask.

def up_off64(logits: torch.Tensor) -> bool:
    """The OFF64 constexpr of the fused forwards: whether an offset within one image of ``logits``
    (channels, rows and columns; the batch stride is applied once, in 64 bits) can pass 2^31 - 1."""
    _, c, h, w = logits.shape
    s = logits.stride()
    return (c - 1) * abs(s[1]) + (h - 1) * abs(s[2]) + (w - 1) * abs(s[3]) >= 2**31


# The fused kernels' compiled-in channel strides (up_sxc): at most UP_SXC_LIMIT distinct ones per process.
UP_SXC_LIMIT = 4
_up_sxc_seen: set = set()
_up_sxc_lock = threading.Lock()


def up_sxc(logits: torch.Tensor) -> int:
    """The SXC constexpr of the fused-upsampling kernels: the low-resolution logits' channel stride compiled in,
    so that the loads of a pixel's channels are one address per stencil corner plus immediate offsets (the sm_90
    model, hierarchical softmax forward, float32 NCHW, s = 4: 31.4 -> 26.9 SASS per element), or 0: the stride
    read at run time. Each stride compiled in is a compile of its own, so only the first UP_SXC_LIMIT distinct
    strides a process meets are (a training run's crops have one; evaluation at whole images may add a few);
    later ones, a stride of 1 (Triton specializes that itself: channels_last) and a single channel get 0."""
    stride = int(logits.stride(1))
    if logits.shape[1] <= 1 or stride <= 1:
        return 0
    with _up_sxc_lock:
        if stride not in _up_sxc_seen:
            if len(_up_sxc_seen) >= UP_SXC_LIMIT:
                return 0
            _up_sxc_seen.add(stride)
    return stride


@triton.jit
def channel_stride64(sxc, SXC: tl.constexpr):
    """The channel stride as an int64 scalar: the compiled-in SXC (:func:`up_sxc`) where it is > 0, else sxc."""
    if SXC > 0:
        return tl.full([], SXC, tl.int64)
    else:
        return tl.cast(sxc, tl.int64)


def up_grid(target: torch.Tensor, block_p: int):
    """The fused forwards' 1-D grid: cdiv(H*W, block_p) programs per image, N images (at least one program)."""
    N, H, W = target.shape
    return (max(N * triton.cdiv(max(H * W, 1), block_p), 1),)


@triton.jit
def up_image_pixels(P, HW, W, BLOCK_P: tl.constexpr):
    """(pid, n, p, pmask, h, w) of a fused forward's program: its image n (int64 scalar), its pixels' flat
    index p = n*HW + h*W + w (int64), their mask, and their row h and column w (int32) clamped to the image's
    last pixel where past it."""
    pid = tl.program_id(0)
    nb = tl.cdiv(HW, BLOCK_P)
    n = pid // nb
    hw = (pid - n * nb) * BLOCK_P + tl.arange(0, BLOCK_P)
    n = n.to(tl.int64)
    p = n * HW + hw
    pmask = (hw < HW) & (p < P)  # P = 0 when the batch is empty (HW is then at least 1)
    hw = tl.minimum(hw, HW - 1)
    h = hw // W
    return pid, n, p, pmask, h, hw - h * W


@triton.jit
def up_stencil(ui_ptr, ul_ptr, h, w, Hh, W, sxh, sxw, OFF64: tl.constexpr):
    """The 2x2 stencil of full-resolution pixels (h, w) (in range) from the per-axis tables (:func:`up_tables`'
    first two): its offsets u00 (row i0, column i0), u01, u10, u11 within the low-resolution image, int32
    (int64 with OFF64), and the weights (lx, ly) of its second column and row."""
    iy0 = tl.load(ui_ptr + h)
    iy1 = tl.load(ui_ptr + Hh + h)
    ix0 = tl.load(ui_ptr + 2 * Hh + w)
    ix1 = tl.load(ui_ptr + 2 * Hh + W + w)
    if OFF64:
        iy0 = iy0.to(tl.int64)
        iy1 = iy1.to(tl.int64)
        ix0 = ix0.to(tl.int64)
        ix1 = ix1.to(tl.int64)
    r0 = iy0 * sxh
    r1 = iy1 * sxh
    c0 = ix0 * sxw
    c1 = ix1 * sxw
    return r0 + c0, r0 + c1, r1 + c0, r1 + c1, tl.load(ul_ptr + Hh + w), tl.load(ul_ptr + h)


@triton.jit
def lerp_at(xc, u00, u01, u10, u11, wx0, wx1, wy0, wy1, ACC: tl.constexpr):
    """The bilinear interpolation at scalar pointer ``xc`` (one channel of one image) of the stencil values at
    offsets u00 .. u11 (unmasked: in range), with the column weights wx0 = 1 - lx, wx1 = lx and the row
    weights wy0, wy1 (1 - ly and ly, or both times a constant), in F.interpolate's order (columns within
    each source row, then the rows)."""
    x00 = tl.load(xc + u00).to(ACC)  # sm90: logits
    x01 = tl.load(xc + u01).to(ACC)  # sm90: logits
    x10 = tl.load(xc + u10).to(ACC)  # sm90: logits
    x11 = tl.load(xc + u11).to(ACC)  # sm90: logits
    return wy0 * (wx0 * x00 + wx1 * x01) + wy1 * (wx0 * x10 + wx1 * x11)


@triton.jit
def lerp_tile(xc, u00, u01, u10, u11, wx0, wx1, wy0, wy1, ACC: tl.constexpr, cmask=None):
    """:func:`lerp_at` of G channels at once: the [pixels, G] tile of the channels at pointers ``xc`` ([G]: each
    a channel of one image), interpolated at the pixels' stencils (offsets u00 .. u11, weights as lerp_at's:
    [pixels] vectors) in the same order of operations; ``cmask`` ([G], optional): the channels to read (the
    others are 0, not loaded). Four loads of [pixels, G] tiles in place of 4·G loads of [pixels] vectors, the
    same LDGs per thread: neither axis of a gather is contiguous, and Triton's coalescing pass then puts the
    threads along the first axis, the pixels, so that each thread holds its pixels' G channels (_tree.unpack
    splits them without data movement; a [G, pixels] tile gets its channels across the threads, and layout
    conversions through shared memory). That pass's time grows with the number of memory ops times the
    kernel's size: see decode.py's _load_nodes_up."""
    if cmask is None:
        x00 = tl.load(xc[None, :] + u00[:, None]).to(ACC)  # sm90: logits
        x01 = tl.load(xc[None, :] + u01[:, None]).to(ACC)  # sm90: logits
        x10 = tl.load(xc[None, :] + u10[:, None]).to(ACC)  # sm90: logits
        x11 = tl.load(xc[None, :] + u11[:, None]).to(ACC)  # sm90: logits
    else:
        m = cmask[None, :] & (u00 == u00)[:, None]
        x00 = tl.load(xc[None, :] + u00[:, None], mask=m, other=0.0).to(ACC)  # sm90: logits
        x01 = tl.load(xc[None, :] + u01[:, None], mask=m, other=0.0).to(ACC)  # sm90: logits
        x10 = tl.load(xc[None, :] + u10[:, None], mask=m, other=0.0).to(ACC)  # sm90: logits
        x11 = tl.load(xc[None, :] + u11[:, None], mask=m, other=0.0).to(ACC)  # sm90: logits
    return wy0[:, None] * (wx0[:, None] * x00 + wx1[:, None] * x01) + wy1[:, None] * (wx0[:, None] * x10
                                                                                    + wx1[:, None] * x11)
