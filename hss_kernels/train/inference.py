"""Evaluation-time inference of ``hss-train``: the ``crop``, ``whole`` and ``slide`` modes (``--eval-mode``).

* ``crop``: the evaluation set is resized so that it covers the training crop size and centre-cropped
  (:class:`~hss_kernels.train.data.ResizeCenterCrop`); the model sees the crop. Fast, but its mIoU is that
  of the centre crops, not comparable with published numbers.
* ``whole``: the full evaluation image goes through the model at once (:func:`whole_logits`; padded at the
  bottom and right to a multiple of the model's ``size_divisor`` when it has one); predictions and metrics
  at the label's full size. mmsegmentation's ``mode='whole'``.
* ``slide``: windows of ``window`` pixels every ``stride`` pixels, the last window flush with the border
  (:func:`window_starts`); each window's logits (upsampled bilinearly to the window when the model emits
  them at a lower resolution) are summed into a full-size buffer and divided by the number of windows
  covering each pixel (:func:`slide_logits`). An image smaller than the window is padded with 0 (the
  normalised mean, as the training crops are) at the bottom and right to the window and the logits cropped
  back. mmsegmentation's ``mode='slide'``. The averaged quantity is what the model emits: leaf logits for
  ``ce`` / ``hier-softmax``, node logits for ``tree-min`` / ``tree-bce`` (decoded afterwards by
  :func:`hss_kernels.decode`'s path scores), as mmsegmentation averages its logits.

``--eval-scale S`` (whole and slide) resizes the image by ``S`` first; the logits of the resized image are
upsampled to the labels (:func:`hss_kernels.train.loop.evaluate_batch`).

Everything here runs under ``torch.no_grad()``, one batch of equally sized images at a time; the caller
wraps it in autocast when it wants bf16.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = ["window_starts", "model_logits", "whole_logits", "slide_logits", "default_stride", "EVAL_MODES"]

EVAL_MODES = ("crop", "whole", "slide")


def default_stride(window: Sequence[int]) -> Tuple[int, int]:
    """Two thirds of the window, rounded, at least 1 (mmsegmentation's configs: 769 → 513, 512 → 341,
    480 → 320)."""
    return tuple(max(1, round(2 * w / 3)) for w in window)


def window_starts(length: int, window: int, stride: int) -> List[int]:
    """First pixel of every window along one axis of ``length`` pixels: ``0, stride, 2*stride, ...``, the
    last one moved back so that it ends flush with the border (mmsegmentation's rule); ``[0]`` when the
    window covers the whole axis. Every pixel is in at least one window when ``stride <= window``."""
    if length < 1 or window < 1 or stride < 1:
        raise ValueError(f"window_starts: length, window and stride must be >= 1, got {length}, {window}, {stride}")
    if length <= window:
        return [0]
    n = (length - window + stride - 1) // stride + 1
    return [min(i * stride, length - window) for i in range(n)]


def model_logits(model, images: torch.Tensor) -> torch.Tensor:
    """The logits of ``model(images)`` (the training models return ``(logits, embedding)``)."""
    out = model(images)
    return out[0] if isinstance(out, (tuple, list)) else out


def _check_images(images: torch.Tensor) -> None:
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got "
                         f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__}")


def whole_logits(model, images: torch.Tensor, size_divisor: int = 1) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """``(logits, (Hp, Wp))``: the model's logits of the whole ``images`` (at its natural resolution), with
    the images padded with 0 at the bottom and right to ``(Hp, Wp)``, the next multiples of
    ``size_divisor``. Upsample the logits to ``(Hp, Wp)`` (the loss's ``upsample``, ``decode(size=)``) and
    crop ``[:H, :W]`` for the image's pixels."""
    _check_images(images)
    if size_divisor < 1:
        raise ValueError(f"size_divisor must be >= 1, got {size_divisor}")
    H, W = images.shape[-2:]
    Hp, Wp = -(-H // size_divisor) * size_divisor, -(-W // size_divisor) * size_divisor
    if (Hp, Wp) != (H, W):
        images = F.pad(images, (0, Wp - W, 0, Hp - H), value=0.0)
    return model_logits(model, images), (Hp, Wp)


def slide_logits(model, images: torch.Tensor, window: Sequence[int], stride: Sequence[int],
                 windows_per_batch: int = 1) -> torch.Tensor:
    """Float32 logits ``(N, C, H, W)`` at the images' full size: the mean over the sliding windows covering
    each pixel of the windows' logits (see the module docstring). ``window`` and ``stride`` are ``(h, w)``
    with ``1 <= stride <= window``; ``windows_per_batch`` windows (of every image of the batch) go through
    the model at a time."""
    _check_images(images)
    wh, ww = (int(v) for v in window)
    sh, sw = (int(v) for v in stride)
    if min(wh, ww, sh, sw) < 1 or sh > wh or sw > ww:
        raise ValueError(f"slide: need 1 <= stride <= window, got window {(wh, ww)}, stride {(sh, sw)}")
    N, _, H, W = images.shape
    Hp, Wp = max(H, wh), max(W, ww)
    if (Hp, Wp) != (H, W):  # smaller than the window: pad to it, crop the logits back at the end
        images = F.pad(images, (0, Wp - W, 0, Hp - H), value=0.0)
    boxes = [(y, x) for y in window_starts(Hp, wh, sh) for x in window_starts(Wp, ww, sw)]
    total = None
    count = torch.zeros(Hp, Wp, dtype=torch.float32, device=images.device)
    step = max(1, int(windows_per_batch))
    for i in range(0, len(boxes), step):
        chunk = boxes[i:i + step]
        crops = torch.cat([images[:, :, y:y + wh, x:x + ww] for y, x in chunk])
        logits = model_logits(model, crops)
        if tuple(logits.shape[-2:]) != (wh, ww):
            logits = F.interpolate(logits.float(), size=(wh, ww), mode="bilinear", align_corners=False)
        logits = logits.float()
        if total is None:
            total = torch.zeros(N, logits.shape[1], Hp, Wp, dtype=torch.float32, device=images.device)
        for j, (y, x) in enumerate(chunk):
            total[:, :, y:y + wh, x:x + ww] += logits[j * N:(j + 1) * N]
            count[y:y + wh, x:x + ww] += 1
    return (total / count)[:, :, :H, :W]
