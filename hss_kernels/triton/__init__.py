"""The Triton backend: fused loss kernels (forward, hand-written backward, optional single pass) and decoding.

Runs compiled on CUDA tensors, and on CPU tensors under Triton's interpreter (thousands of times slower:
for tests, never picked by ``backend="auto"``). Importing it needs Triton; the backend registry turns an
ImportError into "unavailable" instead of an error.

One module per op: :mod:`.hierarchical_softmax`, :mod:`.tree_min` (the tree-min and tree-BCE losses,
one kernel family) and :mod:`.decode`; :mod:`._common` holds what they share, :mod:`._upsample` the band loop
of the tree losses' fused-upsampling backward (its gather kernel and scratch). ``OPS`` holds their public
functions as they are. The losses take an extra ``single_pass`` keyword (docs/MATH.md §5.6: the gradient is
written during the forward, autograd intact), and ``*_and_grad`` versions return ``(loss, gradient)``
outside autograd, the fewest bytes a training step can move.

Custom ops (namespace ``hss_triton``, so that ``torch.compile(fullgraph=True)`` traces through):
``hierarchical_softmax_fwd``/``_bwd``, ``tree_min_fwd``/``_bwd``, their fused-upsampling forms
``hierarchical_softmax_up_fwd``/``_bwd`` and ``tree_min_up_fwd``/``_bwd``, and ``decode``; their bodies launch
the kernels directly, so they also run eagerly under the interpreter.

The kernels assume what the public API checks (options, channel counts, labels). A target value that is
neither ``ignore_index`` nor a leaf id in ``[0, L)`` reads no table: that pixel's loss is NaN (counted,
so ``mean``/``sum`` are NaN) and its gradient row is NaN, as in the native backend (docs/MATH.md §5.3).
Kernels launch on the logits' CUDA device whatever the current device is.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from . import decode  # the module: its function is OPS["decode"]
from .hierarchical_softmax import hierarchical_softmax_loss, hierarchical_softmax_loss_and_grad
from .tree_min import tree_bce_loss, tree_bce_loss_and_grad, tree_min_loss, tree_min_loss_and_grad

__all__ = ["OPS", "unavailable_reason", "hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss",
           "hierarchical_softmax_loss_and_grad", "tree_min_loss_and_grad", "tree_bce_loss_and_grad"]

OPS = {
    "hierarchical_softmax_loss": hierarchical_softmax_loss,
    "tree_min_loss": tree_min_loss,
    "tree_bce_loss": tree_bce_loss,
    "decode": decode.decode,
}


def unavailable_reason(device) -> Optional[str]:
    """None if the Triton kernels run on ``device``: CUDA with a GPU, or the CPU (under the interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu":
        return None
    return f"Triton does not run on {device.type} tensors"
