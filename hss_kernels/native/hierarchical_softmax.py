"""The hierarchical softmax loss on the native kernels: ``torch.ops.hss_kernels.hierarchical_softmax_fwd``
and ``hierarchical_softmax_bwd`` (``csrc/cpu/hierarchical_softmax.cpp``,
``csrc/cuda/hierarchical_softmax.cu``), their fake kernels and autograd. Class and pixel weights are fused
into the kernels (``hierarchical_softmax_loss.takes_weights``, docs/MATH.md §6.6): the forward multiplies each
labelled pixel's loss by ``class_weight[y] * pixel_weight[i]`` and returns the sum of the class weights (the
"mean"'s denominator), the backward multiplies each labelled pixel's upstream gradient by the same weight."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .. import tables
from ..tree import Tree
from ._common import (acc_dtype, grad_like, new_loss, reduce, register_no_double_backward, upsample_code,
                      weight_args)

__all__ = ["hierarchical_softmax_loss"]

_FWD = "hss_kernels::hierarchical_softmax_fwd"
_BWD = "hss_kernels::hierarchical_softmax_bwd"


def hierarchical_softmax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    tree: Tree,
    level_weights: Optional[Sequence[float]] = None,
    eps: float = 0.0,
    ignore_index: int = 255,
    reduction: str = "mean",
    upsample: Optional[str] = None,
    align_corners: bool = False,
    class_weight: Optional[torch.Tensor] = None,
    pixel_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """:func:`hss_kernels.reference.hierarchical_softmax_loss` with fused C++/CUDA kernels.
    ``logits`` (N, L, H, W), or (N, L, h, w) with ``upsample``, ``target`` (N, H, W), already checked by
    the public API; ``class_weight`` (L,) and ``pixel_weight`` (the target's shape, any strides), both
    optional, applied in the kernels (docs/MATH.md §6.6) as ``reference.weigh_loss`` does (weights that
    require a gradient never come here: functional._run applies them by ``weigh_loss``)."""
    acc = acc_dtype(logits.dtype)
    w = tables.level_weight_vector(tree, level_weights, acc, logits.device)
    group = tables.leaf_group(tree, logits.device)
    up = upsample_code(upsample)
    cw, pw = weight_args(class_weight, pixel_weight, acc)
    loss, _, count, weight_sum = torch.ops.hss_kernels.hierarchical_softmax_fwd(
        logits, target.long(), group, w, float(eps), int(ignore_index), reduction == "none", up, bool(align_corners),
        cw, pw)
    return reduce(loss, count, reduction, weight_sum if cw is not None else None)


hierarchical_softmax_loss.takes_weights = True  # functional._run passes class_weight / pixel_weight


@torch.library.register_fake(_FWD)
def _(logits, target, leaf_group, level_weights, eps, ignore_index, per_pixel, upsample=0, align_corners=False,
      class_weight=None, pixel_weight=None):
    loss, count = new_loss(logits, target, per_pixel)
    stats = logits.new_empty((leaf_group.shape[0] + 1, *target.shape), dtype=acc_dtype(logits.dtype))
    return loss, stats, count, logits.new_empty((), dtype=acc_dtype(logits.dtype))


@torch.library.register_fake(_BWD)
def _(grad, logits, target, stats, leaf_group, level_weights, eps, ignore_index, upsample=0, align_corners=False,
      class_weight=None, pixel_weight=None):
    return grad_like(logits)


def _setup_context(ctx, inputs, output):
    (logits, target, leaf_group, level_weights, eps, ignore_index, _, upsample, align_corners, class_weight,
     pixel_weight) = inputs
    ctx.save_for_backward(logits, target, output[1], leaf_group, level_weights, class_weight, pixel_weight)
    ctx.opts = (eps, ignore_index, upsample, align_corners)


def _backward(ctx, grad_loss, grad_stats, grad_count, grad_weight_sum):
    logits, target, stats, leaf_group, level_weights, class_weight, pixel_weight = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.hss_kernels.hierarchical_softmax_bwd(grad_loss, logits, target, stats, leaf_group,
                                                              level_weights, *ctx.opts, class_weight, pixel_weight)
    return (grad,) + (None,) * 10


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)
register_no_double_backward(_BWD)
