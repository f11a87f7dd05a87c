"""Pictures of label maps at every depth of a class tree.

* :func:`palette`: one RGB colour per node channel. The depth-1 nodes get hues spread evenly around the
  colour wheel; every node's children get shades of its colour (a hue inside a narrow band around the
  parent's, different lightness), so a subtree reads as one family of colours at every depth.
* :func:`colorize`: leaf labels → an RGB image of their classes at a depth (``ignore_index`` black).
* :func:`save_prediction_grid`: a PNG with one row per sample: image | depth 1 | ... | leaves, the
  prediction and the target side by side at each depth.

NumPy and Pillow are needed (``pip install "hss_kernels[train]"``); the core library does without them.
"""
from __future__ import annotations

import colorsys
from functools import lru_cache
from typing import List, Optional, Sequence, Union

from ._extras import require_train

require_train("hss_kernels.viz", ("numpy", "PIL"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from .functional import as_tree  # noqa: E402
from .tree import Tree  # noqa: E402

__all__ = ["palette", "colorize", "save_prediction_grid"]

ArrayLike = Union[np.ndarray, torch.Tensor]

# Lightness band of the children of one node. Kept away from 0 and 1 so that no node is black
# (ignored pixels) or white (the grid's background).
_LIGHT_LO, _LIGHT_HI = 0.28, 0.76
# Saturation alternates with depth: a middle child has its parent's hue and could have its lightness.
_SATURATION = (0.85, 0.6)
# Height of the title band of save_prediction_grid (fits Pillow's default font).
_HEADER = 14
# Fraction of a parent's hue band its children share among themselves.
_HUE_SPREAD = 0.6


def _hls(tree: Tree) -> List[tuple]:
    """(hue, lightness, saturation) per node channel."""
    hls: List[Optional[tuple]] = [None] * tree.num_nodes
    band = [0.0] * tree.num_nodes  # width of the hue band each node's descendants stay inside

    def place(children: Sequence[int], hue: float, width: float, light: Optional[float]) -> None:
        k = len(children)
        for j, c in enumerate(children):
            if light is None:  # depth 1: evenly spread hues, one lightness
                h, l, w = hue + j / k, 0.5, 1.0 / k
            else:
                h = hue + width * _HUE_SPREAD * ((j + 0.5) / k - 0.5)
                w = width * _HUE_SPREAD / k
                if k == 1:  # an only child: a lighter (or darker) shade of its parent
                    l = light + 0.12 if light + 0.12 <= 0.82 else light - 0.3
                else:
                    l = _LIGHT_LO + (_LIGHT_HI - _LIGHT_LO) * j / (k - 1)
            hls[c] = (h % 1.0, l, _SATURATION[(tree.depths[c] - 1) % 2])
            band[c] = w

    order = tree._ordered  # children in file order, as in the tree file
    place(order(tree.roots), 0.0, 1.0, None)
    for c in tree.dfs_order:  # parents come before their children in pre-order
        if tree.children[c]:
            place(order(tree.children[c]), hls[c][0], band[c], hls[c][1])
    return hls  # type: ignore[return-value]


@lru_cache(maxsize=32)
def _palette_cached(tree: Tree) -> np.ndarray:
    rgb = [colorsys.hls_to_rgb(h, l, s) for h, l, s in _hls(tree)]
    out = np.round(np.array(rgb, dtype=np.float64) * 255).astype(np.uint8)
    out.setflags(write=False)
    return out


def palette(tree: Union[Tree, str]) -> np.ndarray:
    """RGB colour of every node (``tree``: a :class:`Tree` or a shipped tree's name): a read-only uint8 NumPy array ``(V, 3)`` indexed by node channel.

    Depth-1 nodes get evenly spaced hues; the children of a node get shades of its colour (hues within
    its band, lightness spread between dark and light). No node is black or white.
    """
    return _palette_cached(as_tree(tree))


def _as_numpy_labels(labels: ArrayLike, name: str) -> np.ndarray:
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    labels = np.asarray(labels)
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"{name} must hold integer leaf labels, got {labels.dtype}")
    return labels.astype(np.int64)


def colorize(labels: ArrayLike, tree: Tree, depth: Optional[int] = None, ignore_index: int = 255) -> np.ndarray:
    """Colour leaf labels by their class at ``depth`` (1..D; default D, the leaves).

    Args:
        labels: integer leaf labels, any shape ``S`` (tensor or array), values in ``[0, L)`` or
            ``ignore_index``.
    Returns:
        uint8 NumPy array ``(*S, 3)``: the palette colour of each pixel's depth-``depth`` ancestor node
        (the leaf itself when shallower), black for ``ignore_index``.
    Raises:
        TypeError for non-integer labels, ValueError for a bad depth or label.
    """
    tree = as_tree(tree)
    depth = tree.depth if depth is None else depth
    tree._check_depth(depth)
    lab = _as_numpy_labels(labels, "colorize: labels")
    L = tree.num_leaves
    ignored = lab == ignore_index
    bad = ((lab < 0) | (lab >= L)) & ~ignored
    if bad.any():
        raise ValueError(f"colorize: label {int(lab[bad][0])} outside [0, {L}) and not ignore_index={ignore_index}")
    channel = np.asarray(tree.leaf_ancestor[depth - 1], dtype=np.int64)
    out = palette(tree)[channel[np.where(ignored, 0, lab)]]
    out[ignored] = 0
    return out


def _image_rgb(image: ArrayLike) -> np.ndarray:
    """One image, (3, H, W) or (H, W, 3) or (H, W), uint8 or float → uint8 (H, W, 3)."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu().numpy() if image.is_floating_point() else image.detach().cpu().numpy()
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    elif a.ndim == 3 and a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = np.moveaxis(a, 0, -1)
    if a.ndim != 3 or a.shape[-1] not in (1, 3):
        raise ValueError(f"save_prediction_grid: an image must be (3, H, W), (H, W, 3) or (H, W), got {image.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    if a.dtype == np.uint8:
        return a
    a = a.astype(np.float64)
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0 or hi > 1.0:  # e.g. a normalised network input: stretch to the full range
        a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.round(a * 255).astype(np.uint8)


def save_prediction_grid(
    path,
    tree: Tree,
    preds: ArrayLike,
    targets: ArrayLike,
    images: Optional[ArrayLike] = None,
    ignore_index: int = 255,
    scale: int = 1,
    gap: int = 2,
    header: bool = True,
) -> np.ndarray:
    """Write a PNG grid of predictions and targets at every depth, and return it as uint8 ``(h, w, 3)``.

    One row per sample; the columns are ``image`` (if ``images`` is given), then for each depth
    ``d = 1..D`` the prediction and the target coloured by :func:`colorize`, side by side. Cells are
    ``H*scale`` × ``W*scale`` (nearest-neighbour enlargement), separated by ``gap`` white pixels;
    ``header`` adds a white band of ``_HEADER`` pixels on top naming the columns. So the image is
    ``ncols*W*scale + (ncols-1)*gap`` wide and ``header_h + N*H*scale + (N-1)*gap`` high, with
    ``ncols = 2*D (+1 with images)``.

    Args:
        path: where to write the PNG (str or path-like).
        preds, targets: integer leaf labels ``(N, H, W)`` (tensors or arrays); ``targets`` may hold
            ``ignore_index`` (drawn black); ``preds`` may too.
        images: optional ``(N, 3, H, W)`` or ``(N, H, W, 3)``; uint8, or float in [0, 1] (other float
            ranges are stretched per image).
    Raises:
        ValueError on mismatched shapes, bad labels, ``scale < 1`` or ``gap < 0``.
    """
    from PIL import Image, ImageDraw

    tree = as_tree(tree)
    p = _as_numpy_labels(preds, "save_prediction_grid: preds")
    t = _as_numpy_labels(targets, "save_prediction_grid: targets")
    if p.ndim != 3 or p.shape != t.shape:
        raise ValueError(f"save_prediction_grid: preds and targets must both be (N, H, W), got {p.shape} and {t.shape}")
    if int(scale) < 1 or int(gap) < 0:
        raise ValueError(f"save_prediction_grid: scale must be >= 1 and gap >= 0, got {scale} and {gap}")
    N, H, W = p.shape
    scale, gap = int(scale), int(gap)
    if images is not None and len(images) != N:
        raise ValueError(f"save_prediction_grid: {len(images)} images for {N} label maps")
    titles = (["image"] if images is not None else []) + [
        f"{'leaves' if d == tree.depth else f'depth {d}'} {what}" for d in range(1, tree.depth + 1)
        for what in ("pred", "true")]
    ncols = len(titles)
    ch, cw = H * scale, W * scale
    top = _HEADER if header else 0
    grid = np.full((top + N * ch + (N - 1) * gap, ncols * cw + (ncols - 1) * gap, 3), 255, dtype=np.uint8)

    def put(row: int, col: int, cell: np.ndarray) -> None:
        if scale > 1:
            cell = cell.repeat(scale, axis=0).repeat(scale, axis=1)
        y, x = top + row * (ch + gap), col * (cw + gap)
        grid[y:y + ch, x:x + cw] = cell

    for i in range(N):
        col = 0
        if images is not None:
            img = _image_rgb(images[i])
            if img.shape[:2] != (H, W):
                raise ValueError(f"save_prediction_grid: image {i} is {img.shape[:2]}, the labels are {(H, W)}")
            put(i, 0, img)
            col = 1
        for d in range(1, tree.depth + 1):
            put(i, col, colorize(p[i], tree, d, ignore_index))
            put(i, col + 1, colorize(t[i], tree, d, ignore_index))
            col += 2
    pic = Image.fromarray(grid)
    if header:
        draw = ImageDraw.Draw(pic)
        for col, title in enumerate(titles):
            while title and draw.textlength(title) > cw - 1:  # keep each title over its own column
                title = title[:-1]
            draw.text((col * (cw + gap) + 1, 1), title, fill=(0, 0, 0))
        grid = np.asarray(pic).copy()
    pic.save(path, format="PNG")
    return grid
