"""``nn.Module`` forms of the losses, in the style of ``torch.nn.CrossEntropyLoss``.

Each module holds its tree and options and calls the functional form in :mod:`hss_kernels.functional`.
``class_weight`` is a buffer (it follows ``.to(device)``); ``forward(logits, target, pixel_weight=None)``.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from . import functional as F
from .tree import Tree

__all__ = ["HierarchicalSoftmaxLoss", "TreeMinLoss", "TreeBCELoss", "TreeTripletLoss"]


def _class_weight_buffer(module: nn.Module, class_weight, num_leaves: int) -> None:
    if class_weight is not None:
        class_weight = torch.as_tensor(class_weight, dtype=torch.float32)
        if class_weight.dim() != 1 or class_weight.numel() != num_leaves:
            raise ValueError(f"{type(module).__name__}: class_weight needs one weight per leaf ({num_leaves}), got "
                             f"shape {tuple(class_weight.shape)}")
    module.register_buffer("class_weight", class_weight)


class HierarchicalSoftmaxLoss(nn.Module):
    """Hierarchical softmax loss over leaf logits; see :func:`hss_kernels.hierarchical_softmax_loss`.

    >>> loss_fn = HierarchicalSoftmaxLoss("vistas")
    >>> loss = loss_fn(logits, target)   # logits (N, 66, H, W), target (N, H, W)
    """

    def __init__(self, tree: Union[Tree, str], level_weights: Optional[Sequence[float]] = None, eps: float = 0.0,
                 ignore_index: int = 255, reduction: str = "mean", backend: str = "auto",
                 upsample: Optional[str] = None, align_corners: bool = False, class_weight=None):
        super().__init__()
        self.tree = F.as_tree(tree)
        self.level_weights = None if level_weights is None else [float(w) for w in level_weights]
        self.eps, self.ignore_index, self.reduction, self.backend = eps, ignore_index, reduction, backend
        self.upsample, self.align_corners = upsample, align_corners
        _class_weight_buffer(self, class_weight, self.tree.num_leaves)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                pixel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return F.hierarchical_softmax_loss(logits, target, self.tree, level_weights=self.level_weights,
                                           eps=self.eps, ignore_index=self.ignore_index,
                                           reduction=self.reduction, backend=self.backend,
                                           upsample=self.upsample, align_corners=self.align_corners,
                                           class_weight=self.class_weight, pixel_weight=pixel_weight)

    def extra_repr(self) -> str:
        up = f", upsample={self.upsample!r}, align_corners={self.align_corners}" if self.upsample else ""
        return f"tree={self.tree!r}, eps={self.eps}, reduction={self.reduction!r}, backend={self.backend!r}{up}"


class _NodeLoss(nn.Module):
    _fn = None
    _default_gamma = 0.0

    def __init__(self, tree: Union[Tree, str], gamma: Optional[float] = None, scale: float = 1.0, eps: float = 0.0,
                 normalize: str = "level", ignore_index: int = 255, reduction: str = "mean",
                 backend: str = "auto", upsample: Optional[str] = None, align_corners: bool = False,
                 class_weight=None):
        super().__init__()
        self.tree = F.as_tree(tree)
        self.gamma = self._default_gamma if gamma is None else gamma
        self.scale, self.eps, self.normalize = scale, eps, normalize
        self.ignore_index, self.reduction, self.backend = ignore_index, reduction, backend
        self.upsample, self.align_corners = upsample, align_corners
        _class_weight_buffer(self, class_weight, self.tree.num_leaves)

    def forward(self, logits: torch.Tensor, target: torch.Tensor,
                pixel_weight: Optional[torch.Tensor] = None) -> torch.Tensor:
        return type(self)._fn(logits, target, self.tree, gamma=self.gamma, scale=self.scale, eps=self.eps,
                              normalize=self.normalize, ignore_index=self.ignore_index,
                              reduction=self.reduction, backend=self.backend, upsample=self.upsample,
                              align_corners=self.align_corners, class_weight=self.class_weight,
                              pixel_weight=pixel_weight)

    def extra_repr(self) -> str:
        up = f", upsample={self.upsample!r}, align_corners={self.align_corners}" if self.upsample else ""
        return (f"tree={self.tree!r}, gamma={self.gamma}, scale={self.scale}, normalize={self.normalize!r}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}{up}")


class TreeMinLoss(_NodeLoss):
    """Focal tree-min loss over node logits (HSSN); see :func:`hss_kernels.tree_min_loss`. ``gamma``
    defaults to 2."""
    _fn = staticmethod(F.tree_min_loss)
    _default_gamma = 2.0


class TreeBCELoss(_NodeLoss):
    """Multi-label BCE over node logits; see :func:`hss_kernels.tree_bce_loss`. ``gamma`` defaults to 0."""
    _fn = staticmethod(F.tree_bce_loss)


class TreeTripletLoss(nn.Module):
    """HSSN's tree-triplet embedding loss; see :func:`hss_kernels.tree_triplet_loss`."""

    def __init__(self, tree: Union[Tree, str], margin: float = 0.6, max_triplets: int = 200,
                 sampling: str = "random", ignore_index: int = 255, normalize: bool = True):
        super().__init__()
        self.tree = F.as_tree(tree)
        self.margin, self.max_triplets, self.sampling = margin, max_triplets, sampling
        self.ignore_index, self.normalize = ignore_index, normalize

    def forward(self, embedding: torch.Tensor, target: torch.Tensor,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return F.tree_triplet_loss(embedding, target, self.tree, margin=self.margin,
                                   max_triplets=self.max_triplets, sampling=self.sampling, generator=generator,
                                   ignore_index=self.ignore_index, normalize=self.normalize)
