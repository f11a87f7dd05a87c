"""Data for the training script: a synthetic hierarchical data set and loaders for real folder layouts.

Every data set here yields ``(image, target)`` pairs: ``image`` a float32 tensor ``(3, H, W)``
(normalised: roughly zero mean, unit spread), ``target`` an int64 tensor ``(H, W)`` of leaf label ids of
the data set's tree, ``ignore_index`` (255) marking pixels that count for nothing.

* :class:`SyntheticHierarchy`: generated on the fly from any :class:`~hss_kernels.Tree`, seeded, any size.
  Images are Voronoi mosaics; each cell is one leaf class, painted with a colour that every node of the
  tree shifts a little from its parent's (the shift shrinks with depth), plus a stripe texture shared by
  every leaf under the same depth-1 class, plus noise; leaf frequencies are long-tailed (Zipf), as in
  real data sets. Super-classes are therefore easy and leaves hard, and what a pixel has in common with
  its siblings is real signal a hierarchical loss can use.
* :class:`SegmentationFolder` and the builders :func:`vistas`, :func:`cityscapes`,
  :func:`pascal_person_part`, :func:`helen`, :func:`lip` (also :func:`build_dataset` by name): the standard folder
  layouts of those data sets, mapping their label ids to the shipped trees' leaves.

Transforms (:class:`RandomScaleCropFlip` for training, :class:`ResizeCenterCrop` for ``hss-train
--eval-mode crop``; the other evaluation modes read the full images) work on tensors and pad labels with
``ignore_index``; :class:`Transformed` applies one to any data set.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..functional import as_tree
from ..tree import Tree

__all__ = [
    "SyntheticHierarchy",
    "SegmentationFolder",
    "RandomScaleCropFlip",
    "ResizeCenterCrop",
    "Transformed",
    "vistas",
    "cityscapes",
    "pascal_person_part",
    "helen",
    "lip",
    "DataError",
    "build_dataset",
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Size = Union[int, Tuple[int, int]]


def _pair(size: Size) -> Tuple[int, int]:
    if isinstance(size, int):
        size = (size, size)
    h, w = (int(s) for s in size)
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {size}")
    return h, w


# --------------------------------------------------------------------------- synthetic data
class SyntheticHierarchy(Dataset):
    """Synthetic images whose appearance follows a class tree.

    Args:
        tree: a :class:`Tree` or a shipped tree's name.
        length: number of images (item ``i`` is always the same image for a given ``seed``).
        size: ``H`` or ``(H, W)``.
        seed: seeds the tree's colours and textures and every image.
        regions: ``(min, max)`` number of Voronoi cells per image.
        spread: colour offset of a depth-1 node from the root (standard deviation per RGB channel).
        decay: each level down multiplies the offset by this (leaves differ from their siblings by
            ``spread * decay**(d-1)`` at depth ``d``: less than super-classes differ from each other).
        texture: amplitude of the stripe texture shared by the leaves of each depth-1 class.
        noise: standard deviation of the per-pixel Gaussian noise.
        imbalance: leaf frequencies follow Zipf's law with this exponent (the leaves ranked in a seeded
            random order), a long tail like real data sets'; 0 makes every leaf equally frequent.
        ignore_index: value of the pixels on cell boundaries (they are ignored, as annotators leave
            boundaries void in real data sets).

    Items are ``(image float32 (3, H, W), target int64 (H, W))``. The colours depend only on ``seed``
    and the tree, so a training and a validation set built with different seeds would not share them:
    give both the same ``seed`` and different ``offset`` (the first item's index).
    """

    def __init__(self, tree: Union[Tree, str], length: int = 512, size: Size = 64, seed: int = 0,
                 regions: Tuple[int, int] = (4, 10), spread: float = 1.0, decay: float = 0.35,
                 texture: float = 0.35, noise: float = 0.6, imbalance: float = 1.0, ignore_index: int = 255,
                 offset: int = 0):
        self.tree = as_tree(tree)
        if length < 0:
            raise ValueError(f"length must be >= 0, got {length}")
        if not 1 <= regions[0] <= regions[1]:
            raise ValueError(f"regions must be (min, max) with 1 <= min <= max, got {regions}")
        if 0 <= ignore_index < self.tree.num_leaves:
            raise ValueError(f"ignore_index={ignore_index} is a leaf label of the tree")
        self.length, self.size, self.seed, self.offset = int(length), _pair(size), int(seed), int(offset)
        self.regions, self.noise, self.ignore_index = regions, float(noise), ignore_index
        rng = np.random.default_rng([self.seed, 0x7EE])
        t = self.tree
        colour = np.zeros((t.num_nodes, 3))
        for c in t.dfs_order:  # parents before children
            base = colour[t.parents[c]] if t.parents[c] >= 0 else 0.0
            colour[c] = base + rng.normal(0.0, spread * decay ** (t.depths[c] - 1), 3)
        self.leaf_colour = colour[t.leaf_channels].astype(np.float32)  # (L, 3)
        # One stripe pattern (angle, period, phase, per-channel weights) per depth-1 class.
        top = [t.ancestors[c][0] for c in t.leaf_channels]
        tops = sorted(set(top))
        pattern = {a: (rng.uniform(0, math.pi), rng.uniform(3.0, 9.0), rng.uniform(0, 2 * math.pi),
                       rng.normal(0.0, 1.0, 3)) for a in tops}
        self.leaf_pattern = [pattern[a] for a in top]
        self.texture = float(texture)
        zipf = 1.0 / np.arange(1, t.num_leaves + 1) ** float(imbalance)
        self.leaf_prob = (zipf / zipf.sum())[rng.permutation(t.num_leaves)]
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Epoch ``e`` yields images ``e * length + i``: fresh images every epoch, still seeded."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} out of range for {self.length} images")
        H, W = self.size
        rng = np.random.default_rng([self.seed, 1, self.offset + self.epoch * self.length + int(index)])
        k = int(rng.integers(self.regions[0], self.regions[1] + 1))
        centres = rng.uniform(0, 1, (k, 2)) * (H, W)
        # Power-diagram weights vary the cell sizes; an anisotropy makes cells less regular.
        weights = rng.uniform(0, 0.04, k) * (H * W)
        yy, xx = np.meshgrid(np.arange(H, dtype=np.float32), np.arange(W, dtype=np.float32), indexing="ij")
        aniso = rng.uniform(0.6, 1.6)
        d2 = ((yy[None] - centres[:, 0, None, None]) ** 2 * aniso
              + (xx[None] - centres[:, 1, None, None]) ** 2 / aniso - weights[:, None, None])
        cell = d2.argmin(0)
        leaf_of_cell = rng.choice(self.tree.num_leaves, size=k, p=self.leaf_prob)
        target = leaf_of_cell[cell]
        image = self.leaf_colour[target].transpose(2, 0, 1).copy()  # (3, H, W)
        image += rng.normal(0.0, 0.05, (k, 3)).astype(np.float32)[cell].transpose(2, 0, 1)  # per-cell tint
        if self.texture > 0:
            for j in range(k):
                angle, period, phase, w = self.leaf_pattern[leaf_of_cell[j]]
                mask = cell == j
                wave = np.sin((yy[mask] * math.cos(angle) + xx[mask] * math.sin(angle)) * (2 * math.pi / period)
                              + phase)
                image[:, mask] += (self.texture * w[:, None] * wave[None]).astype(np.float32)
        image += rng.normal(0.0, self.noise, (3, H, W)).astype(np.float32)
        edge = np.zeros((H, W), dtype=bool)
        edge[:, 1:] |= cell[:, 1:] != cell[:, :-1]
        edge[1:, :] |= cell[1:, :] != cell[:-1, :]
        target = np.where(edge, self.ignore_index, target)
        return torch.from_numpy(image.astype(np.float32)), torch.from_numpy(target.astype(np.int64))

    def denormalize(self, image: torch.Tensor) -> torch.Tensor:
        """A displayable RGB version in [0, 1] of a (batch of) synthetic image(s)."""
        return (image * 0.25 + 0.5).clamp(0, 1)


# --------------------------------------------------------------------------- transforms
class RandomScaleCropFlip:
    """Training augmentation: random scale in ``scale``, random crop to ``size`` (padding images with 0
    and labels with ``ignore_index`` where the scaled image is smaller), random horizontal flip.

    Called as ``t(image (3, H, W) float, target (H, W) int64, generator) -> (image, target)``.
    """

    def __init__(self, size: Size, scale: Tuple[float, float] = (0.5, 2.0), flip: bool = True,
                 ignore_index: int = 255):
        self.size, self.scale, self.flip, self.ignore_index = _pair(size), scale, flip, ignore_index

    def __call__(self, image, target, generator: Optional[torch.Generator] = None):
        u = torch.rand(4, generator=generator).tolist()
        s = self.scale[0] + (self.scale[1] - self.scale[0]) * u[0]
        H, W = target.shape
        h, w = max(1, round(H * s)), max(1, round(W * s))
        image, target = _resize(image, target, (h, w))
        th, tw = self.size
        ph, pw = max(0, th - h), max(0, tw - w)
        if ph or pw:
            image = F.pad(image, (0, pw, 0, ph), value=0.0)
            target = F.pad(target, (0, pw, 0, ph), value=self.ignore_index)
        y0 = int(u[1] * (image.shape[1] - th + 1))
        x0 = int(u[2] * (image.shape[2] - tw + 1))
        image, target = image[:, y0:y0 + th, x0:x0 + tw], target[y0:y0 + th, x0:x0 + tw]
        if self.flip and u[3] < 0.5:
            image, target = image.flip(-1), target.flip(-1)
        return image.contiguous(), target.contiguous()


class ResizeCenterCrop:
    """Evaluation transform: resize so that the image covers ``size``, then take the centre crop."""

    def __init__(self, size: Size):
        self.size = _pair(size)

    def __call__(self, image, target, generator=None):
        H, W = target.shape
        th, tw = self.size
        s = max(th / H, tw / W)
        h, w = max(th, round(H * s)), max(tw, round(W * s))
        image, target = _resize(image, target, (h, w))
        y0, x0 = (h - th) // 2, (w - tw) // 2
        return image[:, y0:y0 + th, x0:x0 + tw].contiguous(), target[y0:y0 + th, x0:x0 + tw].contiguous()


class Transformed(Dataset):
    """``dataset`` with ``transform(image, target) -> (image, target)`` applied to every item (e.g. the
    synthetic validation set centre-cropped for ``--eval-mode crop``)."""

    def __init__(self, dataset: Dataset, transform: Callable):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, target = self.dataset[index]
        return self.transform(image, target)

    def denormalize(self, image: torch.Tensor) -> torch.Tensor:
        return self.dataset.denormalize(image)


def _resize(image, target, hw):
    if tuple(target.shape) == tuple(hw):
        return image, target
    image = F.interpolate(image[None], size=hw, mode="bilinear", align_corners=False)[0]
    # Labels by nearest neighbour: never invent a label between two classes.
    target = F.interpolate(target[None, None].float(), size=hw, mode="nearest")[0, 0].long()
    return image, target


# --------------------------------------------------------------------------- real data sets
class DataError(ValueError):
    """A data set's files do not hold what its loader expects (a label id it does not know, a colour image
    for a label map): hss-train reports it as one line naming the file."""


# Cityscapes' labelIds (cityscapesscripts' labels.py) → its 19 train ids; every other id is ignored.
CITYSCAPES_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                       26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}


class SegmentationFolder(Dataset):
    """Image / label-map file pairs with a lookup table from the data set's label ids to leaf ids.

    Args:
        images, labels: equal-length lists of paths (RGB images; single-channel or palette PNG label
            maps whose pixel values are the data set's label ids).
        tree: the tree whose leaves the ids map to.
        id_map: ``{data set id: leaf id or ignore_index}``; ``ignore_index`` itself always maps to
            ``ignore_index``. Any other id in a label file raises ``ValueError`` naming the file.
        transform: ``(image, target, generator) -> (image, target)``, e.g. :class:`RandomScaleCropFlip`.
        seed: seeds the transform's randomness (item ``i`` of epoch ``e`` uses ``seed, e, i``; set the
            epoch with :meth:`set_epoch`).

    Items are ``(image float32 (3, H, W) normalised with the ImageNet mean/std, target int64 (H, W))``.
    """

    def __init__(self, images: Sequence[Union[str, Path]], labels: Sequence[Union[str, Path]], tree: Union[Tree, str],
                 id_map: Dict[int, int], transform: Optional[Callable] = None, ignore_index: int = 255,
                 seed: int = 0, name: str = "data set"):
        if len(images) != len(labels):
            raise ValueError(f"{name}: {len(images)} images but {len(labels)} label maps")
        if not images:
            raise ValueError(f"{name}: no images found")
        self.tree = as_tree(tree)
        self.images, self.labels = [Path(p) for p in images], [Path(p) for p in labels]
        self.transform, self.ignore_index, self.seed, self.name = transform, ignore_index, seed, name
        self.epoch = 0
        size = max([256, ignore_index + 1] + [k + 1 for k in id_map])
        self.lut = np.full(size, -1, dtype=np.int64)
        for k, v in id_map.items():
            if not (0 <= v < self.tree.num_leaves or v == ignore_index):
                raise ValueError(f"{name}: id_map sends {k} to {v}, which is neither a leaf of the tree "
                                 f"(0..{self.tree.num_leaves - 1}) nor ignore_index={ignore_index}")
            self.lut[k] = v
        if 0 <= ignore_index < size:
            self.lut[ignore_index] = ignore_index
        # Leaves no data set id maps to (e.g. Vistas v1.2's 'unlabeled' under its config.json): the data set
        # does not evaluate them, so the metrics leave them out (HierarchicalMetrics(ignored_leaves=...)).
        self.ignored_leaves = sorted(set(range(self.tree.num_leaves)) - set(id_map.values()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.images)

    def read_target(self, index: int) -> torch.Tensor:
        """The label map of item ``index`` mapped to leaf ids, before any transform (int64 (H, W))."""
        from PIL import Image

        path = self.labels[index]
        with Image.open(path) as im:
            # Palette PNGs (Vistas, Pascal) store the class id as the palette index: read the index, never
            # the colour. A colour image is a visualisation (e.g. Cityscapes' *_color.png), not ids.
            if im.mode not in ("P", "L", "I", "I;16", "I;16B", "I;16L"):
                raise DataError(f"{self.name}: {path} is a {im.mode} image, not a label map of class ids "
                                 f"(single-channel or palette PNG)")
            raw = np.asarray(im).astype(np.int64)
        bad = (raw < 0) | (raw >= len(self.lut))
        if not bad.any():
            mapped = self.lut[raw]
            bad = mapped < 0
        if bad.any():
            ids = sorted(set(raw[bad].tolist()))[:10]
            raise DataError(
                f"{self.name}: {path} holds label id(s) {ids} that are not ids of this data set "
                f"(known ids: {self.known_ids()}); is this the right data set / version for tree "
                f"with {self.tree.num_leaves} leaves?")
        return torch.from_numpy(mapped)

    def known_ids(self) -> str:
        ids = np.flatnonzero(self.lut >= 0)
        runs, start = [], ids[0]
        for a, b in zip(ids, list(ids[1:]) + [None]):
            if b is None or b != a + 1:
                runs.append(f"{start}" if start == a else f"{start}..{a}")
                start = b
        return ", ".join(runs)

    def __getitem__(self, index: int):
        from PIL import Image

        with Image.open(self.images[index]) as im:
            image = torch.from_numpy(np.asarray(im.convert("RGB"), dtype=np.float32).copy()).permute(2, 0, 1)
        target = self.read_target(index)
        if tuple(image.shape[1:]) != tuple(target.shape):
            raise ValueError(f"{self.name}: {self.images[index]} is {tuple(image.shape[1:])} but its label map "
                             f"{self.labels[index]} is {tuple(target.shape)}")
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1) * 255
        image = (image - mean) / std
        if self.transform is not None:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, int(index))) & 0x7FFFFFFF)
            image, target = self.transform(image, target, g)
        return image, target

    @staticmethod
    def denormalize(image: torch.Tensor) -> torch.Tensor:
        """Displayable RGB in [0, 1] of a (batch of) normalised image(s)."""
        mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
        return (image * std + mean).clamp(0, 1)


def _need_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: folder {path} does not exist (see hss_kernels.train.data for the expected layout)")
    return path


def _pairs(image_dir: Path, label_dir: Path, image_glob: str, label_of: Callable[[Path], Path], what: str):
    images = sorted(image_dir.glob(image_glob))
    if not images:
        raise FileNotFoundError(f"{what}: no images matching {image_glob} in {image_dir}")
    labels = [label_of(p) for p in images]
    missing = [str(p) for p in labels if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{what}: {len(missing)} image(s) have no label map, e.g. {missing[0]}")
    return images, labels


def _check_tree(tree, default: str, leaves: int, what: str) -> Tree:
    tree = as_tree(default if tree is None else tree)
    if tree.num_leaves != leaves:
        raise ValueError(f"{what}: the data set's ids need a tree with {leaves} leaves (tree {default!r}), "
                         f"got {tree!r}")
    return tree


def vistas(root, split: str = "training", version: str = "v1.2", tree=None, transform=None,
           ignore_index: int = 255, seed: int = 0) -> SegmentationFolder:
    """Mapillary Vistas. Layout (the official archive, unpacked)::

        root/<split>/images/<id>.jpg            split: training, validation
        root/<split>/labels/<id>.png            v1.2: ids 0..65 (65 'unlabeled' is a leaf of tree vistas)
        root/<split>/v2.0/labels/<id>.png       v2.0: ids 0..123; 123 'Unlabeled' becomes ignore_index

    Tree: ``vistas`` (66 leaves) for v1.2, ``vistas_v2`` (123 leaves) for v2.0; ids map to leaves 1:1.
    The archive's ``root/config.json`` (v1.2) or ``root/config_v2.0.json`` (v2.0), when present: the classes
    whose ``evaluate`` is false (v1.2: 'unlabeled', 65) map to ``ignore_index``, as the benchmark evaluates
    them; the trees keep those leaves (their logits then never see a label).
    """
    root = Path(root)
    if version not in ("v1.2", "v2.0"):
        raise ValueError(f"vistas: version must be 'v1.2' or 'v2.0', got {version!r}")
    what = f"Mapillary Vistas {version}"
    base = _need_dir(root / split, what)
    label_dir = _need_dir(base / "labels" if version == "v1.2" else base / "v2.0" / "labels", what)
    image_dir = _need_dir(base / "images", what)
    images, labels = _pairs(image_dir, label_dir, "*.jpg", lambda p: label_dir / (p.stem + ".png"), what)
    if version == "v1.2":
        tree = _check_tree(tree, "vistas", 66, what)
        id_map = {i: i for i in range(66)}
    else:
        tree = _check_tree(tree, "vistas_v2", 123, what)
        id_map = {i: i for i in range(123)}
        id_map[123] = ignore_index
    config = root / ("config.json" if version == "v1.2" else "config_v2.0.json")
    if config.is_file():
        for i in _not_evaluated(config, len(id_map), what):
            id_map[i] = ignore_index
    return SegmentationFolder(images, labels, tree, id_map, transform, ignore_index, seed, what)


def _not_evaluated(config: Path, n: int, what: str) -> List[int]:
    """The label ids whose ``evaluate`` is false in a Vistas config file (its ``labels`` list, by id)."""
    import json

    try:
        entries = json.loads(config.read_text())["labels"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{what}: {config} is not a Vistas config file with a 'labels' list ({exc})") from None
    if len(entries) != n:
        raise DataError(f"{what}: {config} lists {len(entries)} labels, this version has {n}")
    return [i for i, e in enumerate(entries) if not e.get("evaluate", True)]


def cityscapes(root, split: str = "train", tree=None, transform=None, ignore_index: int = 255,
               seed: int = 0) -> SegmentationFolder:
    """Cityscapes, fine annotations, as downloaded or after cityscapesscripts' ``createTrainIdLabelImgs``::

        root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png
        root/gtFine/<split>/<city>/<name>_gtFine_labelTrainIds.png     train ids 0..18, 255 ignore (used when present)
        root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png          the download's ids 0..33 (else): mapped to
                                                                        the 19 train ids, every other id ignored

    Tree: ``cityscapes`` (19 leaves, train id = leaf id).
    """
    root = Path(root)
    what = "Cityscapes"
    image_dir = _need_dir(root / "leftImg8bit" / split, what)
    label_dir = _need_dir(root / "gtFine" / split, what)

    def label_of(p: Path, kind: str) -> Path:
        stem = p.name[: -len("_leftImg8bit.png")]
        return label_dir / p.parent.name / f"{stem}_gtFine_{kind}.png"

    first = next(iter(sorted(image_dir.glob("*/*_leftImg8bit.png"))), None)
    kind = "labelTrainIds" if first is None or label_of(first, "labelTrainIds").is_file() else "labelIds"
    images, labels = _pairs(image_dir, label_dir, "*/*_leftImg8bit.png", lambda p: label_of(p, kind),
                            f"{what} ({kind}: *_gtFine_labelTrainIds.png, or the download's *_gtFine_labelIds.png)")
    tree = _check_tree(tree, "cityscapes", 19, what)
    if kind == "labelTrainIds":
        id_map = {i: i for i in range(19)}
    else:  # the raw ids of the download: 0..33, the 19 evaluated classes to their train ids, the rest ignored
        id_map = {i: CITYSCAPES_TRAIN_ID.get(i, ignore_index) for i in range(34)}
    return SegmentationFolder(images, labels, tree, id_map, transform, ignore_index, seed, f"{what} ({kind})")


def _id_list(root: Path, split: str, what: str) -> Optional[List[str]]:
    for p in (root / f"{split}_id.txt", root / f"{split}.txt", root / "list" / f"{split}_id.txt",
              root / "list" / f"{split}.txt"):
        if p.is_file():
            ids = [line.split()[0] for line in p.read_text().splitlines() if line.strip()]
            if not ids:
                raise ValueError(f"{what}: split file {p} is empty")
            return [Path(i).stem for i in ids]
    return None


def _listed(root: Path, image_dir: Path, label_dir: Path, split: str, ext: str, what: str):
    ids = _id_list(root, split, what)
    if ids is None:
        raise FileNotFoundError(f"{what}: no split file for {split!r} (looked for {split}_id.txt and {split}.txt "
                                f"in {root} and {root / 'list'})")
    images = [image_dir / f"{i}{ext}" for i in ids]
    labels = [label_dir / f"{i}.png" for i in ids]
    for kind, files in (("image", images), ("label map", labels)):
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{what}: {len(missing)} {kind}(s) listed in the {split} split are missing, "
                                    f"e.g. {missing[0]}")
    return images, labels


def pascal_person_part(root, split: str = "train", tree=None, transform=None, ignore_index: int = 255,
                       seed: int = 0) -> SegmentationFolder:
    """Pascal-Person-Part in the layout most part-parsing code uses::

        root/JPEGImages/<id>.jpg
        root/SegmentationPart/<id>.png      ids 0..6: background, head, torso, upper arm, lower arm,
                                            upper leg, lower leg; 255 ignore
        root/<split>_id.txt (or <split>.txt, or list/<split>_id.txt): one image id per line

    Tree: ``pascal_person_part`` (7 leaves, id = leaf id).
    """
    root = Path(root)
    what = "Pascal-Person-Part"
    image_dir = _need_dir(root / "JPEGImages", what)
    label_dir = _need_dir(root / "SegmentationPart", what)
    images, labels = _listed(_need_dir(root, what), image_dir, label_dir, split, ".jpg", what)
    tree = _check_tree(tree, "pascal_person_part", 7, what)
    return SegmentationFolder(images, labels, tree, {i: i for i in range(7)}, transform, ignore_index, seed, what)


def helen(root, split: str = "train", tree=None, transform=None, ignore_index: int = 255,
          seed: int = 0) -> SegmentationFolder:
    """Helen face parsing (SmithCVPR2013 labels merged into one map per image)::

        root/images/<id>.jpg
        root/labels/<id>.png      ids 0..10: background, face skin, left/right eyebrow, left/right eye,
                                  nose, upper lip, inner mouth, lower lip, hair
        root/<split>.txt (or <split>_id.txt, list/...): one id per line; without it, every image

    Tree: ``helen`` (11 leaves, id = leaf id).
    """
    root = Path(root)
    what = "Helen"
    image_dir = _need_dir(root / "images", what)
    label_dir = _need_dir(root / "labels", what)
    if _id_list(root, split, what) is not None:
        images, labels = _listed(root, image_dir, label_dir, split, ".jpg", what)
    else:
        images, labels = _pairs(image_dir, label_dir, "*.jpg", lambda p: label_dir / (p.stem + ".png"), what)
    tree = _check_tree(tree, "helen", 11, what)
    return SegmentationFolder(images, labels, tree, {i: i for i in range(11)}, transform, ignore_index, seed, what)


def lip(root, split: str = "train", tree=None, transform=None, ignore_index: int = 255,
        seed: int = 0) -> SegmentationFolder:
    """LIP (Look Into Person), the single-person human parsing archive as downloaded::

        root/TrainVal_images/<split>_images/<id>.jpg                        split: train, val
        root/TrainVal_parsing_annotations/<split>_segmentations/<id>.png    ids 0..19 (0 background)

    Tree: ``lip`` (20 leaves, id = leaf id; HSSN's upper/lower-body grouping).
    """
    root = Path(root)
    what = "LIP"
    image_dir = _need_dir(root / "TrainVal_images" / f"{split}_images", what)
    label_dir = _need_dir(root / "TrainVal_parsing_annotations" / f"{split}_segmentations", what)
    images, labels = _pairs(image_dir, label_dir, "*.jpg", lambda p: label_dir / (p.stem + ".png"), what)
    tree = _check_tree(tree, "lip", 20, what)
    return SegmentationFolder(images, labels, tree, {i: i for i in range(20)}, transform, ignore_index, seed, what)


# name → (builder, default tree, training split, evaluation split)
DATASETS = {
    "vistas": (lambda root, split, **kw: vistas(root, split, version="v1.2", **kw), "vistas", "training", "validation"),
    "vistas_v2": (lambda root, split, **kw: vistas(root, split, version="v2.0", **kw), "vistas_v2", "training",
                  "validation"),
    "cityscapes": (cityscapes, "cityscapes", "train", "val"),
    "pascal_person_part": (pascal_person_part, "pascal_person_part", "train", "val"),
    "helen": (helen, "helen", "train", "test"),
    "lip": (lip, "lip", "train", "val"),
}


def build_dataset(name: str, root, train: bool, size: Size, tree=None, ignore_index: int = 255, seed: int = 0,
                  scale: Tuple[float, float] = (0.5, 2.0), crop: bool = True) -> SegmentationFolder:
    """The training (random scale/crop/flip to ``size``) or evaluation set of a real data set by name (a key
    of :data:`DATASETS`). The evaluation set is resized and centre-cropped to ``size``
    (:class:`ResizeCenterCrop`) with ``crop=True``, and the full images and label maps, untouched, with
    ``crop=False`` (``hss-train --eval-mode whole|slide``; the images then differ in size)."""
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {sorted(DATASETS)} or 'synthetic'")
    builder, _, train_split, eval_split = DATASETS[name]
    if train:
        transform = RandomScaleCropFlip(size, scale, True, ignore_index)
    else:
        transform = ResizeCenterCrop(size) if crop else None
    return builder(root, train_split if train else eval_split, tree=tree, transform=transform,
                   ignore_index=ignore_index, seed=seed)
