"""What the native op modules share: the reduction of a forward's output, the fake kernels' outputs and
the registration that refuses double backward. Options and labels are checked by the public API
(``hss_kernels/_checks.py``) before an op module is called."""
from __future__ import annotations

from typing import Optional

import torch

from .._checks import acc_dtype  # the kernels' accumulation dtype (csrc/include/checks.h acc_type)
from .._checks import mean_denominator

__all__ = ["acc_dtype", "reduce", "new_loss", "grad_like", "register_no_double_backward", "upsample_code",
           "weight_args"]


def reduce(loss: torch.Tensor, count: torch.Tensor, reduction: str,
           weight_sum: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The loss a forward op returned (per pixel, or the sum) reduced as asked (docs/MATH.md §5.1, §6.6):
    ``"mean"`` divides by :func:`hss_kernels._checks.mean_denominator` of the number of labelled pixels
    ``count`` and, with class weights, ``weight_sum`` (the sum of their class weights); 0 (with zero
    gradient) when every pixel is ignored."""
    if reduction != "mean":
        return loss
    return loss / mean_denominator(count, weight_sum, loss.dtype)


def weight_args(class_weight: Optional[torch.Tensor], pixel_weight: Optional[torch.Tensor], dtype: torch.dtype):
    """The weights as the ops take them: ``class_weight`` contiguous and ``pixel_weight`` (any strides) in
    the accumulation dtype ``dtype``, ``None`` where absent."""
    if class_weight is not None:
        class_weight = class_weight.to(dtype).contiguous()
    if pixel_weight is not None:
        pixel_weight = pixel_weight.to(dtype)
    return class_weight, pixel_weight


def new_loss(logits: torch.Tensor, target: torch.Tensor, per_pixel: bool):
    """The fake forward's loss (the target's shape (N, H, W), or 0-dim) and count, as checks.h new_loss
    allocates them."""
    loss = logits.new_empty(tuple(target.shape) if per_pixel else (), dtype=acc_dtype(logits.dtype))
    return loss, logits.new_empty((), dtype=torch.int64)


def grad_like(logits: torch.Tensor) -> torch.Tensor:
    """The backward ops' output: ``empty_like`` of the logits as the kernels walk them (checks.h
    dense_logits): any non-overlapping dense layout as is, anything else as a contiguous copy. A plain
    ``empty_like`` of a sliced channels_last view would be channels_last, the kernel's output NCHW, and
    torch.compile's stride assertion would fail."""
    import torch._prims_common as pc  # ATen's rule, also on fake tensors (the name changed across torch versions)
    dense = getattr(pc, "is_non_overlapping_and_dense_or_false", None) or pc.is_non_overlapping_and_dense
    return torch.empty_like(logits if dense(logits) else logits.contiguous())


def upsample_code(upsample) -> int:
    """The ops' ``upsample`` argument: 0 (none) or 1 (bilinear, fused into the CPU and CUDA kernels)."""
    return 0 if upsample is None else 1


def _no_double_backward(ctx, *grads):
    raise RuntimeError("the native backend's losses do not support double backward (use backend='reference')")


def register_no_double_backward(op: str) -> None:
    """Registers autograd for a backward op ``op`` that raises when differentiated."""
    torch.library.register_autograd(op, _no_double_backward, setup_context=lambda ctx, inputs, output: None)
