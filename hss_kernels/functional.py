"""The public functional API: input checks, then dispatch to a backend (see :mod:`hss_kernels.backends`).

Every loss takes logits ``(N, C, *S)`` (any number of spatial dims, usually ``(N, C, H, W)``; NCHW or
channels_last) of dtype float16, bfloat16, float32 or float64, and an integer target ``(N, *S)`` of
leaf label ids, ``ignore_index`` (255) marking pixels that count for nothing. Arithmetic is in float32
(float64 for float64 inputs); the loss is returned in that dtype, the gradient in the logits' dtype.
``reduction``: ``"mean"`` over non-ignored pixels (0 when all are ignored), ``"sum"``, or ``"none"``
(one value per pixel, shape ``(N, *S)``, 0 at ignored pixels).

Weights: ``class_weight`` (one per leaf, by label id) and ``pixel_weight`` (the target's shape) scale each
pixel's loss; ``"mean"`` then divides by the sum of the labelled pixels' class weights (as
``F.cross_entropy(weight=...)``) or their number (``hss_kernels.reference.weigh_loss``, docs/MATH.md §6.6).
Backends whose losses are marked ``takes_weights`` fuse them into their kernels (one more read per pixel
at most): every loss of the Triton and native backends (the native ones on CPU and CUDA; with ``upsample``
too); the reference's per-pixel losses are weighted by ``reference.weigh_loss``.

Low-resolution logits: with ``upsample="bilinear"``, the losses take logits ``(N, C, h, w)`` and a target
``(N, H, W)`` with ``H >= h``, ``W >= w``, and compute exactly the loss of
``F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=align_corners)`` (interpolated in
float32, or float64), with the gradient of the low-resolution logits. The native kernels (CPU and CUDA) and
the Triton losses fuse the interpolation (the full-resolution logits and their gradient never exist); the
reference interpolates first. ``decode(..., size=(H, W))`` likewise (fused in the native and Triton kernels).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import reference
from ._checks import (check_decode_ignore_index, check_decode_options, check_labels, check_nonnegative, check_normalize,
                      check_reduction, check_upsample, check_weights, label_check_enabled, set_label_check)
from .backends import resolve
from .tree import Tree

__all__ = [
    "hierarchical_softmax_loss",
    "tree_min_loss",
    "tree_bce_loss",
    "tree_triplet_loss",
    "decode",
    "labels_at_depth",
    "as_tree",
    "set_label_check",
    "label_check_enabled",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def as_tree(tree: Union[Tree, str]) -> Tree:
    """A :class:`Tree`, or the name of a shipped tree (``"vistas"``, ...) loaded with ``trees.load``."""
    if isinstance(tree, Tree):
        return tree
    if isinstance(tree, str):
        from . import trees
        return trees.load(tree)
    raise TypeError(f"tree must be a hss_kernels.Tree or the name of a shipped tree, got {type(tree).__name__}")


def _check_logits(fn: str, logits, channels: int, what: str, other: str) -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{fn}: logits must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in _FLOATS:
        raise TypeError(f"{fn}: logits must be float16, bfloat16, float32 or float64, got {logits.dtype}")
    if logits.dim() < 2:
        raise ValueError(f"{fn}: logits must have shape (N, C, *spatial), got {tuple(logits.shape)}")
    if logits.shape[1] != channels:
        raise ValueError(
            f"{fn}: logits has {logits.shape[1]} channels but the tree has {channels} {what}; {other}")


def _check_target(fn: str, logits, target, tree: Tree, ignore_index: int, upsample=None) -> None:
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"{fn}: target must be a torch.Tensor, got {type(target).__name__}")
    if target.dtype.is_floating_point or target.dtype.is_complex or target.dtype == torch.bool:
        raise TypeError(f"{fn}: target must hold integer label ids (int64, int32, uint8, ...), got {target.dtype}")
    if upsample is not None:
        check_upsample(fn, logits.shape, target.shape, "target")
    else:
        expected = (logits.shape[0],) + tuple(logits.shape[2:])
        if tuple(target.shape) != expected:
            raise ValueError(f"{fn}: target must have shape {expected} (logits minus the channel dim; "
                             f"upsample='bilinear' takes low-resolution logits), got {tuple(target.shape)}")
    if target.device != logits.device:
        raise ValueError(f"{fn}: target is on {target.device} but logits on {logits.device}")
    check_labels(fn, target, tree.num_leaves, ignore_index)


def _to4d(logits: torch.Tensor, target: torch.Tensor):
    """Views as (N, C, H, W) / (N, H, W), which is what every backend takes."""
    s = logits.shape[2:]
    if len(s) == 2:
        return logits, target
    if len(s) == 0:
        return logits[:, :, None, None], target[:, None, None]
    if len(s) == 1:
        return logits[:, :, None, :], target[:, None, :]
    return logits.reshape(*logits.shape[:2], -1, s[-1]), target.reshape(target.shape[0], -1, s[-1])


def _run(op, backend, logits, target, reduction, upsample=None, align_corners=False, class_weight=None,
         pixel_weight=None, **kw):
    impl = resolve(op, backend, logits.device, logits.dtype)
    weighted = class_weight is not None or pixel_weight is not None
    # A backend that marks its loss ``takes_weights`` fuses the weights into its kernels; the others get
    # them applied to their per-pixel losses here (reference.weigh_loss, the spec).
    # The kernels give the weights no gradient: weights that need one take the composition.
    fused = weighted and getattr(impl, "takes_weights", False) and not (
        torch.is_grad_enabled() and any(w is not None and w.requires_grad for w in (class_weight, pixel_weight)))
    red = "none" if weighted and not fused else reduction
    if fused:
        kw.update(class_weight=class_weight, pixel_weight=pixel_weight)
    if upsample is not None:  # (N, C, h, w) and (N, H, W), checked
        if getattr(impl, "takes_upsample", False):
            out = impl(logits, target, reduction=red, upsample=upsample, align_corners=align_corners, **kw)
        else:
            out = impl(reference.upsample_logits(logits, target.shape[-2:], align_corners), target, reduction=red,
                       **kw)
    else:
        x, t = _to4d(logits, target)
        if fused and pixel_weight is not None:
            kw["pixel_weight"] = _to4d(logits, pixel_weight)[1]
        out = impl(x, t, reduction=red, **kw)
        if red == "none":
            out = out.reshape(target.shape)
    if weighted and not fused:
        out = reference.weigh_loss(out, target, reduction, class_weight, pixel_weight, kw["ignore_index"])
    return out


def hierarchical_softmax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    tree: Union[Tree, str],
    level_weights: Optional[Sequence[float]] = None,
    eps: float = 0.0,
    ignore_index: int = 255,
    reduction: str = "mean",
    backend: str = "auto",
    upsample: Optional[str] = None,
    align_corners: bool = False,
    class_weight=None,
    pixel_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Hierarchical softmax loss (Muller & Smith, VISAPP 2020).

    Softmax over the leaf logits; a super-class's probability is the sum of its leaves'; the loss is
    the sum over depths d = 1..D of ``level_weights[d-1]`` times the NLL at that depth, computed with a
    stable log-sum-exp. A flat tree gives exactly ``F.cross_entropy``.

    Args:
        logits: leaf logits ``(N, L, *S)``, channel = leaf label id.
        target: ``(N, *S)`` integer leaf labels in ``[0, L)`` or ``ignore_index``.
        tree: a :class:`Tree` or a shipped tree's name.
        level_weights: ``D`` weights (default all 1).
        eps: 0 (exact, default) or the paper code's ``-log(P_d + eps)`` form (it used 1e-4).
        ignore_index, reduction: as in ``torch.nn.CrossEntropyLoss`` (mean of all-ignored is 0).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"native"``.
        upsample: ``None`` (logits at the target's size) or ``"bilinear"``: logits ``(N, L, h, w)``, target
            ``(N, H, W)`` with ``H >= h``, ``W >= w``; the loss of the logits interpolated to ``(H, W)``
            as ``F.interpolate(mode="bilinear", align_corners=align_corners)`` does, fused in the native
            kernels and in Triton.
        align_corners: as in ``F.interpolate`` (used with ``upsample`` only).
        class_weight: ``L`` weights by label id (a tensor or a sequence): each pixel's loss times its label's
            weight, and ``"mean"`` over the sum of the labelled pixels' weights, as ``F.cross_entropy(weight=)``.
        pixel_weight: a float tensor of the target's shape (mmsegmentation's weight map): each pixel's loss
            times its weight; ``"mean"`` still divides by the number of labelled pixels.

    Raises:
        TypeError / ValueError on a wrong dtype, shape, channel count, out-of-range label or unknown
        ``upsample``; RuntimeError if the requested backend is not available.
    """
    fn = "hierarchical_softmax_loss"
    tree = as_tree(tree)
    _check_logits(fn, logits, tree.num_leaves, "leaves",
                  f"it takes one logit per leaf ({tree.num_nodes} channels would be node logits, for tree_min_loss)")
    check_upsample(fn, upsample=upsample)
    _check_target(fn, logits, target, tree, ignore_index, upsample)
    check_reduction(fn, reduction)
    check_nonnegative(fn, eps=eps)
    if level_weights is not None and len(level_weights) != tree.depth:
        raise ValueError(f"{fn}: level_weights needs {tree.depth} values (one per depth), got {len(level_weights)}")
    class_weight, pixel_weight = check_weights(fn, class_weight, pixel_weight, tree.num_leaves, target)
    return _run(fn, backend, logits, target, reduction, upsample, align_corners, class_weight, pixel_weight,
                tree=tree, level_weights=level_weights, eps=eps, ignore_index=ignore_index)


def _node_loss(fn, logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, backend, upsample,
               align_corners, class_weight, pixel_weight):
    tree = as_tree(tree)
    _check_logits(fn, logits, tree.num_nodes, "nodes",
                  f"it takes one logit per node ({tree.num_leaves} channels would be leaf logits, "
                  f"for hierarchical_softmax_loss)")
    check_upsample(fn, upsample=upsample)
    _check_target(fn, logits, target, tree, ignore_index, upsample)
    check_reduction(fn, reduction)
    check_nonnegative(fn, gamma=gamma, eps=eps)
    check_normalize(fn, normalize)
    class_weight, pixel_weight = check_weights(fn, class_weight, pixel_weight, tree.num_leaves, target)
    return _run(fn, backend, logits, target, reduction, upsample, align_corners, class_weight, pixel_weight,
                tree=tree, gamma=gamma, scale=scale, eps=eps, normalize=normalize, ignore_index=ignore_index)


def tree_min_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    tree: Union[Tree, str],
    gamma: float = 2.0,
    scale: float = 1.0,
    eps: float = 0.0,
    normalize: str = "level",
    ignore_index: int = 255,
    reduction: str = "mean",
    backend: str = "auto",
    upsample: Optional[str] = None,
    align_corners: bool = False,
    class_weight=None,
    pixel_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Focal tree-min loss (Li et al., HSSN, CVPR 2022).

    Per-node sigmoid scores: a node on the target's root-to-leaf path scores with the min over its
    ancestors-or-self, any other node with the max over its descendants-or-self, with focal weight
    ``gamma`` (0: the plain tree-min loss). Per pixel, ``scale * sum_d mean_{v at depth d} loss_v``
    (``normalize="level"``, HSSN's) or ``scale * mean_v loss_v`` (``"node"``).

    Args:
        logits: node logits ``(N, V, *S)`` in node-channel order (leaves by label id, then internal
            nodes deepest level first; see ``Tree``).
        target: ``(N, *S)`` integer leaf labels in ``[0, L)`` or ``ignore_index``.
        gamma: focal exponent >= 0. scale: HSSN's ``c`` (5 in its Cityscapes config). eps: added inside
            each log (HSSN: 1e-8; default 0, exact).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"native"``.
        upsample, align_corners: low-resolution logits ``(N, V, h, w)``, as in
            :func:`hierarchical_softmax_loss`.
        class_weight, pixel_weight: as in :func:`hierarchical_softmax_loss`, by the pixel's leaf label.
    """
    return _node_loss("tree_min_loss", logits, target, tree, gamma, scale, eps, normalize, ignore_index,
                      reduction, backend, upsample, align_corners, class_weight, pixel_weight)


def tree_bce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    tree: Union[Tree, str],
    gamma: float = 0.0,
    scale: float = 1.0,
    eps: float = 0.0,
    normalize: str = "level",
    ignore_index: int = 255,
    reduction: str = "mean",
    backend: str = "auto",
    upsample: Optional[str] = None,
    align_corners: bool = False,
    class_weight=None,
    pixel_weight: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Multi-label BCE baseline over every node: target ``[v on the label's path]``, optional focal
    ``gamma``, normalised like :func:`tree_min_loss`. Same arguments."""
    return _node_loss("tree_bce_loss", logits, target, tree, gamma, scale, eps, normalize, ignore_index,
                      reduction, backend, upsample, align_corners, class_weight, pixel_weight)


def tree_triplet_loss(
    embedding: torch.Tensor,
    target: torch.Tensor,
    tree: Union[Tree, str],
    margin: float = 0.6,
    max_triplets: int = 200,
    sampling: str = "random",
    generator: Optional[torch.Generator] = None,
    ignore_index: int = 255,
    normalize: bool = True,
    backend: str = "auto",
) -> torch.Tensor:
    """HSSN's tree-triplet loss on a pixel embedding ``(N, E, h, w)`` with leaf labels ``(N, H, W)``.

    See :func:`hss_kernels.reference.tree_triplet_loss`. Only the reference implements it (its cost is
    a few hundred triplets per class, not a pass over the data).
    """
    fn = "tree_triplet_loss"
    tree = as_tree(tree)
    if not isinstance(embedding, torch.Tensor) or embedding.dtype not in _FLOATS or embedding.dim() != 4:
        raise TypeError(f"{fn}: embedding must be a float tensor (N, E, h, w), got "
                        f"{getattr(embedding, 'dtype', type(embedding).__name__)} "
                        f"{tuple(getattr(embedding, 'shape', ()))}")
    if not isinstance(target, torch.Tensor) or target.dtype.is_floating_point or target.dtype == torch.bool:
        raise TypeError(f"{fn}: target must be an integer tensor (N, H, W)")
    if target.dim() != 3 or target.shape[0] != embedding.shape[0]:
        raise ValueError(f"{fn}: target must be (N, H, W) with N = {embedding.shape[0]}, got {tuple(target.shape)}")
    if sampling not in ("random", "first"):
        raise ValueError(f"{fn}: sampling must be 'random' or 'first', got {sampling!r}")
    check_labels(fn, target, tree.num_leaves, ignore_index)
    impl = resolve(fn, backend, embedding.device)
    return impl(embedding, target, tree, margin=margin, max_triplets=max_triplets, sampling=sampling,
                generator=generator, ignore_index=ignore_index, normalize=normalize)


def decode(
    logits: torch.Tensor,
    tree: Union[Tree, str],
    activation: str = "sigmoid",
    score: str = "sum",
    backend: str = "auto",
    size: Optional[Sequence[int]] = None,
    align_corners: bool = False,
    ignore_index: int = 255,
) -> torch.Tensor:
    """Leaf label (int64, ``(N, *S)``) of the best root-to-leaf path per pixel.

    Node logits (``V`` channels): path score = sum (or mean, ``score="mean"``) over the path of
    ``sigmoid`` (or the softmax over all nodes, ``activation="softmax"``). Leaf logits (``L``
    channels): the argmax. Ties go to the lowest leaf id.

    NaN: a pixel with a NaN in any of its ``C`` channels gets the label ``ignore_index`` (default 255, the
    losses' and metrics' ignore label; it must not be a leaf id, i.e. outside ``[0, L)``), on every backend.
    Infinite logits are not special.

    ``size = (H, W)``: logits ``(N, C, h, w)`` with ``h <= H``, ``w <= W``; the labels ``(N, H, W)`` of
    the logits bilinearly interpolated to that size (``align_corners`` as in ``F.interpolate``; the NaN
    rule applies to the interpolated logits, where a NaN reaches every pixel whose 2x2 stencil holds it),
    fused in the native (CPU and CUDA) and Triton kernels: the upsampled logits are never stored.

    Raises:
        TypeError for non-float logits or a non-integer ``ignore_index``; ValueError for a wrong channel
        count, option or size, or an ``ignore_index`` in ``[0, L)``.
    """
    fn = "decode"
    tree = as_tree(tree)
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOATS:
        raise TypeError(f"{fn}: logits must be a float tensor, got {getattr(logits, 'dtype', type(logits).__name__)}")
    if logits.dim() < 2 or logits.shape[1] not in (tree.num_nodes, tree.num_leaves):
        raise ValueError(f"{fn}: logits must be (N, C, *S) with C = {tree.num_nodes} (nodes) or "
                         f"{tree.num_leaves} (leaves) channels, got {tuple(logits.shape)}")
    check_decode_options(fn, activation, score)
    ignore_index = check_decode_ignore_index(fn, ignore_index, tree.num_leaves)
    impl = resolve(fn, backend, logits.device, logits.dtype)
    kw = dict(activation=activation, score=score, ignore_index=ignore_index)
    if size is not None:
        check_upsample(fn, logits.shape, size, "size")
        size = tuple(int(s) for s in size)
        if getattr(impl, "takes_upsample", False):
            return impl(logits, tree, size=size, align_corners=align_corners, **kw)
        return impl(reference.upsample_logits(logits.detach(), size, align_corners), tree, **kw)
    x, _ = _to4d(logits, logits[:, 0])
    out = impl(x, tree, **kw)
    return out.reshape(logits.shape[0], *logits.shape[2:])


def labels_at_depth(leaf_labels: torch.Tensor, tree: Union[Tree, str], depth: int, ignore_index: int = 255):
    """Map leaf labels to class ids at ``depth`` (1..D); ``ignore_index`` stays. See ``Tree.class_names``."""
    tree = as_tree(tree)
    if not isinstance(leaf_labels, torch.Tensor) or leaf_labels.dtype.is_floating_point:
        raise TypeError("labels_at_depth: leaf_labels must be an integer tensor")
    tree._check_depth(depth)
    check_labels("labels_at_depth", leaf_labels, tree.num_leaves, ignore_index, name="leaf_labels")
    return reference.labels_at_depth(leaf_labels, tree, depth, ignore_index=ignore_index)
