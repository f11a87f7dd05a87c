"""The Triton backend: fused loss kernels (forward, hand-written backward, optional single pass).

Runs compiled on CUDA tensors, and on CPU tensors under Triton's interpreter (thousands of times slower:
for tests, never picked by ``backend="auto"``). Importing it needs Triton; the backend registry turns an
ImportError into "unavailable" instead of an error.

Public functions beyond the registry's ``OPS``: :func:`hierarchical_softmax_loss`,
:func:`tree_min_loss` and :func:`tree_bce_loss` with an extra ``single_pass`` keyword (MATH.md §5:
the gradient is written during the forward, autograd intact), and ``*_and_grad`` versions that
return ``(loss, gradient)`` outside autograd, the fewest bytes a training step can move.

Custom ops (namespace ``hss_triton``, so that ``torch.compile(fullgraph=True)`` traces through):
``hsm_fwd``/``hsm_bwd`` and ``tree_fwd``/``tree_bwd``; their bodies launch the kernels directly,
so they also run eagerly under the interpreter.

A target value that is neither ``ignore_index`` nor a leaf id in ``[0, L)`` reads no table: that pixel's
loss is NaN (counted, so ``mean``/``sum`` are NaN) and its gradient row is NaN, as in the native backend.
Kernels launch on the logits' CUDA device whatever the current device is.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from .decode import decode as _decode
from .hierarchical_softmax import hierarchical_softmax_loss, hierarchical_softmax_loss_and_grad
from .tree_min import tree_bce_loss, tree_bce_loss_and_grad, tree_min_loss, tree_min_loss_and_grad

__all__ = ["OPS", "unavailable_reason", "hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss",
           "hierarchical_softmax_loss_and_grad", "tree_min_loss_and_grad", "tree_bce_loss_and_grad"]


def _hsm(logits, target, tree, level_weights=None, eps=0.0, ignore_index=255, reduction="mean"):
    return hierarchical_softmax_loss(logits, target, tree, level_weights=level_weights, eps=eps,
                                     ignore_index=ignore_index, reduction=reduction)


def _tree_min(logits, target, tree, gamma=2.0, scale=1.0, eps=0.0, normalize="level", ignore_index=255,
              reduction="mean"):
    return tree_min_loss(logits, target, tree, gamma=gamma, scale=scale, eps=eps, normalize=normalize,
                         ignore_index=ignore_index, reduction=reduction)


def _tree_bce(logits, target, tree, gamma=0.0, scale=1.0, eps=0.0, normalize="level", ignore_index=255,
              reduction="mean"):
    return tree_bce_loss(logits, target, tree, gamma=gamma, scale=scale, eps=eps, normalize=normalize,
                         ignore_index=ignore_index, reduction=reduction)


OPS = {
    "hierarchical_softmax_loss": _hsm,
    "tree_min_loss": _tree_min,
    "tree_bce_loss": _tree_bce,
    "decode": _decode,
}


def unavailable_reason(device) -> Optional[str]:
    """None if the Triton kernels run on ``device``: CUDA with a GPU, or the CPU (under the interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu":
        return None
    return f"Triton does not run on {device.type} tensors"
