"""The training data: synthetic hierarchical images and the real data sets' folder layouts (fabricated)."""
import numpy as np
import pytest
import torch
from PIL import Image

from hss_kernels import Tree, trees
from hss_kernels.train import data as D


# --------------------------------------------------------------------------- synthetic
def test_synthetic_items_are_seeded_and_well_formed():
    ds = D.SyntheticHierarchy("cityscapes", length=5, size=(20, 27), seed=3)
    x, y = ds[2]
    assert x.shape == (3, 20, 27) and x.dtype == torch.float32 and torch.isfinite(x).all()
    assert y.shape == (20, 27) and y.dtype == torch.int64
    valid = y[y != 255]
    assert valid.numel() > 0 and int(valid.min()) >= 0 and int(valid.max()) < 19
    assert (y == 255).any(), "cell boundaries should be ignored"
    x2, y2 = D.SyntheticHierarchy("cityscapes", length=5, size=(20, 27), seed=3)[2]
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = D.SyntheticHierarchy("cityscapes", length=5, size=(20, 27), seed=4)[2]
    assert not torch.equal(x, x3)
    ds.set_epoch(1)
    assert not torch.equal(ds[2][0], x), "a new epoch must bring new images"
    with pytest.raises(IndexError):
        ds[5]


def test_synthetic_any_tree_and_colours_follow_the_hierarchy():
    # A hand-made tree: 3 super-classes with 2-4 leaves each, one of them deeper.
    tree = Tree.from_text("a\n\ta1\n\ta2\nb\n\tb1\n\t\tb11\n\t\tb12\n\tb2\nc\n\tc1\n\tc2\n\tc3\n")
    ds = D.SyntheticHierarchy(tree, length=3, size=9, seed=0)
    _, y = ds[0]
    assert int(y[y != 255].max()) < tree.num_leaves
    # Over many seeds: leaves under the same depth-1 class are closer in colour than leaves under
    # different ones (what makes the hierarchy carry signal).
    top = [tree.ancestors[c][0] for c in tree.leaf_channels]
    same, diff = [], []
    for seed in range(30):
        col = D.SyntheticHierarchy(tree, length=1, size=4, seed=seed).leaf_colour
        for i in range(tree.num_leaves):
            for j in range(i):
                (same if top[i] == top[j] else diff).append(np.linalg.norm(col[i] - col[j]))
    assert np.mean(same) < 0.6 * np.mean(diff)


def test_synthetic_rejects_bad_arguments():
    with pytest.raises(ValueError, match="ignore_index"):
        D.SyntheticHierarchy("cityscapes", ignore_index=3)
    with pytest.raises(ValueError, match="regions"):
        D.SyntheticHierarchy("cityscapes", regions=(0, 2))


# --------------------------------------------------------------------------- transforms
def test_random_scale_crop_flip_keeps_labels_and_pads_with_ignore():
    image = torch.randn(3, 10, 13)
    target = torch.randint(0, 5, (10, 13))
    t = D.RandomScaleCropFlip((16, 12), scale=(0.5, 1.5))
    for seed in range(5):
        x, y = t(image, target, torch.Generator().manual_seed(seed))
        assert x.shape == (3, 16, 12) and y.shape == (16, 12) and y.dtype == torch.int64
        assert set(y.unique().tolist()) <= set(target.unique().tolist()) | {255}
    # Scale 0.5 of a 10x13 image into a 16x12 crop must pad with ignore.
    _, y = D.RandomScaleCropFlip((16, 12), scale=(0.5, 0.5))(image, target, torch.Generator().manual_seed(0))
    assert (y == 255).any()
    x, y = D.ResizeCenterCrop(8)(image, target)
    assert x.shape == (3, 8, 8) and set(y.unique().tolist()) <= set(target.unique().tolist())


# --------------------------------------------------------------------------- real layouts
def _image(path, h=6, w=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(path)


def _label(path, ids, palette=False, h=6, w=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.array(ids, dtype=np.uint8).reshape(-1)
    arr = np.resize(arr, h * w).reshape(h, w)
    if palette:  # Vistas and Pascal store label maps as palette PNGs whose index is the class id
        im = Image.new("P", (w, h))
        im.putdata(arr.reshape(-1).tolist())
        im.putpalette([v for i in range(256) for v in ((i * 37) % 256, (i * 91) % 256, (i * 53) % 256)])
    else:
        im = Image.fromarray(arr)
    im.save(path)
    return arr


def _expect(arr, mapping=None):
    out = arr.astype(np.int64)
    for k, v in (mapping or {}).items():
        out[arr == k] = v
    return out


def test_vistas_v12(tmp_path):
    root = tmp_path / "vistas"
    for name, ids in (("a", [0, 13, 65, 27]), ("b", [55, 2])):
        _image(root / "training" / "images" / f"{name}.jpg")
        _label(root / "training" / "labels" / f"{name}.png", ids, palette=True)
    ds = D.vistas(root, "training")
    with Image.open(root / "training" / "labels" / "a.png") as im:
        assert im.mode == "P"
    assert len(ds) == 2 and ds.tree.num_leaves == 66
    expected = _label(tmp_path / "ref.png", [0, 13, 65, 27])
    assert np.array_equal(ds.read_target(0).numpy(), _expect(expected))
    x, y = ds[1]
    assert x.shape == (3, 6, 8) and set(y.unique().tolist()) == {55, 2}
    assert ds.tree.leaf_names[13] == "road" and ds.tree.leaf_names[55] == "car"


def test_vistas_v20_maps_unlabeled_to_ignore(tmp_path):
    root = tmp_path / "vistas"
    _image(root / "validation" / "images" / "a.jpg")
    arr = _label(root / "validation" / "v2.0" / "labels" / "a.png", [0, 122, 123, 21, 61], palette=True)
    ds = D.vistas(root, "validation", version="v2.0")
    assert ds.tree.num_leaves == 123
    assert np.array_equal(ds.read_target(0).numpy(), _expect(arr, {123: 255}))
    assert ds.tree.leaf_names[21] == "Road" and ds.tree.leaf_names[61] == "Sky"


def test_cityscapes_train_ids(tmp_path):
    root = tmp_path / "cs"
    for city, name, ids in (("aachen", "aachen_000000_000019", [0, 1, 255, 18]), ("bonn", "bonn_000001_000019", [13])):
        _image(root / "leftImg8bit" / "train" / city / f"{name}_leftImg8bit.png")
        _label(root / "gtFine" / "train" / city / f"{name}_gtFine_labelTrainIds.png", ids)
    ds = D.cityscapes(root, "train", transform=D.RandomScaleCropFlip(5, scale=(1.0, 1.0), flip=False))
    assert len(ds) == 2
    assert set(ds.read_target(0).unique().tolist()) == {0, 1, 18, 255}
    assert set(ds.read_target(1).unique().tolist()) == {13}
    x, y = ds[0]
    assert x.shape == (3, 5, 5) and set(y.unique().tolist()) <= {0, 1, 18, 255}


def test_pascal_person_part(tmp_path):
    root = tmp_path / "ppp"
    for name, ids in (("2008_000003", [0, 1, 2, 3]), ("2008_000008", [4, 5, 6, 255])):
        _image(root / "JPEGImages" / f"{name}.jpg")
        _label(root / "SegmentationPart" / f"{name}.png", ids, palette=True)
    (root / "train_id.txt").write_text("2008_000008\n")
    (root / "val_id.txt").write_text("2008_000003\n")
    tr, va = D.pascal_person_part(root, "train"), D.pascal_person_part(root, "val")
    assert len(tr) == 1 and len(va) == 1
    assert set(tr.read_target(0).unique().tolist()) == {4, 5, 6, 255}
    assert set(va.read_target(0).unique().tolist()) == {0, 1, 2, 3}
    assert tr.tree.leaf_names[1] == "head"
    with pytest.raises(FileNotFoundError, match="split"):
        D.pascal_person_part(root, "test")


def test_helen(tmp_path):
    root = tmp_path / "helen"
    for name, ids in (("1", [0, 1, 10]), ("2", [7, 8, 9])):
        _image(root / "images" / f"{name}.jpg")
        _label(root / "labels" / f"{name}.png", ids)
    ds = D.helen(root)  # no split file: every image
    assert len(ds) == 2 and set(ds.read_target(1).unique().tolist()) == {7, 8, 9}
    assert ds.tree.leaf_names[10] == "hair"
    (root / "test.txt").write_text("2\n")
    assert len(D.helen(root, "test")) == 1


def test_build_dataset_by_name(tmp_path):
    root = tmp_path / "helen"
    _image(root / "images" / "1.jpg", 12, 10)
    _label(root / "labels" / "1.png", [0, 1, 10], h=12, w=10)
    (root / "train.txt").write_text("1\n")
    x, y = D.build_dataset("helen", root, train=True, size=8)[0]
    assert x.shape == (3, 8, 8) and y.shape == (8, 8)
    with pytest.raises(ValueError, match="unknown data set"):
        D.build_dataset("imagenet", root, True, 8)


def test_missing_folders_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="Cityscapes: folder .*leftImg8bit"):
        D.cityscapes(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="Mapillary Vistas v2.0: folder .*v2.0"):
        (tmp_path / "v" / "training" / "images").mkdir(parents=True)
        D.vistas(tmp_path / "v", version="v2.0")
    with pytest.raises(FileNotFoundError, match="Pascal-Person-Part: folder"):
        D.pascal_person_part(tmp_path)
    root = tmp_path / "h"
    _image(root / "images" / "1.jpg")
    (root / "labels").mkdir()
    with pytest.raises(FileNotFoundError, match="no label map"):
        D.helen(root)


@pytest.mark.parametrize("case", ["vistas", "vistas_v2", "cityscapes", "pascal_person_part", "helen"])
def test_label_id_outside_the_tree_is_an_error(tmp_path, case):
    root = tmp_path / case
    if case.startswith("vistas"):
        version = "v1.2" if case == "vistas" else "v2.0"
        bad = 66 if case == "vistas" else 124
        _image(root / "training" / "images" / "a.jpg")
        sub = root / "training" / ("labels" if version == "v1.2" else "v2.0/labels")
        _label(sub / "a.png", [0, bad])
        ds = D.vistas(root, "training", version=version)
    elif case == "cityscapes":
        bad = 19
        _image(root / "leftImg8bit" / "val" / "x" / "x_0_0_leftImg8bit.png")
        _label(root / "gtFine" / "val" / "x" / "x_0_0_gtFine_labelTrainIds.png", [bad, 3])
        ds = D.cityscapes(root, "val")
    elif case == "pascal_person_part":
        bad = 7
        _image(root / "JPEGImages" / "a.jpg")
        _label(root / "SegmentationPart" / "a.png", [bad])
        (root / "train.txt").write_text("a\n")
        ds = D.pascal_person_part(root)
    else:
        bad = 11
        _image(root / "images" / "a.jpg")
        _label(root / "labels" / "a.png", [1, bad])
        ds = D.helen(root)
    with pytest.raises(ValueError, match=rf"\.png holds label id\(s\) \[{bad}\]") as err:
        ds[0]
    assert "known ids" in str(err.value)


def test_a_colour_label_image_is_refused(tmp_path):
    root = tmp_path / "helen"
    _image(root / "images" / "1.jpg")
    _image(root / "labels" / "1.png")  # RGB, as a *_color.png visualisation would be
    with pytest.raises(ValueError, match="RGB image, not a label map"):
        D.helen(root)[0]


def test_a_tree_that_does_not_fit_the_data_set_is_refused(tmp_path):
    root = tmp_path / "helen"
    _image(root / "images" / "1.jpg")
    _label(root / "labels" / "1.png", [0])
    with pytest.raises(ValueError, match="11 leaves"):
        D.helen(root, tree=trees.load("cityscapes"))


def test_cityscapes_as_downloaded_maps_label_ids_to_train_ids(tmp_path):
    """A Cityscapes folder with only the download's *_gtFine_labelIds.png (no createTrainIdLabelImgs): the
    ids 0..33 map to the 19 train ids (road 7 -> 0, sky 23 -> 10, bicycle 33 -> 18) and the rest to
    ignore; with *_gtFine_labelTrainIds.png present those are used as they are."""
    root = tmp_path / "cs"
    _image(root / "leftImg8bit" / "val" / "x" / "x_0_0_leftImg8bit.png")
    _label(root / "gtFine" / "val" / "x" / "x_0_0_gtFine_labelIds.png", [7, 23, 33, 0, 9, 15])
    ds = D.cityscapes(root, "val")
    assert "labelIds" in ds.name
    y = ds.read_target(0).reshape(-1)[:6].tolist()
    assert y == [0, 10, 18, 255, 255, 255]
    _label(root / "gtFine" / "val" / "x" / "x_0_0_gtFine_labelTrainIds.png", [0, 10, 18, 255, 5, 6])
    assert D.cityscapes(root, "val").read_target(0).reshape(-1)[:6].tolist() == [0, 10, 18, 255, 5, 6]


def test_hss_train_reports_data_errors_in_one_line(tmp_path, capsys):
    from hss_kernels.train.cli import main

    root = tmp_path / "cs"
    _image(root / "leftImg8bit" / "train" / "x" / "x_0_0_leftImg8bit.png")
    (root / "gtFine" / "train" / "x").mkdir(parents=True)
    assert main(["--data", "cityscapes", "--data-root", str(root), "--steps", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("hss-train: Cityscapes") and "have no label map" in err and len(err.splitlines()) == 1
    _label(root / "gtFine" / "train" / "x" / "x_0_0_gtFine_labelIds.png", [7, 40])  # 40: not a Cityscapes id
    _image(root / "leftImg8bit" / "val" / "x" / "x_0_0_leftImg8bit.png")
    _label(root / "gtFine" / "val" / "x" / "x_0_0_gtFine_labelIds.png", [7])
    assert main(["--data", "cityscapes", "--data-root", str(root), "--steps", "1", "--batch-size", "1",
                 "--size", "4", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("hss-train: Cityscapes (labelIds):") and "holds label id(s) [40]" in err[-1]


@pytest.mark.parametrize("version", ["v1.2", "v2.0"])
def test_vistas_reads_its_config_and_ignores_classes_not_evaluated(tmp_path, version):
    import json

    root = tmp_path / "vistas"
    n = 66 if version == "v1.2" else 124
    _image(root / "training" / "images" / "a.jpg")
    sub = root / "training" / ("labels" if version == "v1.2" else "v2.0/labels")
    _label(sub / "a.png", [0, 5, n - 1, 3], palette=True)
    plain = D.vistas(root, "training", version=version).read_target(0).reshape(-1)[:4].tolist()
    assert plain == [0, 5, (65 if version == "v1.2" else 255), 3]  # without a config: the ids as they are
    labels = [{"name": f"c{i}", "evaluate": i not in (5, n - 1)} for i in range(n)]
    name = "config.json" if version == "v1.2" else "config_v2.0.json"
    (root / name).write_text(json.dumps({"labels": labels}))
    got = D.vistas(root, "training", version=version).read_target(0).reshape(-1)[:4].tolist()
    assert got == [0, 255, 255, 3]
    (root / name).write_text(json.dumps({"labels": labels[:3]}))
    with pytest.raises(D.DataError, match=f"lists 3 labels, this version has {66 if version == 'v1.2' else 124}"):
        D.vistas(root, "training", version=version)


def test_lip_as_downloaded(tmp_path):
    root = tmp_path / "LIP"
    for split, stem in (("train", "77_471474"), ("val", "100034_483681")):
        _image(root / "TrainVal_images" / f"{split}_images" / f"{stem}.jpg")
        _label(root / "TrainVal_parsing_annotations" / f"{split}_segmentations" / f"{stem}.png", [0, 5, 19, 255])
    ds = D.build_dataset("lip", root, train=False, size=(6, 8))
    assert ds.tree.num_leaves == 20 and ds.read_target(0).reshape(-1)[:4].tolist() == [0, 5, 19, 255]
    assert "lip" in D.DATASETS and len(D.build_dataset("lip", root, train=True, size=4)) == 1
    _label(root / "TrainVal_parsing_annotations" / "val_segmentations" / "100034_483681.png", [20])
    with pytest.raises(D.DataError, match="holds label id\\(s\\) \\[20\\]"):
        D.lip(root, "val").read_target(0)


def test_hss_train_on_vistas_v12_evaluates_the_65_benchmark_classes(tmp_path, capsys):
    """A fabricated Vistas v1.2 folder with its config.json ('unlabeled', 65, not evaluated): hss-train
    trains on it and its metrics count 65 leaf classes, not the tree's 66; without the config, 66."""
    import json

    from hss_kernels.train.cli import main

    root = tmp_path / "vistas"
    for split in ("training", "validation"):
        for i in range(2):
            _image(root / split / "images" / f"{i}.jpg", 16, 16)
            _label(root / split / "labels" / f"{i}.png", [3, 65, 20, 41, 65, 7], palette=True, h=16, w=16)

    def leaf_classes(out):
        assert main(["--data", "vistas", "--data-root", str(root), "--steps", "2", "--batch-size", "2", "--size", "16",
                     "--device", "cpu", "--quiet", "--out", str(out)]) == 0
        table = capsys.readouterr().out.strip().splitlines()
        (leaf_row,) = [r for r in table if r.split()[:1] == ["3"]]
        return int(leaf_row.split()[1])

    assert leaf_classes(tmp_path / "a") == 66
    labels = [{"name": f"c{i}", "evaluate": i != 65} for i in range(66)]
    (root / "config.json").write_text(json.dumps({"labels": labels}))
    assert leaf_classes(tmp_path / "b") == 65


def test_hss_train_on_cityscapes_as_downloaded_evaluates_19_classes(tmp_path, capsys):
    """A fabricated Cityscapes folder with only *_gtFine_labelIds.png trains and evaluates the 19 train ids."""
    from hss_kernels.train.cli import main

    root = tmp_path / "cs"
    for split in ("train", "val"):
        _image(root / "leftImg8bit" / split / "x" / "x_0_0_leftImg8bit.png", 16, 16)
        _label(root / "gtFine" / split / "x" / "x_0_0_gtFine_labelIds.png", [7, 23, 33, 0, 26, 11], h=16, w=16)
    assert main(["--data", "cityscapes", "--data-root", str(root), "--steps", "2", "--batch-size", "1",
                 "--size", "16", "--device", "cpu", "--quiet", "--out", str(tmp_path / "run")]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    tree = trees.load("cityscapes")
    rows = {r.split()[0]: r.split() for r in table if r.split()[:1] and r.split()[0].isdigit()}
    assert [int(rows[str(d)][1]) for d in range(1, tree.depth + 1)] == \
        [tree.num_classes(d) for d in range(1, tree.depth + 1)]
    assert int(rows[str(tree.depth)][1]) == 19
