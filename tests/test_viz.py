"""Palette, colorize and the PNG grid writer."""
import colorsys

import numpy as np
import pytest
import torch
from PIL import Image

from hss_kernels import labels_at_depth, trees
from hss_kernels.viz import _HEADER, colorize, palette, save_prediction_grid


def hls(rgb):
    return colorsys.rgb_to_hls(*(np.asarray(rgb, dtype=np.float64) / 255))


def hue_dist(a, b):
    d = abs(a - b) % 1.0
    return min(d, 1.0 - d)


@pytest.mark.parametrize("name", trees.names())
def test_palette_families(name):
    tree = trees.load(name)
    pal = palette(tree)
    assert pal.shape == (tree.num_nodes, 3) and pal.dtype == np.uint8
    colours = {tuple(c) for c in pal}
    assert len(colours) == tree.num_nodes  # one colour per node
    assert (0, 0, 0) not in colours and (255, 255, 255) not in colours
    tops = tree.roots
    n1 = len(tops)
    hues = [hls(pal[c])[0] for c in tops]
    # depth-1 nodes: evenly spread hues
    for i in range(n1):
        for j in range(i + 1, n1):
            assert hue_dist(hues[i], hues[j]) >= 0.9 / n1
    # every node's hue stays within half a depth-1 sector of its depth-1 ancestor's: a shade of it
    for c in range(tree.num_nodes):
        top = tree.ancestors[c][0]
        assert hue_dist(hls(pal[c])[0], hls(pal[top])[0]) < 0.5 / n1, tree.names[c]
        p = tree.parents[c]
        if p >= 0:
            # and a child sits closer in hue to its parent than to any of the parent's siblings
            sibs = [s for s in (tree.children[tree.parents[p]] if tree.parents[p] >= 0 else tops) if s != p]
            own = hue_dist(hls(pal[c])[0], hls(pal[p])[0])
            assert all(own < hue_dist(hls(pal[c])[0], hls(pal[s])[0]) for s in sibs), tree.names[c]


def test_colorize_uses_palette_at_each_depth():
    tree = trees.load("helen")
    labels = torch.randint(0, tree.num_leaves, (3, 5, 7))
    labels[0, 0, :3] = 255
    pal = palette(tree)
    for d in range(1, tree.depth + 1):
        img = colorize(labels, tree, d)
        assert img.shape == (3, 5, 7, 3) and img.dtype == np.uint8
        assert (img[0, 0, :3] == 0).all()
        cls = labels_at_depth(labels, tree, d)
        names = tree.class_names(d)
        for idx in [(1, 2, 3), (2, 4, 6), (0, 1, 1)]:
            node = tree.names.index(names[int(cls[idx])])
            assert tuple(img[idx]) == tuple(pal[node])
    assert np.array_equal(colorize(labels, tree), colorize(labels.numpy(), tree, tree.depth))
    with pytest.raises(ValueError, match="label 11"):
        colorize(torch.tensor([11]), tree, 1)
    with pytest.raises(ValueError, match="depth"):
        colorize(labels, tree, 5)
    with pytest.raises(TypeError):
        colorize(labels.float(), tree, 1)


@pytest.mark.parametrize("with_images,scale,header", [(True, 2, True), (False, 1, False)])
def test_grid_size_and_pixels(tmp_path, with_images, scale, header):
    tree = trees.load("cityscapes")  # depth 2: columns [image] pred1 true1 pred2 true2
    N, H, W, gap = 3, 6, 9, 2
    target = torch.randint(0, tree.num_leaves, (N, H, W))
    target[1, 2:4] = 255
    pred = torch.randint(0, tree.num_leaves, (N, H, W))
    images = torch.rand(N, 3, H, W) if with_images else None
    out = tmp_path / "grid.png"
    save_prediction_grid(out, tree, pred, target, images=images, scale=scale, gap=gap, header=header)
    pic = np.asarray(Image.open(out).convert("RGB"))
    ncols = 2 * tree.depth + (1 if with_images else 0)
    top = _HEADER if header else 0
    assert pic.shape == (top + N * H * scale + (N - 1) * gap, ncols * W * scale + (ncols - 1) * gap, 3)
    pal = palette(tree)
    allowed = {tuple(c) for c in pal} | {(0, 0, 0)}
    first = 1 if with_images else 0
    for i in range(N):
        y = top + i * (H * scale + gap)
        for j in range(2 * tree.depth):
            col = first + j
            x = col * (W * scale + gap)
            cell = pic[y:y + H * scale, x:x + W * scale]
            assert {tuple(c) for c in cell.reshape(-1, 3)} <= allowed
            d = j // 2 + 1
            labels = (pred if j % 2 == 0 else target)[i]
            want = colorize(labels, tree, d).repeat(scale, 0).repeat(scale, 1)
            assert np.array_equal(cell, want)
        if with_images:
            cell = pic[y:y + H * scale, :W * scale]
            want = np.round(images[i].permute(1, 2, 0).numpy() * 255).astype(np.uint8)
            assert np.array_equal(cell[::scale, ::scale], want)
    # the gaps are white
    assert (pic[top + H * scale:top + H * scale + gap] == 255).all()


def test_grid_bad_input(tmp_path):
    tree = trees.load("cityscapes")
    y = torch.zeros(2, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="both be"):
        save_prediction_grid(tmp_path / "a.png", tree, y, y[0])
    with pytest.raises(ValueError, match="images"):
        save_prediction_grid(tmp_path / "a.png", tree, y, y, images=torch.rand(3, 3, 4, 4))
    with pytest.raises(ValueError, match="image 0"):
        save_prediction_grid(tmp_path / "a.png", tree, y, y, images=torch.rand(2, 3, 5, 4))
    with pytest.raises(ValueError, match="label 40"):
        save_prediction_grid(tmp_path / "a.png", tree, y + 40, y)
    assert not (tmp_path / "a.png").exists()
