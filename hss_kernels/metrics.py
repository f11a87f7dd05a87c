"""Segmentation metrics at every depth of a class tree.

:class:`HierarchicalMetrics` accumulates one confusion matrix per depth ``d = 1..D`` (rows: target class,
columns: predicted class, classes numbered as in :meth:`Tree.class_names`) on the device of the label
maps, in the ``update() / compute() / reset()`` style of torchmetrics::

    metrics = HierarchicalMetrics(tree)
    for image, target in loader:
        pred = hss_kernels.decode(model(image), tree)
        metrics.update(pred, target)
    metrics.all_reduce()          # sums the matrices across processes (no-op when not distributed)
    print(metrics)                # one row per depth: mIoU, pixel accuracy, mean accuracy, fwIoU
    results = metrics.compute()   # {depth: {"iou": ..., "miou": ..., ...}}
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from .functional import as_tree
from .tree import Tree

__all__ = ["HierarchicalMetrics", "scores_from_confusion"]


def scores_from_confusion(matrix: torch.Tensor, counted: Optional[torch.Tensor] = None,
                          missed: Optional[torch.Tensor] = None) -> Dict[str, Union[torch.Tensor, float]]:
    """Scores of one ``(K, K)`` confusion matrix (rows: target, columns: prediction) and, optionally, the
    ``(K,)`` counts of each target class's pixels predicted as no class (``missed``: the prediction was the
    ignore label, e.g. :func:`hss_kernels.decode`'s label of a pixel with NaN logits). A missed pixel counts
    in its class's target pixels (a false negative, lowering its recall and IoU and the pixel accuracy) and
    in no prediction.

    Returns ``iou`` (float64 ``(K,)``, NaN for classes absent from both target and prediction), ``miou``
    (mean IoU over the classes present in the target or the prediction), ``pixel_accuracy``,
    ``mean_accuracy`` (mean recall over the classes present in the target: a class seen only in the
    prediction has no recall) and ``fw_iou`` (IoU weighted by each class's share of the target pixels).
    Every float is NaN when the matrix is empty.

    ``counted``: a bool ``(K,)`` mask of the classes the data set evaluates (default: all). The others get
    NaN IoU and recall, so they count in no mean; their predicted pixels still count against the true class.
    """
    m = matrix.to(torch.float64)
    tp = m.diagonal()
    gt = m.sum(dim=1)
    if missed is not None:
        gt = gt + missed.to(torch.float64)
    pr = m.sum(dim=0)
    union = gt + pr - tp
    total = gt.sum()
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(union > 0, tp / union.clamp(min=1), nan)
    recall = torch.where(gt > 0, tp / gt.clamp(min=1), nan)
    if counted is not None:
        counted = counted.to(device=iou.device, dtype=torch.bool)
        iou = torch.where(counted, iou, nan)
        recall = torch.where(counted, recall, nan)

    def mean(x: torch.Tensor) -> float:
        # nanmean of nothing warns and gives NaN; keep the NaN, skip the warning.
        return float(x.nanmean()) if bool((~x.isnan()).any()) else float("nan")

    if total > 0:
        pixel_accuracy = float(tp.sum() / total)
        fw_iou = float((gt * iou.nan_to_num(0.0)).sum() / total)
    else:
        pixel_accuracy = fw_iou = float("nan")
    return {
        "iou": iou,
        "miou": mean(iou),
        "pixel_accuracy": pixel_accuracy,
        "mean_accuracy": mean(recall),
        "fw_iou": fw_iou,
    }


def check_labels_pair(fn: str, pred: torch.Tensor, target: torch.Tensor) -> None:
    """TypeError unless both are integer tensors, ValueError unless their shapes match."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{fn}: {name} must hold integer leaf labels, got {t.dtype}")
    if pred.shape != target.shape:
        raise ValueError(f"{fn}: pred has shape {tuple(pred.shape)} but target {tuple(target.shape)}; they must match")


@torch.no_grad()
def confusion_increments(tree: Tree, pred: torch.Tensor, target: torch.Tensor, ignore_index: int,
                         device: torch.device, fn: str = "confusion_increments"
                         ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """One batch's int64 confusion matrices on ``device``, one ``(K_d, K_d)`` per depth (rows target, columns
    prediction; pixels whose target is ``ignore_index`` skipped), and per depth the ``(K_d,)`` counts of
    labelled pixels per target class whose ``pred`` is ``ignore_index`` (no class: a miss). ValueError for a
    ``pred`` outside ``[0, L)`` that is not ``ignore_index``, or a ``target`` outside it that is not
    ``ignore_index``."""
    L = tree.num_leaves
    sizes = [tree.num_classes(d) for d in range(1, tree.depth + 1)]
    p = pred.reshape(-1).to(device, torch.int64)
    t = target.reshape(-1).to(device, torch.int64)
    if p.numel() == 0:
        return ([torch.zeros(k, k, dtype=torch.int64, device=device) for k in sizes],
                [torch.zeros(k, dtype=torch.int64, device=device) for k in sizes])
    leaf_pred = (p >= 0) & (p < L)
    bad = ~leaf_pred & (p != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"{fn}: pred holds label {int(p[bad][0])}, outside [0, {L}) (the tree's leaves) and not "
                         f"ignore_index={ignore_index}")
    valid = t != ignore_index
    bad = ((t < 0) | (t >= L)) & valid
    if bool(bad.any()):
        raise ValueError(f"{fn}: target holds label {int(t[bad][0])}, outside [0, {L}) and not "
                         f"ignore_index={ignore_index}")
    hit, miss = valid & leaf_pred, valid & ~leaf_pred
    # One pass over the pixels builds the leaf confusion matrix; the coarser depths are sums of its
    # blocks, so their cost does not grow with the image.
    leaf = torch.bincount(t[hit] * L + p[hit], minlength=L * L).reshape(L, L)
    leaf_missed = torch.bincount(t[miss], minlength=L)
    groups = tree.tables(device).leaf_group.long()  # (D, L)
    out, missed = [], []
    for d, k in enumerate(sizes):
        g = groups[d]
        out.append(torch.zeros(k * k, dtype=torch.int64, device=device).index_add_(
            0, (g[:, None] * k + g[None, :]).reshape(-1), leaf.reshape(-1)).reshape(k, k))
        missed.append(torch.zeros(k, dtype=torch.int64, device=device).index_add_(0, g, leaf_missed))
    return out, missed


class HierarchicalMetrics:
    """Per-depth confusion matrices and IoU scores of leaf-label predictions.

    Args:
        tree: the class hierarchy (a :class:`Tree` or a shipped tree's name). Depth ``d`` has ``tree.num_classes(d)`` classes; a leaf shallower
            than ``d`` counts as its own class there (see :meth:`Tree.class_names`).
        ignore_index: target value of pixels that count for nothing (default 255).
        device: where the matrices live; default: the device of the first :meth:`update`'s ``pred``.
        ignored_leaves: leaf ids the data set does not evaluate (e.g. Vistas v1.2's 'unlabeled', whose pixels
            its loader maps to ``ignore_index``): left out of every mean, at every depth, as a class the data
            set does not list; a coarser class is left out when all its leaves are. A labelled pixel
            predicted as such a leaf is still a miss for its class.

    Attributes:
        matrices: list of ``D`` int64 tensors, ``matrices[d-1]`` of shape ``(K_d, K_d)``, rows indexed by
            the target class, columns by the predicted class.
        missed: list of ``D`` int64 tensors, ``missed[d-1]`` of shape ``(K_d,)``: per target class, its pixels
            predicted as ``ignore_index`` (no class, e.g. :func:`hss_kernels.decode`'s label of NaN logits);
            they count as misses of their class (see :func:`scores_from_confusion`).
    """

    def __init__(self, tree: Union[Tree, str], ignore_index: int = 255, device: Optional[Union[str, torch.device]] = None,
                 ignored_leaves: Sequence[int] = ()):
        self.tree = as_tree(tree)
        self.ignore_index = int(ignore_index)
        self.ignored_leaves = self._check_leaves(ignored_leaves)
        self._device_fixed = device is not None
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.matrices: List[torch.Tensor] = []
        self.missed: List[torch.Tensor] = []
        self.reset()

    def _check_leaves(self, leaves: Sequence[int]) -> List[int]:
        L = self.tree.num_leaves
        if isinstance(leaves, torch.Tensor):
            leaves = leaves.tolist()
        out = []
        for v in leaves:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < L:
                raise ValueError(f"HierarchicalMetrics: ignored_leaves must be leaf ids in [0, {L}), got {v!r}")
            out.append(int(v))
        if len(set(out)) == L:
            raise ValueError("HierarchicalMetrics: ignored_leaves leaves no leaf to evaluate")
        return sorted(set(out))

    def counted(self, depth: int) -> torch.Tensor:
        """Bool ``(K_d,)``: the classes at ``depth`` that count in the means (all but those whose leaves are all
        in ``ignored_leaves``)."""
        self.tree._check_depth(depth)
        k = self.tree.num_classes(depth)
        groups = self.tree.tables("cpu").leaf_group[depth - 1].long()
        keep = torch.ones(self.tree.num_leaves, dtype=torch.bool)
        keep[self.ignored_leaves] = False
        return torch.zeros(k, dtype=torch.bool).index_put_((groups[keep],), torch.tensor(True))

    # ------------------------------------------------------------------ accumulation
    def reset(self) -> None:
        """Zero every matrix (keeps the device)."""
        sizes = [self.tree.num_classes(d) for d in range(1, self.tree.depth + 1)]
        self.matrices = [torch.zeros(k, k, dtype=torch.int64, device=self.device) for k in sizes]
        self.missed = [torch.zeros(k, dtype=torch.int64, device=self.device) for k in sizes]
        self._updated = False

    def to(self, device) -> "HierarchicalMetrics":
        """Move the matrices to ``device`` (later updates are moved there too)."""
        self.device = torch.device(device)
        self._device_fixed = True
        self.matrices = [m.to(self.device) for m in self.matrices]
        self.missed = [m.to(self.device) for m in self.missed]
        return self

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch. ``pred`` and ``target``: integer leaf-label tensors of the same shape (any shape,
        e.g. ``(N, H, W)``); pixels whose target is ``ignore_index`` are skipped; a labelled pixel whose
        ``pred`` is ``ignore_index`` (no prediction) counts as a miss of its target class.

        Raises TypeError for non-integer tensors, ValueError for different shapes, a ``pred`` or ``target``
        outside ``[0, L)`` that is not ``ignore_index``.
        """
        check_labels_pair("HierarchicalMetrics.update", pred, target)
        if not self._device_fixed and not self._updated and pred.device != self.device:
            self.device = pred.device
            self.matrices = [m.to(self.device) for m in self.matrices]
            self.missed = [m.to(self.device) for m in self.missed]
        self._updated = True
        incs, missed = confusion_increments(self.tree, pred, target, self.ignore_index, self.device,
                                            "HierarchicalMetrics.update")
        for m, inc in zip(self.matrices + self.missed, incs + missed):
            m += inc

    def all_reduce(self) -> None:
        """Sum the matrices over all processes (``torch.distributed.all_reduce``, one call); a no-op unless
        ``torch.distributed`` is initialised. Every process must call it (it is a collective)."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        flat = torch.cat([m.reshape(-1) for m in self.matrices + self.missed])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        out, start = [], 0
        for m in self.matrices + self.missed:
            out.append(flat[start:start + m.numel()].reshape(m.shape))
            start += m.numel()
        D = len(self.matrices)
        self.matrices, self.missed = out[:D], out[D:]

    # ------------------------------------------------------------------ results
    def confusion(self, depth: int) -> torch.Tensor:
        """The ``(K_d, K_d)`` int64 confusion matrix at ``depth`` (1..D): rows target, columns prediction."""
        self.tree._check_depth(depth)
        return self.matrices[depth - 1]

    def compute(self) -> Dict[int, Dict[str, Union[torch.Tensor, float]]]:
        """``{depth: {"iou", "miou", "pixel_accuracy", "mean_accuracy", "fw_iou"}}`` for depth 1..D.

        ``iou`` is a float64 tensor (one value per class at that depth, NaN for a class absent from both
        target and prediction or not evaluated (``ignored_leaves``), on the CPU); the others are Python floats
        (NaN before any pixel counted). See :func:`scores_from_confusion`.
        """
        return {d: scores_from_confusion(m.cpu(), self.counted(d) if self.ignored_leaves else None, missed=u.cpu())
                for d, (m, u) in enumerate(zip(self.matrices, self.missed), start=1)}

    def state_dict(self) -> Dict[str, object]:
        return {"matrices": [m.clone() for m in self.matrices], "missed": [m.clone() for m in self.missed],
                "ignore_index": self.ignore_index}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        """Matrices (and missed counts, zero when the state has none) from :meth:`state_dict`."""
        mats = state["matrices"]
        missed = state.get("missed")
        if missed is None:
            missed = [torch.zeros(m.shape[0], dtype=torch.int64) for m in self.matrices]
        if (len(mats) != len(self.matrices) or any(a.shape != b.shape for a, b in zip(mats, self.matrices))
                or len(missed) != len(self.missed) or any(a.shape != b.shape for a, b in zip(missed, self.missed))):
            raise ValueError("load_state_dict: the matrices do not fit this tree")
        self.matrices = [m.to(self.device, torch.int64).clone() for m in mats]
        self.missed = [m.to(self.device, torch.int64).clone() for m in missed]

    def table(self) -> str:
        """A plain-text table, one row per depth: classes, mIoU, pixel accuracy, mean accuracy, fwIoU (%)."""
        res = self.compute()
        head = ("depth", "classes", "mIoU %", "pixel acc %", "mean acc %", "fwIoU %")
        rows = [head]
        for d, r in res.items():
            rows.append((str(d), str(int(self.counted(d).sum()))) + tuple(
                f"{100 * r[k]:.2f}" for k in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou")))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    def __str__(self) -> str:
        pixels = int(self.matrices[0].sum() + self.missed[0].sum()) if self.matrices else 0
        return f"HierarchicalMetrics({self.tree!r}, {pixels} pixels)\n{self.table()}"

    def __repr__(self) -> str:
        return f"HierarchicalMetrics({self.tree!r}, ignore_index={self.ignore_index}, device={self.device})"
