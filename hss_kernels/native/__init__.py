"""The ``native`` backend: C++ (CPU, OpenMP) and CUDA kernels of the extension ``hss_kernels._C``.

The extension registers its ops with the PyTorch dispatcher under ``torch.ops.hss_kernels`` (schemas and
contracts in ``csrc/ops.cpp``); one module per op adds what PyTorch needs around them
(``register_fake`` for tracing and ``torch.compile``, ``register_autograd`` for the fused backward) and
the function the backend registry calls:

* :mod:`.hierarchical_softmax`: ``hierarchical_softmax_fwd`` / ``hierarchical_softmax_bwd``; the forward
  saves ``D + 1`` floats per pixel (the log-sum-exps) so that the backward reads the logits once and
  writes the gradient once;
* :mod:`.tree_min`: ``tree_min_fwd`` / ``tree_min_bwd``, one kernel family for the focal tree-min loss
  (``extrema=True``) and the tree BCE (``extrema=False``); the backward recomputes the per-pixel extrema
  from the logits it reads anyway; ``class_weight`` / ``pixel_weight`` are fused into both (the losses are
  marked ``takes_weights``; the forward also returns the sum of the labelled pixels' class weights);
* :mod:`.decode`: ``decode``, the best root-to-leaf path per pixel.

The forwards return the loss per pixel (``reduction="none"``) or its sum, plus the number of
non-ignored pixels; ``mean`` divides here. Every loss fuses class and pixel weights into its kernels
(``takes_weights``, docs/MATH.md §6.6): its forward also returns the sum of the labelled pixels' class
weights, the weighted ``mean``'s denominator. Float16/bfloat16/float32 logits accumulate in float32,
float64 in float64; the loss comes back in the accumulation dtype, the gradient in the logits' dtype.

Labels: a target value that is neither ``ignore_index`` nor a leaf id in ``[0, L)`` (the public API
rejects those, but not under torch.compile, where the check would need a host sync) never indexes a
table: that pixel's loss is NaN and counts as a labelled pixel, so ``mean``/``sum`` are NaN, and its
gradient row is NaN; the other pixels are unaffected. The Triton backend does the same.

The backend interface of :mod:`hss_kernels.backends`: ``OPS`` and :func:`unavailable_reason`.
"""
from __future__ import annotations

from typing import Callable, Dict, Optional

import torch

__all__ = ["OPS", "unavailable_reason"]

try:
    from .. import _C  # noqa: F401  (loading the library registers torch.ops.hss_kernels.*)
    _REASON: Optional[str] = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C = None
    _REASON = ("the C++ extension hss_kernels._C is not built: pip install --no-build-isolation -e . "
               f"({type(exc).__name__}: {exc})")

# The ops that must have a CUDA kernel for the backend to run on a CUDA device.
_OP_NAMES = ("hierarchical_softmax_fwd", "hierarchical_softmax_bwd", "tree_min_fwd", "tree_min_bwd", "decode")

OPS: Dict[str, Callable] = {}
if _C is not None:  # the op modules register fake kernels and autograd for the ops the library defines
    from .decode import decode as _decode  # (not `decode`: that name is the submodule)
    from .hierarchical_softmax import hierarchical_softmax_loss
    from .tree_min import tree_bce_loss, tree_min_loss

    OPS.update({
        "hierarchical_softmax_loss": hierarchical_softmax_loss,
        "tree_min_loss": tree_min_loss,
        "tree_bce_loss": tree_bce_loss,
        "decode": _decode,
    })
    for _fn in OPS.values():  # fused bilinear upsampling on the CPU (hss_kernels.reference's mark)
        _fn.takes_upsample = True


def unavailable_reason(device) -> Optional[str]:
    """``None`` if the native kernels run on ``device``, else why not."""
    if _C is None:
        return _REASON
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        missing = [op for op in _OP_NAMES
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(f"hss_kernels::{op}", "CUDA")]
        if missing:
            return ("the C++ extension hss_kernels._C was built without its CUDA kernels (build it with a CUDA "
                    "build of torch and CUDA_HOME set; HSS_REQUIRE_CUDA=1 makes a CPU-only build an error)")
        return None
    return f"the native backend runs on CPU and CUDA devices, not {device.type}"
