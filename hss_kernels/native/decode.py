"""Hierarchical decoding on the native kernels: ``torch.ops.hss_kernels.decode`` (``csrc/cpu/decode.cpp``,
``csrc/cuda/decode.cu``) and its fake kernel. Not differentiable: it returns labels."""
from __future__ import annotations

import torch

from ..tree import Tree

__all__ = ["decode", "path_table"]

_ACT = {"sigmoid": 0, "softmax": 1}
_IDENTITY = 2
_SCORE = {"sum": 0, "mean": 1}


def path_table(tree: Tree, device, leaf_logits: bool) -> torch.Tensor:
    """The (L, D) int32 path table the decode kernels read (cached per device): ``path_nodes``, or for
    leaf logits a one-node path per leaf, scored by the logit itself: the argmax (docs/MATH.md §4.3)."""
    def build():
        if leaf_logits:
            return torch.arange(tree.num_leaves, dtype=torch.int32, device=device)[:, None].contiguous()
        return tree.tables(device).path_nodes.contiguous()
    return tree.cached(("native_decode_path", str(device), leaf_logits), build)


def decode(logits: torch.Tensor, tree: Tree, activation: str = "sigmoid", score: str = "sum") -> torch.Tensor:
    """Leaf label of the best root-to-leaf path per pixel, as :func:`hss_kernels.reference.decode`.

    Args:
        logits: ``(N, C, H, W)`` on the CPU or a CUDA device, any strides; float16/bfloat16/float32
            (computed in float32) or float64. ``C = V`` node logits, or ``C = L`` (``!= V``) leaf logits
            (decoded by argmax; ``activation`` and ``score`` are then ignored).
        activation: ``"sigmoid"`` or ``"softmax"`` (over all node channels); score: ``"sum"`` or ``"mean"``.
    Returns:
        int64 ``(N, H, W)``; ties go to the lowest leaf id.
    Raises:
        ValueError on a bad option, shape or channel count.
    """
    if activation not in _ACT:
        raise ValueError(f"decode: activation must be 'sigmoid' or 'softmax', got {activation!r}")
    if score not in _SCORE:
        raise ValueError(f"decode: score must be 'sum' or 'mean', got {score!r}")
    if logits.dim() != 4:
        raise ValueError(f"decode: logits must be (N, C, H, W), got {tuple(logits.shape)}")
    C, V, L = logits.shape[1], tree.num_nodes, tree.num_leaves
    leaf_logits = C == L and C != V
    if C != V and not leaf_logits:
        raise ValueError(f"decode: logits have {C} channels; the tree has {V} nodes and {L} leaves")
    path = path_table(tree, logits.device, leaf_logits)
    act = _IDENTITY if leaf_logits else _ACT[activation]
    return torch.ops.hss_kernels.decode(logits.detach(), path, act, _SCORE[score])


@torch.library.register_fake("hss_kernels::decode")
def _(logits, path_nodes, activation, score):
    return logits.new_empty((logits.shape[0], logits.shape[2], logits.shape[3]), dtype=torch.long)
