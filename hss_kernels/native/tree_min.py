"""The focal tree-min loss and the tree BCE on the native kernels, one kernel family:
``torch.ops.hss_kernels.tree_min_fwd`` and ``tree_min_bwd`` (``csrc/cpu/tree_min.cpp``,
``csrc/cuda/tree_min.cu``) with ``extrema=True`` (tree-min) or ``False`` (BCE), their fake kernels and
autograd."""
from __future__ import annotations

from typing import Optional

import torch

from .. import tables
from ..tree import Tree
from ..tables import tree_index
from ._common import acc_dtype, grad_like, new_loss, reduce, register_no_double_backward, upsample_code

__all__ = ["tree_min_loss", "tree_bce_loss"]

_FWD = "hss_kernels::tree_min_fwd"
_BWD = "hss_kernels::tree_min_bwd"


def _loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, extrema, upsample,
          align_corners):
    k = tables.node_weight_vector(tree, scale, normalize, acc_dtype(logits.dtype), logits.device)
    up = upsample_code(upsample)
    loss, count = torch.ops.hss_kernels.tree_min_fwd(
        logits, target.long(), tree_index(tree, logits.device), k, tree.num_leaves, tree.depth, float(gamma),
        float(eps), int(ignore_index), reduction == "none", extrema, up, bool(align_corners))
    return reduce(loss, count, reduction)


def tree_min_loss(logits, target, tree: Tree, gamma: float = 2.0, scale: float = 1.0, eps: float = 0.0,
                  normalize: str = "level", ignore_index: int = 255, reduction: str = "mean",
                  upsample: Optional[str] = None, align_corners: bool = False) -> torch.Tensor:
    """:func:`hss_kernels.reference.tree_min_loss` with fused C++/CUDA kernels."""
    return _loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, True, upsample,
                 align_corners)


def tree_bce_loss(logits, target, tree: Tree, gamma: float = 0.0, scale: float = 1.0, eps: float = 0.0,
                  normalize: str = "level", ignore_index: int = 255, reduction: str = "mean",
                  upsample: Optional[str] = None, align_corners: bool = False) -> torch.Tensor:
    """:func:`hss_kernels.reference.tree_bce_loss` with fused C++/CUDA kernels."""
    return _loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, False, upsample,
                 align_corners)


@torch.library.register_fake(_FWD)
def _(logits, target, tree_index, node_weights, num_leaves, depth, gamma, eps, ignore_index, per_pixel, extrema,
      upsample=0, align_corners=False):
    return new_loss(logits, target, per_pixel)


@torch.library.register_fake(_BWD)
def _(grad, logits, target, tree_index, node_weights, num_leaves, depth, gamma, eps, ignore_index, extrema,
      upsample=0, align_corners=False):
    return grad_like(logits)


def _setup_context(ctx, inputs, output):
    logits, target, tree_idx, node_weights, L, D, gamma, eps, ignore_index, _, extrema, upsample, align_corners = inputs
    ctx.save_for_backward(logits, target, tree_idx, node_weights)
    ctx.opts = (L, D, gamma, eps, ignore_index, extrema, upsample, align_corners)


def _backward(ctx, grad_loss, grad_count):
    logits, target, tree_idx, node_weights = ctx.saved_tensors
    grad = None
    if ctx.needs_input_grad[0]:
        grad = torch.ops.hss_kernels.tree_min_bwd(grad_loss, logits, target, tree_idx, node_weights, *ctx.opts)
    return (grad,) + (None,) * 12


torch.library.register_autograd(_FWD, _backward, setup_context=_setup_context)
register_no_double_backward(_BWD)
