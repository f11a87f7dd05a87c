"""torchmetrics: :class:`HierarchicalMetric`, the per-depth confusion matrices and scores of
:class:`hss_kernels.metrics.HierarchicalMetrics` as a ``torchmetrics.Metric``, so that Lightning logs it and
DDP sums it (its states are the matrices, ``dist_reduce_fx="sum"``).

    from hss_kernels.integrations.torchmetrics import HierarchicalMetric
    metric = HierarchicalMetric("cityscapes")          # an nn.Module: metric.to(device) moves its states
    metric.update(pred_leaf_labels, target)           # integer (N, H, W) tensors, 255 ignored
    metric.compute()   # {depth: {"iou", "miou", "pixel_accuracy", "mean_accuracy", "fw_iou"}}, summed over processes

torchmetrics is optional: ``import hss_kernels`` never imports it, and importing this module without it
raises an ``ImportError`` that says what to install. The plain :class:`~hss_kernels.metrics.HierarchicalMetrics`
(no torchmetrics, its own ``all_reduce``) stays what ``hss-train`` uses.
"""
from __future__ import annotations

from typing import Dict, Union

import torch

try:
    from torchmetrics import Metric
except ImportError as exc:  # pragma: no cover - exercised in a test that hides torchmetrics
    raise ImportError("hss_kernels.integrations.torchmetrics needs torchmetrics: pip install torchmetrics") from exc

from ..functional import as_tree
from ..metrics import check_labels_pair, confusion_increments, scores_from_confusion
from ..tree import Tree

__all__ = ["HierarchicalMetric"]


class HierarchicalMetric(Metric):
    """Per-depth IoU, pixel and mean accuracy of leaf-label predictions, as a ``torchmetrics.Metric``.

    Args:
        tree: a :class:`Tree` or a shipped tree's name; depth ``d`` has ``tree.num_classes(d)`` classes.
        ignore_index: target value of pixels that count for nothing (default 255).
        **kwargs: ``torchmetrics.Metric``'s options (``sync_on_compute``, ``dist_sync_fn``, ...).

    States: ``confusion_<d>`` for d = 1..D, int64 ``(K_d, K_d)`` (rows target, columns prediction), and
    ``missed_<d>``, int64 ``(K_d,)``: per target class, its pixels predicted as ``ignore_index`` (no class, a
    miss); summed over processes. :meth:`compute` returns ``{depth: scores}`` as
    :meth:`hss_kernels.metrics.HierarchicalMetrics.compute` does.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, tree: Union[Tree, str], ignore_index: int = 255, **kwargs):
        super().__init__(**kwargs)
        self.tree = as_tree(tree)
        self.ignore_index = int(ignore_index)
        for d in range(1, self.tree.depth + 1):
            k = self.tree.num_classes(d)
            self.add_state(f"confusion_{d}", default=torch.zeros(k, k, dtype=torch.int64), dist_reduce_fx="sum")
            self.add_state(f"missed_{d}", default=torch.zeros(k, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of integer leaf labels (same shape; ``ignore_index`` pixels skipped)."""
        check_labels_pair("HierarchicalMetric.update", pred, target)
        device = getattr(self, "confusion_1").device
        incs, missed = confusion_increments(self.tree, pred, target, self.ignore_index, device,
                                            "HierarchicalMetric.update")
        for d, (inc, miss) in enumerate(zip(incs, missed), start=1):
            setattr(self, f"confusion_{d}", getattr(self, f"confusion_{d}") + inc)
            setattr(self, f"missed_{d}", getattr(self, f"missed_{d}") + miss)

    def compute(self) -> Dict[int, Dict[str, Union[torch.Tensor, float]]]:
        return {d: scores_from_confusion(getattr(self, f"confusion_{d}").cpu(), missed=getattr(self, f"missed_{d}").cpu())
                for d in range(1, self.tree.depth + 1)}
