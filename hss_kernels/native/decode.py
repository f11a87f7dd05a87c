"""Hierarchical decoding on the native kernels: ``torch.ops.hss_kernels.decode`` (``csrc/cpu/decode.cpp``,
``csrc/cuda/decode.cu``) and its fake kernel. Not differentiable: it returns labels."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from ..tables import decode_walk
from ..tree import Tree

__all__ = ["decode"]

_ACT = {"sigmoid": 0, "softmax": 1}
_IDENTITY = 2
_SCORE = {"sum": 0, "mean": 1}
MAX_DEPTH = 8  # kMaxDepth, csrc/include/common.h: one running path score per depth


def decode(logits: torch.Tensor, tree: Tree, activation: str = "sigmoid", score: str = "sum",
           size: Optional[Sequence[int]] = None, align_corners: bool = False, ignore_index: int = 255) -> torch.Tensor:
    """Leaf label of the best root-to-leaf path per pixel, as :func:`hss_kernels.reference.decode`.

    Args:
        logits: ``(N, C, H, W)`` on the CPU or a CUDA device, any strides; float16/bfloat16/float32
            (computed in float32) or float64. ``C = V`` node logits, or ``C = L`` (``!= V``) leaf logits
            (decoded by argmax; ``activation`` and ``score`` are then ignored).
        activation: ``"sigmoid"`` or ``"softmax"`` (over all node channels); score: ``"sum"`` or ``"mean"``.
        size: ``(H, W)`` to decode the logits bilinearly upsampled to that size (fused in the CPU and CUDA
            kernels: the upsampled logits are never stored), ``align_corners`` as in ``F.interpolate``.
        ignore_index: the label of a pixel with a NaN in any of its (upsampled) channels.
    Returns:
        int64 ``(N, H, W)``; ties go to the lowest leaf id.
    Raises:
        ValueError for logits that are not 4-D, or node logits of a tree deeper than 8 (options and the
        channel count are checked by the public API, ``hss_kernels.decode``).
    """
    if logits.dim() != 4:
        raise ValueError(f"decode: logits must be (N, C, H, W), got {tuple(logits.shape)}")
    leaf_logits = logits.shape[1] == tree.num_leaves and logits.shape[1] != tree.num_nodes
    if not leaf_logits and tree.depth > MAX_DEPTH:
        raise ValueError(f"decode: the native kernels take trees of depth 1..{MAX_DEPTH}, got {tree.depth}")
    walk, ordered = decode_walk(tree, logits.device, leaf_logits)
    act = _IDENTITY if leaf_logits else _ACT[activation]
    logits = logits.detach()
    up = [] if size is None else [int(s) for s in size]
    return torch.ops.hss_kernels.decode(logits, walk, ordered, act, _SCORE[score], up, bool(align_corners),
                                        int(ignore_index))


@torch.library.register_fake("hss_kernels::decode")
def _(logits, walk, ordered, activation, score, size=(), align_corners=False, ignore_index=255):
    H, W = size if len(size) else logits.shape[2:]
    return logits.new_empty((logits.shape[0], H, W), dtype=torch.long)
