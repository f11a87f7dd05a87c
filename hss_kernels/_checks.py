"""The rules every op shares, in one place: option checks, the label scan, the accumulation dtype, the
"mean"'s denominator.

:mod:`hss_kernels.functional` calls the checks before dispatching; the backends and the reference assume
what they check. Messages start with the public function's name (``fn``).
"""
from __future__ import annotations

import operator

import torch

REDUCTIONS = ("mean", "sum", "none")
NORMALIZATIONS = ("level", "node")
ACTIVATIONS = ("sigmoid", "softmax")
SCORES = ("sum", "mean")

_LABEL_CHECK = True


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype arithmetic runs in (docs/MATH.md §5.2): float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def mean_denominator(count: torch.Tensor, weight_sum=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """What ``reduction="mean"`` divides the summed loss by (docs/MATH.md §5.1, §6.6), as a 0-dim ``dtype``
    tensor on the count's device: the number of labelled pixels ``count`` (an integer tensor), at least 1;
    with class weights (``weight_sum``, the sum of the labelled pixels' class weights; ``None`` or empty
    without them) that sum, or 1 when no pixel is labelled, so that a mean over no pixel is 0 and a zero
    weight sum over labelled pixels gives 0/0 = NaN, as ``F.cross_entropy``. Tensor operations only: no host
    synchronisation, traceable by ``torch.compile(fullgraph=True)``. Every backend's "mean" and the
    reference's use it."""
    if weight_sum is None or weight_sum.numel() == 0:
        return count.clamp(min=1).to(dtype)
    return torch.where(count > 0, weight_sum.to(dtype), torch.ones((), dtype=dtype, device=weight_sum.device))


def check_reduction(fn: str, reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"{fn}: reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_nonnegative(fn: str, **values) -> None:
    for name, value in values.items():
        if not value >= 0:
            raise ValueError(f"{fn}: {name} must be >= 0, got {value}")


def check_normalize(fn: str, normalize: str) -> None:
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"{fn}: normalize must be 'level' or 'node', got {normalize!r}")


def check_decode_options(fn: str, activation: str, score: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be 'sigmoid' or 'softmax', got {activation!r}")
    if score not in SCORES:
        raise ValueError(f"{fn}: score must be 'sum' or 'mean', got {score!r}")


def check_decode_ignore_index(fn: str, ignore_index, num_leaves: int) -> int:
    """decode's ``ignore_index`` (the label of NaN pixels) as an int: an integer (not a bool) that fits int64
    and is no leaf id (outside ``[0, L)``), so that it cannot be mistaken for a prediction."""
    try:
        if isinstance(ignore_index, bool) or (isinstance(ignore_index, torch.Tensor) and ignore_index.dtype == torch.bool):
            raise TypeError
        ignore_index = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"{fn}: ignore_index must be an int, got {type(ignore_index).__name__}") from None
    if not -2 ** 63 <= ignore_index < 2 ** 63:
        raise ValueError(f"{fn}: ignore_index must fit int64, got {ignore_index}")
    if 0 <= ignore_index < num_leaves:
        raise ValueError(f"{fn}: ignore_index={ignore_index} is a leaf id of the tree (leaves 0..{num_leaves - 1}); "
                         f"pass a label outside [0, {num_leaves}) for the pixels with NaN logits (e.g. -1)")
    return ignore_index


UPSAMPLE_MODES = (None, "bilinear")


def check_upsample(fn: str, logits_shape=None, out_shape=None, what: str = "target", upsample="bilinear") -> None:
    """``upsample`` is None or ``"bilinear"``; with logits' and output's shapes: logits ``(N, C, h, w)``
    of at least one pixel, output (``target`` ``(N, H, W)``, or ``size`` ``(H, W)``) with ``H >= h``, ``W >= w``."""
    if upsample not in UPSAMPLE_MODES:
        raise ValueError(f"{fn}: upsample must be None or 'bilinear', got {upsample!r}")
    if logits_shape is None:
        return
    if len(logits_shape) != 4 or logits_shape[2] < 1 or logits_shape[3] < 1:
        raise ValueError(f"{fn}: upsampling takes logits (N, C, h, w) with h, w >= 1, got {tuple(logits_shape)}")
    out = tuple(out_shape)
    hw = out[1:] if what == "target" else out
    ok = len(hw) == 2 and (what != "target" or (len(out) == 3 and out[0] == logits_shape[0]))
    if not ok or not (hw[0] >= logits_shape[2] and hw[1] >= logits_shape[3]):
        want = f"(N, H, W) with N = {logits_shape[0]}" if what == "target" else "(H, W)"
        raise ValueError(f"{fn}: with upsampling, {what} must be {want} and H >= {logits_shape[2]}, "
                         f"W >= {logits_shape[3]} (the logits' size; the loss upsamples, never downsamples), "
                         f"got {out}")


def check_weights(fn: str, class_weight, pixel_weight, num_leaves: int, target: torch.Tensor):
    """``(class_weight, pixel_weight)`` as tensors on the target's device: ``class_weight`` one finite
    float per leaf (a tensor or a sequence); ``pixel_weight`` a floating tensor of the target's shape."""
    if class_weight is not None:
        if not isinstance(class_weight, torch.Tensor):
            try:
                class_weight = torch.tensor([float(v) for v in class_weight])
            except (TypeError, ValueError):
                raise TypeError(f"{fn}: class_weight must be a tensor or a sequence of {num_leaves} numbers") from None
        if class_weight.dim() != 1 or class_weight.numel() != num_leaves:
            raise ValueError(f"{fn}: class_weight needs one weight per leaf ({num_leaves}, by label id), got shape "
                             f"{tuple(class_weight.shape)}")
        if not class_weight.dtype.is_floating_point:
            class_weight = class_weight.float()
        # Checked where it costs no host synchronisation (weights on the CPU), or with the label scan (a
        # module's weights already on the GPU, see set_label_check).
        if not _is_compiling() and (class_weight.device.type == "cpu" or _LABEL_CHECK):
            if not bool(torch.isfinite(class_weight).all()):
                raise ValueError(f"{fn}: class_weight holds a non-finite value")
        class_weight = class_weight.to(target.device)
    if pixel_weight is not None:
        if not isinstance(pixel_weight, torch.Tensor) or not pixel_weight.dtype.is_floating_point:
            raise TypeError(f"{fn}: pixel_weight must be a floating-point tensor of the target's shape")
        if tuple(pixel_weight.shape) != tuple(target.shape):
            raise ValueError(f"{fn}: pixel_weight must have the target's shape {tuple(target.shape)}, got "
                             f"{tuple(pixel_weight.shape)}")
        if pixel_weight.device != target.device:
            raise ValueError(f"{fn}: pixel_weight is on {pixel_weight.device} but target on {target.device}")
    return class_weight, pixel_weight


def set_label_check(enabled: bool) -> None:
    """Turn on (the default) or off the scan of the labels of every op that takes them (the losses,
    their modules and :func:`~hss_kernels.labels_at_depth`) for values outside ``[0, num_leaves)`` that
    are not ``ignore_index``, which raises a ``ValueError`` naming the label.

    The scan reads the whole target and, on a GPU, waits for the result (one host synchronisation per
    call); turn it off once a data pipeline is trusted. ``torch.compile`` skips it too. Without it, such a
    label is never read out of bounds (docs/MATH.md §5.3): every backend gives that pixel a NaN loss and a NaN
    gradient row, so a ``"mean"``/``"sum"`` loss is NaN, never a plausible number; the tree-triplet loss
    is NaN; ``labels_at_depth`` maps it to -1. Shapes, dtypes and devices are always checked. The same
    switch covers the finiteness check of a ``class_weight`` that already lives on the GPU (one on the CPU
    is always checked: it costs no synchronisation).
    """
    global _LABEL_CHECK
    _LABEL_CHECK = bool(enabled)


def label_check_enabled() -> bool:
    """Whether the ops scan their labels for out-of-range values (see :func:`set_label_check`)."""
    return _LABEL_CHECK


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - older torch
        return False


def check_labels(fn: str, labels: torch.Tensor, num_leaves: int, ignore_index: int, name: str = "target") -> None:
    """ValueError naming the first label outside ``[0, num_leaves)`` that is not ``ignore_index``.

    Skipped when the scan is off (:func:`set_label_check`) or under ``torch.compile``: it reads every
    label and, on a GPU, synchronises with the host."""
    if not _LABEL_CHECK or _is_compiling() or labels.numel() == 0:
        return
    bad = ((labels < 0) | (labels >= num_leaves)) & (labels != ignore_index)
    if bool(bad.any()):
        raise ValueError(f"{fn}: {name} holds label {int(labels[bad][0])}, outside [0, {num_leaves}) (the tree's "
                         f"leaves) and not ignore_index={ignore_index}")
