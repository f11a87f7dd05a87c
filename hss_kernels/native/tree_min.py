"""The focal tree-min loss and the tree BCE on the native kernels, one kernel family:
``torch.ops.hss_kernels.tree_min_fwd`` and ``tree_min_bwd`` (``csrc/cpu/tree_min.cpp``,
``csrc/cuda/tree_min.cu``, with fused upsampling ``tree_min_up.cu``) with ``extrema=True`` (tree-min) or ``False`` (BCE), their fake kernels and
autograd.

Both losses are marked ``takes_weights``: ``class_weight`` and ``pixel_weight`` are fused into the kernels
(docs/MATH.md §6.6). The forward multiplies each labelled pixel's loss by ``cw[y] * pw[p]`` and also returns
the sum of ``cw[y]`` over the labelled pixels (a weighted mean's denominator); the backward multiplies each
labelled pixel's upstream gradient by the same weight. ``pixel_weight`` is read once per pixel, at the
target's (full-resolution) pixel with fused upsampling. The kernels give the weights no gradient: weights that
require one take the unweighted kernels and ``reference.weigh_loss`` (``functional._run``)."""
from __future__ import annotations

from typing import Optional

import torch

from .. import tables
from ..tree import Tree
from ..tables import tree_index
from ._common import acc_dtype, grad_like, new_loss, reduce, register_no_double_backward, upsample_code, weight_args

__all__ = ["tree_min_loss", "tree_bce_loss"]

_FWD = "hss_kernels::tree_min_fwd"
_BWD = "hss_kernels::tree_min_bwd"


def _loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, extrema, upsample,
          align_corners, class_weight, pixel_weight):
    acc = acc_dtype(logits.dtype)
    k = tables.node_weight_vector(tree, scale, normalize, acc, logits.device)
    up = upsample_code(upsample)
    cw, pw = weight_args(class_weight, pixel_weight, acc)
    loss, count, weight_sum = torch.ops.hss_kernels.tree_min_fwd(
        logits, target.long(), tree_index(tree, logits.device), k, tree.num_leaves, tree.depth, float(gamma),
        float(eps), int(ignore_index), reduction == "none", extrema, up, bool(align_corners), cw, pw)
    return reduce(loss, count, reduction, weight_sum if cw is not None else None)


def tree_min_loss(logits, target, tree: Tree, gamma: float = 2.0, scale: float = 1.0, eps: float = 0.0,
                  normalize: str = "level", ignore_index: int = 255, reduction: str = "mean",
                  upsample: Optional[str] = None, align_corners: bool = False,
                  class_weight: Optional[torch.Tensor] = None,
                  pixel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`hss_kernels.reference.tree_min_loss` with fused C++/CUDA kernels, the weights
    (``class_weight`` (L,), ``pixel_weight`` the target's shape, both float) applied in the kernels as
    ``hss_kernels.reference.weigh_loss`` applies them."""
    return _loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, True, upsample,
                 align_corners, class_weight, pixel_weight)


def tree_bce_loss(logits, target, tree: Tree, gamma: float = 0.0, scale: float = 1.0, eps: float = 0.0,
                  normalize: str = "level", ignore_index: int = 255, reduction: str = "mean",
                  upsample: Optional[str] = None, align_corners: bool = False,
                  class_weight: Optional[torch.Tensor] = None,
                  pixel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`hss_kernels.reference.tree_bce_loss` with fused C++/CUDA kernels, the weights applied in the
    kernels (see :func:`tree_min_loss`)."""
    return _loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, False, upsample,
                 align_corners, class_weight, pixel_weight)


# functional._run passes class_weight= and pixel_weight= to these and leaves the weighting to them.
tree_min_loss.takes_weights = True
tree_bce_loss.takes_weights = True


@torch.library.register_fake(_FWD)
def _(logits, target, tree_index, node_weights, num_leaves, depth, gamma, eps, ignore_index, per_pixel, extrema,
      upsample=0, align_corners=False, class_weight=None, pixel_weight=None):
    loss, count = new_loss(logits, target, per_pixel)
    return loss, count, logits.new_empty((), dtype=acc_dtype(logits.dtype))


@torch.library.register_fake(_BWD)
def _(grad, logits, target, tree_index, node_weights, num_leaves, depth, gamma, eps, ignore_index, extrema,
      upsample=0, align_corners=False, class_weight=None, pixel_weight=None):
    return grad_like(logits)


def _setup_context(ctx, inputs, output):
    (logits, target, tree_idx, node_weights, L, D, gamma, eps, ignore_index, _, extrema, upsample, align_corners,
     class_weight, pixel_weight) = inputs
    ctx.save_for_backward(logits, target, tree_idx, node_weights, class_weight, pixel_weight)
    ctx.opts = (L, D, gamma, eps, ignore_index, extrema, upsample, align_corners)


def _backward(ctx, grad_loss, grad_count, grad_weight_sum):
    logits, target, tree_idx, node_weights, class_weight, pixel_weight = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.hss_kernels.tree_min_bwd(grad_loss, logits, target, tree_idx, node_weights, *ctx.opts,
                                                  class_weight, pixel_weight)
    return (grad,) + (None,) * 14


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)
register_no_double_backward(_BWD)
