"""Segmentation models for the training script.

* :class:`UNet`: a small U-Net written here (GroupNorm, so that tiny per-process batches and
  DistributedDataParallel need no batch-norm synchronisation); trains on a CPU in minutes.
* :func:`deeplabv3`: torchvision's DeepLabV3-ResNet50 when torchvision is installed (not tested in this
  project's CI, which has no torchvision).

Both return ``(logits, embedding)``: logits ``(N, C, h, w)`` at the model's natural resolution (``C`` =
leaves or nodes, see :func:`out_channels`): the input's for the U-Net with ``out_stride=1``, 1/2, 1/4, ... of
it with a larger ``out_stride``, 1/8 for DeepLabV3; the losses upsample them to the labels
(``upsample="bilinear"``, fused on the CPU). And a pixel embedding ``(N, E, h', w')`` from the decoder
features for the tree-triplet loss (``None`` when ``embed_dim=0``).

``size_divisor`` (a model attribute): ``hss-train --eval-mode whole`` pads the evaluation image at the bottom
and right to a multiple of it and crops the prediction back (the U-Net: 1, it takes any size; DeepLabV3: 8,
so that its 1/8 logits fall on the padded image's grid).
"""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..tree import Tree

__all__ = ["UNet", "deeplabv3", "build_model", "out_channels", "LEAF_LOSSES", "NODE_LOSSES", "LOSSES"]

LEAF_LOSSES = ("ce", "hier-softmax")
NODE_LOSSES = ("tree-min", "tree-bce")
LOSSES = LEAF_LOSSES + NODE_LOSSES


def out_channels(tree: Tree, loss: str) -> int:
    """Channels the head must emit for ``loss``: one per leaf (``ce``, ``hier-softmax``) or one per node
    (``tree-min``, ``tree-bce``)."""
    if loss in LEAF_LOSSES:
        return tree.num_leaves
    if loss in NODE_LOSSES:
        return tree.num_nodes
    raise ValueError(f"unknown loss {loss!r}; choose one of {LEAF_LOSSES + NODE_LOSSES}")


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(8, cout), cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.GroupNorm(math.gcd(8, cout), cout), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with ``levels`` resolutions, ``width * 2**i`` channels at level ``i``.

    Args:
        num_classes: output channels. in_channels: 3 for RGB.
        width: channels at full resolution (16 trains fast on a CPU). levels: number of resolutions (the
            input's H and W need not be divisible by ``2**(levels-1)``: skips are resized to match).
        embed_dim: channels of the embedding head (0: none).
        out_stride: 1 (logits at the input's resolution), or 2, 4, ... < 2**levels: the decoder stops that
            many times below full resolution, as the heads of DeepLab or SegFormer do.
    """

    def __init__(self, num_classes: int, in_channels: int = 3, width: int = 16, levels: int = 4, embed_dim: int = 0,
                 out_stride: int = 1):
        super().__init__()
        self.size_divisor = 1  # any input size: skips are resized to match
        if levels < 1 or width < 1 or num_classes < 1:
            raise ValueError("UNet: levels, width and num_classes must be >= 1")
        stop = max(out_stride, 1).bit_length() - 1
        if out_stride < 1 or out_stride != 2 ** stop or stop >= levels:
            raise ValueError(f"UNet: out_stride must be a power of 2 below 2**levels = {2 ** levels}, got {out_stride}")
        chans = [width * 2 ** i for i in range(levels)]
        self.down = nn.ModuleList()
        cin = in_channels
        for c in chans:
            self.down.append(_block(cin, c))
            cin = c
        self.up = nn.ModuleList()
        for i in range(levels - 2, stop - 1, -1):
            self.up.append(_block(chans[i + 1] + chans[i], chans[i]))
        self.head = nn.Conv2d(chans[stop], num_classes, 1)
        self.embed = nn.Conv2d(chans[stop], embed_dim, 1) if embed_dim > 0 else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        skips: List[torch.Tensor] = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
            skips.append(x)
        for block, skip in zip(self.up, reversed(skips[:-1])):
            x = F.interpolate(x, size=skip.shape[2:], mode="bilinear", align_corners=False)
            x = block(torch.cat([x, skip], 1))
        emb = self.embed(x) if self.embed is not None else None
        return self.head(x), emb


class _DeepLab(nn.Module):
    def __init__(self, net: nn.Module, embed_dim: int):
        super().__init__()
        self.net = net
        self.size_divisor = 8
        # DeepLabV3's classifier[0] is ASPP; its output (256 channels) is the decoder feature.
        self.embed = nn.Conv2d(256, embed_dim, 1) if embed_dim > 0 else None

    def forward(self, x):
        feats = self.net.backbone(x)["out"]
        cls = self.net.classifier
        h = cls[0](feats)
        for m in list(cls)[1:-1]:
            h = m(h)
        return cls[-1](h), (self.embed(h) if self.embed is not None else None)  # logits at 1/8


def deeplabv3(num_classes: int, embed_dim: int = 0, pretrained_backbone: bool = False) -> nn.Module:
    """torchvision's DeepLabV3-ResNet50 with a ``num_classes`` head (and an embedding head on the ASPP
    output). Raises ``RuntimeError`` when torchvision is not installed. Untested here (no torchvision)."""
    try:
        from torchvision.models.segmentation import deeplabv3_resnet50
    except ImportError as exc:
        raise RuntimeError("--model deeplabv3 needs torchvision (pip install torchvision); "
                           f"it could not be imported: {exc}") from exc
    weights = "IMAGENET1K_V1" if pretrained_backbone else None
    net = deeplabv3_resnet50(weights=None, weights_backbone=weights, num_classes=num_classes, aux_loss=False)
    return _DeepLab(net, embed_dim)


def build_model(name: str, tree: Tree, loss: str, embed_dim: int = 0, width: int = 16, levels: int = 4,
                out_stride: int = 1) -> nn.Module:
    """``name``: ``"unet"`` (``out_stride``: see :class:`UNet`) or ``"deeplabv3"``; the head suits ``loss``
    (see :func:`out_channels`)."""
    c = out_channels(tree, loss)
    if name == "unet":
        return UNet(c, width=width, levels=levels, embed_dim=embed_dim, out_stride=out_stride)
    if name == "deeplabv3":
        return deeplabv3(c, embed_dim=embed_dim)
    raise ValueError(f"unknown model {name!r}; choose 'unet' or 'deeplabv3'")
