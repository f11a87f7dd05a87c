"""mmsegmentation 1.x integration: importing this module registers, in mmseg's registries,

* losses (``MODELS``): ``HierarchicalSoftmaxLoss`` (leaf logits), ``TreeMinLoss`` and ``TreeBCELoss`` (node
  logits), ``TreeTripletLoss`` (a pixel embedding, for heads that compute one), configured as
  ``dict(type="TreeMinLoss", tree="cityscapes", loss_weight=1.0, loss_name="loss_tree_min", class_weight=None,
  gamma=2.0, scale=5.0, ...)`` (the other keys are the functional loss's options) and called as mmseg calls
  its losses: ``forward(cls_score, label, weight=None, ignore_index=255, reduction_override=None,
  avg_factor=None)``; ``weight`` (the OHEM sampler's map) is our ``pixel_weight``; the result is multiplied
  by ``loss_weight``;
* a segmentor (``MODELS``): ``HierarchicalEncoderDecoder``, mmseg's ``EncoderDecoder`` with ``tree=...``:
  heads with one logit per node predict the best root-to-leaf path (:func:`hss_kernels.decode`) instead
  of the argmax over node channels (leaf-logit heads keep the argmax); ``fused_upsample=True`` hands the
  heads' low-resolution logits to our losses with ``upsample="bilinear"`` instead of resizing them first;
* a metric (``METRICS``): ``HierarchicalIoUMetric`` (``tree=...``): ``mIoU``, ``aAcc``, ``mAcc`` at the leaves
  (as mmseg's ``IoUMetric``) and ``mIoU_d<d>``, ``aAcc_d<d>``, ``mAcc_d<d>`` at every depth ``d``, in percent.

``tree`` is a :class:`~hss_kernels.Tree`, the name of a shipped tree (``"cityscapes"``) or the path of a
tree file (a ``<stem>.classes.txt`` beside it gives the leaves' label-id order, as for the shipped trees).

The mean: ``reduction="mean"`` divides the (weighted) sum of the per-pixel losses by the number of labelled
pixels (those whose label is not ``ignore_index``), i.e. mmseg's ``avg_non_ignore=True`` semantics (mmseg's
``CrossEntropyLoss`` default, ``avg_non_ignore=False``, divides by every pixel); with ``class_weight`` it
divides by the sum of the labelled pixels' class weights, as ``F.cross_entropy(weight=...)`` (mmseg's
``CrossEntropyLoss`` divides by their number). ``avg_non_ignore=False`` is refused.

mmseg 1.2.2 imports ``mmcv.ops`` and so needs the full mmcv (``mim install "mmcv>=2.0.0rc4,<2.2.0"``);
mmcv-lite lacks its compiled ops.
"""
from __future__ import annotations

import functools
import os
from typing import Dict, Optional, Sequence, Union

import torch
from torch import nn

from .. import functional as F
from ..metrics import HierarchicalMetrics
from ..tree import Tree

INSTALL = ('pip install "mmengine>=0.10,<1" "mmcv>=2.0.0rc4,<2.2.0" "mmsegmentation>=1.0,<2" ftfy regex '
           '(mmsegmentation 1.2.2 is tested; mmcv: see https://mmcv.readthedocs.io/en/latest/get_started/installation.html)')

try:
    import mmengine  # noqa: F401
    import mmseg
    from mmengine.evaluator import BaseMetric
    from mmengine.logging import MMLogger, print_log
    from mmseg.registry import METRICS, MODELS
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(f"hss_kernels.integrations.mmseg needs mmsegmentation 1.x, mmengine and mmcv ({e}); "
                      f"install them with: {INSTALL}") from e

if not str(getattr(mmseg, "__version__", "0")).startswith("1."):
    raise ImportError(f"hss_kernels.integrations.mmseg needs mmsegmentation 1.x, found {mmseg.__version__}: {INSTALL}")

try:
    from mmseg.models.segmentors import EncoderDecoder
    from mmseg.models.utils import resize
except ModuleNotFoundError as e:  # mmcv-lite: mmseg's models import mmcv.ops, which needs mmcv._ext
    if "mmcv" not in str(e):
        raise
    raise ImportError(f"hss_kernels.integrations.mmseg: mmsegmentation's models do not import ({e}); they need "
                      f"the full mmcv (mmcv.ops), not mmcv-lite: {INSTALL}") from e

__all__ = [
    "load_tree",
    "HierarchicalSoftmaxLoss",
    "TreeMinLoss",
    "TreeBCELoss",
    "TreeTripletLoss",
    "HierarchicalEncoderDecoder",
    "HierarchicalIoUMetric",
    "FusedUpsampleHeadMixin",
    "fused_loss_by_feat",
    "REGISTERED",
]

# the name each class was registered under (a prefixed one if mmseg already had the plain name)
REGISTERED: Dict[str, str] = {}


def _register(registry, cls):
    name = cls.__name__
    existing = registry.module_dict.get(name)
    ours = existing is not None and (existing.__module__, existing.__qualname__) == (cls.__module__, cls.__qualname__)
    if existing is not None and not ours:
        name = f"HSS{name}"
        print_log(f"hss_kernels: mmseg already registers a {cls.__name__!r}; ours is registered as {name!r}",
                  logger="current")
    registry.register_module(name=name, module=cls, force=True)
    REGISTERED[cls.__name__] = name
    return cls


@functools.lru_cache(maxsize=None)
def _tree_from_file(path: str, mtime: float) -> Tree:
    stem, _ = os.path.splitext(path)
    classes_file = stem + ".classes.txt"
    classes = None
    if os.path.isfile(classes_file):
        with open(classes_file, encoding="utf-8") as f:
            classes = [line.rstrip("\r\n") for line in f if line.strip()]
    return Tree.from_file(path, classes=classes)


def load_tree(tree: Union[Tree, str, os.PathLike]) -> Tree:
    """A :class:`Tree`, a shipped tree's name (``"cityscapes"``) or a tree file's path, as a ``Tree``.

    Raises ``ValueError`` naming the shipped trees when ``tree`` is neither."""
    if isinstance(tree, Tree):
        return tree
    if isinstance(tree, (str, os.PathLike)):
        path = os.fspath(tree)
        if os.path.isfile(path):
            path = os.path.abspath(path)
            return _tree_from_file(path, os.path.getmtime(path))
        from .. import trees
        if path in trees.names():
            return trees.load(path)
        raise ValueError(f"unknown tree {path!r}: neither a shipped tree ({', '.join(trees.names())}) nor an "
                         f"existing tree file")
    raise TypeError(f"tree must be a hss_kernels.Tree, a shipped tree's name or a tree file's path, "
                    f"got {type(tree).__name__}")


# ---------------------------------------------------------------------------------------------- losses
class _MMSegLoss(nn.Module):
    """Shared part of the registered losses: tree, ``loss_weight``, ``loss_name``, ``class_weight``,
    ``reduction``, mmseg's ``forward`` signature."""

    _fn = None
    _default_name = "loss_hss"
    _options: Dict[str, object] = {}

    def __init__(self, tree, loss_weight: float = 1.0, loss_name: Optional[str] = None, class_weight=None,
                 reduction: str = "mean", backend: str = "auto", avg_non_ignore: bool = True, **options):
        super().__init__()
        cls = type(self).__name__
        self.tree = load_tree(tree)
        self.loss_weight = float(loss_weight)
        self._loss_name = self._default_name if loss_name is None else loss_name
        if not isinstance(self._loss_name, str) or not self._loss_name.startswith("loss_"):
            raise ValueError(f"{cls}: loss_name must start with 'loss_' (mmseg backpropagates only those), "
                             f"got {self._loss_name!r}")
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"{cls}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        if not avg_non_ignore:
            raise ValueError(f"{cls}: avg_non_ignore=False is not supported: the mean is always over the "
                             f"labelled pixels (mmseg's avg_non_ignore=True)")
        unknown = set(options) - set(self._options)
        if unknown:
            raise TypeError(f"{cls}: unknown option(s) {sorted(unknown)}; it takes tree, loss_weight, loss_name, "
                            f"class_weight, reduction, backend and {sorted(self._options)}")
        self.options = {**self._options, **options}
        self.reduction, self.backend = reduction, backend
        if isinstance(class_weight, str):  # a file, as mmseg's losses take it
            from mmseg.models.losses.utils import get_class_weight
            class_weight = get_class_weight(class_weight)
        if class_weight is not None:
            class_weight = torch.as_tensor(class_weight, dtype=torch.float32)
            if class_weight.dim() != 1 or class_weight.numel() != self.tree.num_leaves:
                raise ValueError(f"{cls}: class_weight needs one weight per leaf of the tree "
                                 f"({self.tree.num_leaves}, by label id), got shape {tuple(class_weight.shape)}")
        self.register_buffer("class_weight", class_weight)

    @property
    def loss_name(self) -> str:
        """The key of this loss in mmseg's loss dict (starts with ``loss_``)."""
        return self._loss_name

    def _call(self, cls_score, label, reduction, ignore_index, pixel_weight, upsample, align_corners):
        return type(self)._fn(cls_score, label, self.tree, ignore_index=ignore_index, reduction=reduction,
                              backend=self.backend, upsample=upsample, align_corners=align_corners,
                              class_weight=self.class_weight, pixel_weight=pixel_weight, **self.options)

    def forward(self, cls_score: torch.Tensor, label: torch.Tensor, weight: Optional[torch.Tensor] = None,
                avg_factor: Optional[float] = None, reduction_override: Optional[str] = None,
                ignore_index: Optional[int] = 255, upsample: Optional[str] = None, align_corners: bool = False,
                **kwargs) -> torch.Tensor:
        """``cls_score`` (N, C, H, W) (or low-resolution with ``upsample="bilinear"``), ``label`` (N, H, W);
        ``weight`` (N, H, W) or None multiplies each pixel's loss; ``avg_factor``: the sum divided by it
        instead of the mean (mmseg's meaning). Returns ``loss_weight`` times the loss."""
        reduction = reduction_override or self.reduction
        if ignore_index is None:
            ignore_index = -100  # mmseg's "nothing ignored" for its losses; no label id is negative
        if weight is not None and weight.dtype != torch.float32 and weight.dtype != torch.float64:
            weight = weight.float()
        if avg_factor is not None:
            if reduction != "mean":
                raise ValueError(f"{type(self).__name__}: avg_factor needs reduction='mean', got {reduction!r}")
            loss = self._call(cls_score, label, "sum", ignore_index, weight, upsample, align_corners) / avg_factor
        else:
            loss = self._call(cls_score, label, reduction, ignore_index, weight, upsample, align_corners)
        return self.loss_weight * loss

    def extra_repr(self) -> str:
        return (f"tree={self.tree!r}, loss_weight={self.loss_weight}, loss_name={self._loss_name!r}, "
                f"reduction={self.reduction!r}, backend={self.backend!r}, options={self.options}")


class HierarchicalSoftmaxLoss(_MMSegLoss):
    """:func:`hss_kernels.hierarchical_softmax_loss` on a head with one logit per leaf (``num_classes`` =
    the tree's leaves, channel = label id). Options: ``level_weights``, ``eps``."""
    _fn = staticmethod(F.hierarchical_softmax_loss)
    _default_name = "loss_hsoftmax"
    _options = {"level_weights": None, "eps": 0.0}


class TreeMinLoss(_MMSegLoss):
    """:func:`hss_kernels.tree_min_loss` (HSSN) on a head with one logit per node (``num_classes`` = the
    tree's nodes). Options: ``gamma`` (2), ``scale`` (1; HSSN's Cityscapes config uses 5), ``eps``,
    ``normalize``."""
    _fn = staticmethod(F.tree_min_loss)
    _default_name = "loss_tree_min"
    _options = {"gamma": 2.0, "scale": 1.0, "eps": 0.0, "normalize": "level"}


class TreeBCELoss(_MMSegLoss):
    """:func:`hss_kernels.tree_bce_loss` on a head with one logit per node. Options: ``gamma`` (0),
    ``scale``, ``eps``, ``normalize``."""
    _fn = staticmethod(F.tree_bce_loss)
    _default_name = "loss_tree_bce"
    _options = {"gamma": 0.0, "scale": 1.0, "eps": 0.0, "normalize": "level"}


class TreeTripletLoss(nn.Module):
    """:func:`hss_kernels.tree_triplet_loss` for heads that compute a pixel embedding (N, E, h, w) and call
    this loss on it (mmseg's stock heads do not): ``forward(embedding, label, weight=None,
    ignore_index=255)``, times ``loss_weight``. Options: ``margin``, ``max_triplets``, ``sampling``,
    ``normalize``. A pixel weight map is not supported (the loss samples triplets)."""

    def __init__(self, tree, loss_weight: float = 1.0, loss_name: str = "loss_tree_triplet", margin: float = 0.6,
                 max_triplets: int = 200, sampling: str = "random", normalize: bool = True, backend: str = "auto"):
        super().__init__()
        self.tree = load_tree(tree)
        if not isinstance(loss_name, str) or not loss_name.startswith("loss_"):
            raise ValueError(f"TreeTripletLoss: loss_name must start with 'loss_', got {loss_name!r}")
        self.loss_weight, self._loss_name = float(loss_weight), loss_name
        self.options = dict(margin=margin, max_triplets=max_triplets, sampling=sampling, normalize=normalize,
                            backend=backend)

    @property
    def loss_name(self) -> str:
        return self._loss_name

    def forward(self, embedding, label, weight=None, ignore_index: Optional[int] = 255, generator=None, **kwargs):
        if weight is not None:
            raise ValueError("TreeTripletLoss: a pixel weight map (e.g. from a pixel sampler) is not supported")
        return self.loss_weight * F.tree_triplet_loss(embedding, label, self.tree, generator=generator,
                                                      ignore_index=255 if ignore_index is None else ignore_index,
                                                      **self.options)


# ------------------------------------------------------------------------------ low-resolution path
def fused_loss_by_feat(head, seg_logits: torch.Tensor, batch_data_samples, tree: Optional[Tree] = None) -> dict:
    """``BaseDecodeHead.loss_by_feat`` without the resize: our losses get the head's low-resolution logits
    with ``upsample="bilinear"`` and the head's ``align_corners`` (the native kernels fuse the interpolation);
    other losses in ``loss_decode`` and a pixel sampler still get the resized logits. ``acc_seg`` is the
    accuracy of :func:`hss_kernels.decode`'s labels (for node logits, the best path) when ``tree`` is given,
    else of the argmax, as mmseg's."""
    from mmseg.models.losses import accuracy

    seg_label = head._stack_batch_gt(batch_data_samples)  # (N, 1, H, W)
    size = seg_label.shape[2:]
    cache = {}

    def resized():
        if "x" not in cache:
            cache["x"] = resize(input=seg_logits, size=size, mode="bilinear", align_corners=head.align_corners)
        return cache["x"]

    seg_weight = None
    if head.sampler is not None:
        with torch.no_grad():
            seg_weight = head.sampler.sample(resize(input=seg_logits.detach(), size=size, mode="bilinear",
                                                    align_corners=head.align_corners), seg_label)
    seg_label = seg_label.squeeze(1)
    losses_decode = head.loss_decode if isinstance(head.loss_decode, nn.ModuleList) else [head.loss_decode]
    loss = {}
    for loss_decode in losses_decode:
        if isinstance(loss_decode, _MMSegLoss):
            value = loss_decode(seg_logits, seg_label, weight=seg_weight, ignore_index=head.ignore_index,
                                upsample="bilinear", align_corners=head.align_corners)
        else:
            value = loss_decode(resized(), seg_label, weight=seg_weight, ignore_index=head.ignore_index)
        loss[loss_decode.loss_name] = loss[loss_decode.loss_name] + value if loss_decode.loss_name in loss else value
    with torch.no_grad():
        if tree is not None and seg_logits.shape[1] in (tree.num_nodes, tree.num_leaves):
            pred = F.decode(seg_logits.detach(), tree, size=tuple(size), align_corners=head.align_corners,
                            ignore_index=head.ignore_index)  # NaN logits: a wrong prediction
            valid = seg_label != head.ignore_index
            correct = (pred == seg_label) & valid
            loss["acc_seg"] = correct.sum().float().mul(100.0) / valid.sum().clamp(min=1)
        else:
            loss["acc_seg"] = accuracy(resized(), seg_label, ignore_index=head.ignore_index)
    return loss


class FusedUpsampleHeadMixin:
    """Put before an mmseg decode head class (``class MyHead(FusedUpsampleHeadMixin, FCNHead)``) to give our
    losses its low-resolution logits (:func:`fused_loss_by_feat`); ``hss_tree`` (a class or instance
    attribute, default None) makes ``acc_seg`` decode the best path."""

    hss_tree: Optional[Tree] = None

    def loss_by_feat(self, seg_logits, batch_data_samples) -> dict:
        return fused_loss_by_feat(self, seg_logits, batch_data_samples, tree=self.hss_tree)


# --------------------------------------------------------------------------------------- segmentor
class HierarchicalEncoderDecoder(EncoderDecoder):
    """mmseg's ``EncoderDecoder`` for a class tree.

    Args (beyond ``EncoderDecoder``'s):
        tree: a ``Tree``, shipped tree name or tree file; the decode head's ``num_classes`` must be its node
            count (node logits: tree-min, tree-BCE) or its leaf count (leaf logits: hierarchical softmax).
        decode_options: keyword arguments of :func:`hss_kernels.decode` for node logits (``activation``,
            ``score``; default sigmoid scores summed along the path, as HSSN; ``ignore_index``, the label of a
            pixel with NaN logits, defaults to the decode head's ``ignore_index``).
        fused_upsample: if True, the decode and auxiliary heads' ``loss_by_feat`` is
            :func:`fused_loss_by_feat`: our losses take the low-resolution logits with
            ``upsample="bilinear"`` instead of mmseg resizing them to the label size first.

    Prediction: ``pred_sem_seg`` is the leaf label (by label id) of the best root-to-leaf path of the logits
    resized to the original image (``hss_kernels.decode``) for node logits, the argmax for leaf logits;
    ``seg_logits`` holds those resized logits, as mmseg's.
    """

    def __init__(self, *args, tree, decode_options: Optional[dict] = None, fused_upsample: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.tree = load_tree(tree)
        channels = self.decode_head.out_channels
        if channels not in (self.tree.num_nodes, self.tree.num_leaves):
            raise ValueError(f"HierarchicalEncoderDecoder: the decode head has {channels} output channels; the tree "
                             f"{self.tree!r} needs {self.tree.num_nodes} (one per node, for TreeMinLoss/TreeBCELoss) "
                             f"or {self.tree.num_leaves} (one per leaf, for HierarchicalSoftmaxLoss)")
        self.decode_options = dict(decode_options or {})
        self.fused_upsample = bool(fused_upsample)
        if self.fused_upsample:
            heads = [self.decode_head]
            if self.with_auxiliary_head:
                aux = self.auxiliary_head
                heads += list(aux) if isinstance(aux, nn.ModuleList) else [aux]
            for head in heads:
                head.hss_tree = self.tree
                head.loss_by_feat = functools.partial(fused_loss_by_feat, head, tree=self.tree)

    def postprocess_result(self, seg_logits: torch.Tensor, data_samples=None):
        data_samples = super().postprocess_result(seg_logits, data_samples)
        if seg_logits.shape[1] == self.tree.num_nodes and self.tree.num_nodes != self.tree.num_leaves:
            for sample in data_samples:
                logits = sample.seg_logits.data  # (V, H, W), resized to the original image as mmseg does
                options = dict(self.decode_options)
                options.setdefault("ignore_index", getattr(self.decode_head, "ignore_index", 255))  # the label of NaN pixels
                pred = F.decode(logits[None], self.tree, **options)
                sample.pred_sem_seg.data = pred.to(sample.pred_sem_seg.data.dtype)
        return data_samples


# ------------------------------------------------------------------------------------------ metric
class HierarchicalIoUMetric(BaseMetric):
    """IoU at every depth of a class tree (an mmengine ``BaseMetric``), computed by
    :class:`hss_kernels.metrics.HierarchicalMetrics` from the ``pred_sem_seg`` and ``gt_sem_seg`` of each sample
    (leaf label ids).

    Reports, in percent rounded to 2 decimals as mmseg's ``IoUMetric``: ``mIoU``, ``aAcc``, ``mAcc`` at the
    leaves (the same numbers as ``IoUMetric``) and ``mIoU_d<d>``, ``aAcc_d<d>`` (pixel accuracy) and
    ``mAcc_d<d>`` (mean class accuracy) at every depth ``d = 1..D`` of the tree (depth D is the leaves).

    Args:
        tree: a ``Tree``, shipped tree name or tree file.
        ignore_index: label of pixels that count for nothing (255).
        collect_device, prefix: as in ``BaseMetric``.
    """

    default_prefix: Optional[str] = None

    def __init__(self, tree, ignore_index: int = 255, collect_device: str = "cpu", prefix: Optional[str] = None,
                 **kwargs):
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.tree = load_tree(tree)
        self.ignore_index = int(ignore_index)
        self._checked_meta = False

    def _check_meta(self):
        classes = (self.dataset_meta or {}).get("classes")
        if classes is not None and len(classes) != self.tree.num_leaves:
            raise ValueError(f"HierarchicalIoUMetric: the data set has {len(classes)} classes but the tree "
                             f"{self.tree!r} has {self.tree.num_leaves} leaves")
        self._checked_meta = True

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        if not self._checked_meta:
            self._check_meta()
        metrics = HierarchicalMetrics(self.tree, ignore_index=self.ignore_index)
        for sample in data_samples:
            pred = sample["pred_sem_seg"]["data"].squeeze()
            label = sample["gt_sem_seg"]["data"].squeeze().to(pred.device)
            metrics.update(pred, label)
        self.results.append(([m.cpu() for m in metrics.matrices], [m.cpu() for m in metrics.missed]))

    def compute_metrics(self, results: list) -> Dict[str, float]:
        metrics = HierarchicalMetrics(self.tree, ignore_index=self.ignore_index, device="cpu")
        if results:
            metrics.load_state_dict({"matrices": [sum(ms) for ms in zip(*(r[0] for r in results))],
                                     "missed": [sum(ms) for ms in zip(*(r[1] for r in results))]})
        scores = metrics.compute()

        def pct(x: float) -> float:
            return round(100.0 * float(x), 2)

        depth = self.tree.depth
        out = {"aAcc": pct(scores[depth]["pixel_accuracy"]), "mIoU": pct(scores[depth]["miou"]),
               "mAcc": pct(scores[depth]["mean_accuracy"])}
        for d, s in scores.items():
            out[f"aAcc_d{d}"] = pct(s["pixel_accuracy"])
            out[f"mIoU_d{d}"] = pct(s["miou"])
            out[f"mAcc_d{d}"] = pct(s["mean_accuracy"])
        print_log("hierarchical results (percent):\n" + metrics.table(), logger=MMLogger.get_current_instance())
        return out


for _cls in (HierarchicalSoftmaxLoss, TreeMinLoss, TreeBCELoss, TreeTripletLoss, HierarchicalEncoderDecoder):
    _register(MODELS, _cls)
_register(METRICS, HierarchicalIoUMetric)
