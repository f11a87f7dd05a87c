"""hss-train's evaluation modes (--eval-mode crop|whole|slide): sliding windows against whole-image inference
and against an independent numpy loop, padding, the CLI's checks, and tiny end-to-end runs."""
import json

import numpy as np
import pytest
import torch
from torch import nn

from hss_kernels import train as T
from hss_kernels.metrics import HierarchicalMetrics
from hss_kernels.train.cli import eval_settings
from hss_kernels.train.inference import default_stride, slide_logits, whole_logits, window_starts
from hss_kernels.train.loop import build_tree, evaluate_batch, make_loss, predict
from hss_kernels.train.models import build_model

TINY = ["--batch-size", "4", "--train-size", "8", "--val-size", "3", "--width", "8", "--levels", "2",
        "--device", "cpu", "--quiet", "--num-predictions", "2"]



def parse(*argv):
    return T.build_parser().parse_args(list(map(str, argv)))


def rand_size(lo, hi):
    return int(torch.randint(lo, hi + 1, ()).item())


# --------------------------------------------------------------------------- stub models
class PixelModel(nn.Module):
    """A 1x1 convolution: every output pixel depends on its input pixel only, not on where the window is."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(3, channels, 1)

    def forward(self, x):
        return self.conv(x), None


class PositionModel(nn.Module):
    """Logits that depend on the pixel's place in the window (a ramp per channel), on its value and on the
    window's mean (so on the padding): the average over overlapping windows differs from any single
    window's."""

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.calls = []

    def forward(self, x):
        self.calls.append(tuple(x.shape))
        N, _, h, w = x.shape
        c = torch.arange(self.channels, dtype=x.dtype).view(1, -1, 1, 1)
        yy = torch.arange(h, dtype=x.dtype).view(1, 1, -1, 1)
        xx = torch.arange(w, dtype=x.dtype).view(1, 1, 1, -1)
        mean = x[:, 1:2].mean((-2, -1), keepdim=True)  # the whole window's content (padding included)
        return x[:, :1] * (c + 1) + (c + 1) * 0.1 * yy - 0.05 * c * xx + 0.01 * yy * xx + 0.3 * mean, None


def stub_numpy(x: np.ndarray, channels: int) -> np.ndarray:
    """PositionModel's output, written again in numpy, for one (3, h, w) window."""
    h, w = x.shape[-2:]
    out = np.zeros((channels, h, w))
    mean = x[1].sum() / (h * w)
    for c in range(channels):
        for i in range(h):
            for j in range(w):
                out[c, i, j] = x[0, i, j] * (c + 1) + (c + 1) * 0.1 * i - 0.05 * c * j + 0.01 * i * j + 0.3 * mean
    return out


def expected_slide(image: np.ndarray, channels: int, window, stride) -> np.ndarray:
    """The sliding-window mean, written independently: pad to the window, windows at 0, s, 2s, ... while
    they fit, plus one flush with the far border; sum and count per pixel; crop back."""
    _, H, W = image.shape
    wh, ww = window
    Hp, Wp = max(H, wh), max(W, ww)
    padded = np.zeros((3, Hp, Wp))
    padded[:, :H, :W] = image

    def starts(n, k, s):
        if n <= k:
            return [0]
        return list(range(0, n - k, s)) + [n - k]

    total = np.zeros((channels, Hp, Wp))
    count = np.zeros((Hp, Wp))
    for y in starts(Hp, wh, stride[0]):
        for x in starts(Wp, ww, stride[1]):
            total[:, y:y + wh, x:x + ww] += stub_numpy(padded[:, y:y + wh, x:x + ww], channels)
            count[y:y + wh, x:x + ww] += 1
    assert count.min() >= 1
    return (total / count)[:, :H, :W]


# --------------------------------------------------------------------------- window placement
def test_window_starts_cover_the_axis_with_the_last_window_flush():
    for _ in range(200):
        window = rand_size(1, 12)
        stride = rand_size(1, window)
        length = rand_size(1, 40)
        s = window_starts(length, window, stride)
        assert s[0] == 0 and s == sorted(set(s))
        if length <= window:
            assert s == [0]
            continue
        assert s[-1] == length - window  # flush with the border
        assert all(b - a <= stride for a, b in zip(s, s[1:]))  # no gap between windows
        assert all(b - a == stride for a, b in zip(s[:-1], s[1:-1]))  # regular steps before the last
        covered = np.zeros(length, dtype=int)
        for a in s:
            covered[a:a + window] += 1
        assert covered.min() >= 1
    with pytest.raises(ValueError, match="must be >= 1"):
        window_starts(10, 0, 1)


def test_default_stride_is_two_thirds_of_the_window():
    for window in [(769, 769), (512, 1024), (480, 480), (1, 2), (48, 33)]:
        stride = default_stride(window)
        for w, s in zip(window, stride):
            assert 1 <= s <= w and abs(s - 2 * w / 3) <= 0.5


# --------------------------------------------------------------------------- slide against whole
@pytest.mark.parametrize("out_stride", [1, 2])
def test_slide_with_one_window_equals_whole(out_stride):
    tree = build_tree(parse("--loss", "hier-softmax"))
    H, W = rand_size(9, 21), rand_size(9, 21)
    images = torch.randn(2, 3, H, W)
    for loss in ("hier-softmax", "tree-min"):
        model = build_model("unet", tree, loss, width=8, levels=2, out_stride=out_stride).eval()
        with torch.no_grad():
            raw, padded = whole_logits(model, images)
            assert padded == (H, W)
            whole = nn.functional.interpolate(raw, size=(H, W), mode="bilinear", align_corners=False)
            slide = slide_logits(model, images, (H, W), (rand_size(1, H), rand_size(1, W)))
        torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
        # Through evaluate_batch: the same predictions and loss in both modes.
        targets = torch.randint(0, tree.num_leaves, (2, H, W))
        targets[:, 0] = 255
        fn = make_loss(parse("--loss", loss, "--backend", "reference"), tree)
        with torch.no_grad():
            pw, lw = evaluate_batch(model, images, targets, tree, loss, fn, "reference", "whole")
            ps, ls = evaluate_batch(model, images, targets, tree, loss, fn, "reference", "slide", (H, W), (H, W))
        assert pw.shape == (2, H, W) and torch.equal(pw, ps)
        assert float(lw) == pytest.approx(float(ls), rel=1e-4)


def test_slide_on_a_position_independent_model_equals_whole():
    """Overlapping windows, image sizes not divisible by the stride: the mean over windows of a 1x1 conv
    is the 1x1 conv of the whole image."""
    for _ in range(4):
        C = rand_size(1, 6)
        model = PixelModel(C).eval()
        H, W = rand_size(13, 31), rand_size(13, 31)
        window = (rand_size(3, 12), rand_size(3, 12))
        stride = (rand_size(1, window[0]), rand_size(1, window[1]))
        images = torch.randn(rand_size(1, 3), 3, H, W)
        with torch.no_grad():
            whole, _ = whole_logits(model, images)
            for per_batch in (1, 3):
                slide = slide_logits(model, images, window, stride, windows_per_batch=per_batch)
                assert slide.shape == whole.shape and slide.dtype == torch.float32
                torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)


def test_slide_normalises_by_the_window_count():
    """Logits that depend on the position in the window: the result is the per-pixel mean over the windows,
    checked against a numpy loop; odd sizes, several windows per forward, a batch of two images."""
    C = 3
    for H, W, window, stride in [(11, 13, (5, 4), (3, 3)), (9, 17, (4, 6), (4, 5)), (7, 7, (3, 3), (1, 2)),
                                 (rand_size(6, 15), rand_size(6, 15), (4, 5), (2, 3))]:
        images = torch.randn(2, 3, H, W, dtype=torch.float64)
        model = PositionModel(C)
        with torch.no_grad():
            got = slide_logits(model, images.float(), window, stride, windows_per_batch=2)
        assert all(shape[-2:] == window for shape in model.calls)
        for n in range(2):
            want = expected_slide(images[n].numpy(), C, window, stride)
            np.testing.assert_allclose(got[n].numpy(), want, rtol=1e-5, atol=1e-4)
        # The average really differs from a single window's output here (the test can tell them apart).
        if H > window[0] and W > window[1]:
            one = stub_numpy(images[0].numpy()[:, :window[0], :window[1]], C)
            assert not np.allclose(got[0].numpy()[:, :window[0], :window[1]], one, atol=1e-3)


def test_image_smaller_than_the_window_is_padded():
    C = 2
    for H, W, window in [(5, 7, (8, 9)), (5, 12, (8, 4)), (1, 1, (3, 3))]:
        images = torch.randn(1, 3, H, W, dtype=torch.float64)
        model = PositionModel(C)
        with torch.no_grad():
            got = slide_logits(model, images.float(), window, (2, 2))
        assert got.shape == (1, C, H, W)
        assert all(shape[-2:] == window for shape in model.calls)  # the model always sees the window size
        np.testing.assert_allclose(got[0].numpy(), expected_slide(images[0].numpy(), C, window, (2, 2)),
                                   rtol=1e-5, atol=1e-4)
    # A 1x1 conv does not see the padding: still the whole image's logits.
    model = PixelModel(4).eval()
    images = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(model, images, (8, 8), (5, 5)), whole_logits(model, images)[0])


def test_whole_pads_to_the_size_divisor_and_crops_back():
    tree = build_tree(parse())

    class Divisible(PixelModel):
        size_divisor = 8

        def forward(self, x):
            assert x.shape[-2] % 8 == 0 and x.shape[-1] % 8 == 0, x.shape
            return super().forward(x)

    model = Divisible(tree.num_leaves).eval()
    H, W = 13, 18
    images = torch.randn(2, 3, H, W)
    targets = torch.randint(0, tree.num_leaves, (2, H, W))
    with torch.no_grad():
        logits, padded = whole_logits(model, images, 8)
        assert padded == (16, 24) and logits.shape[-2:] == (16, 24)
        torch.testing.assert_close(logits[..., :H, :W], PixelModel.forward(model, images)[0])
        pred, loss = evaluate_batch(model, images, targets, tree, "hier-softmax",
                                    make_loss(parse("--backend", "reference"), tree), "reference", "whole",
                                    size_divisor=8)
    assert pred.shape == (2, H, W)
    assert torch.equal(pred, PixelModel.forward(model, images)[0].argmax(1))
    with pytest.raises(ValueError, match="size_divisor"):
        whole_logits(model, images, 0)
    with pytest.raises(ValueError, match="differ in size"):
        evaluate_batch(model, images, targets[..., :-1], tree, "hier-softmax")
    with pytest.raises(ValueError, match="stride <= window"):
        slide_logits(model, images, (4, 4), (5, 4))


def test_eval_scale_resizes_the_image_and_predicts_at_the_label_size():
    """--eval-scale: the model sees the image resized by the factor; predictions come back at the labels'
    size. A 1x1 conv commutes with bilinear resizing (its weights sum to 1), so the prediction is the argmax
    of the conv of the image resized down and back up; whole and slide with one window agree."""
    tree = build_tree(parse())
    C = tree.num_leaves
    for scale in (0.5, 0.37, 1.0):
        model = PixelModel(C).eval()
        H, W = rand_size(7, 30), rand_size(7, 30)
        h, w = max(1, round(H * scale)), max(1, round(W * scale))
        images = torch.randn(2, 3, H, W)
        targets = torch.randint(0, C, (2, H, W))
        fn = make_loss(parse("--backend", "reference"), tree)
        with torch.no_grad():
            pw, lw = evaluate_batch(model, images, targets, tree, "hier-softmax", fn, "reference", "whole",
                                    scale=scale)
            ps, ls = evaluate_batch(model, images, targets, tree, "hier-softmax", fn, "reference", "slide",
                                    (h, w), (h, w), scale=scale)
            down = nn.functional.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
            up = nn.functional.interpolate(down, size=(H, W), mode="bilinear", align_corners=False)
            want = model.conv(up)
        assert pw.shape == (2, H, W) and torch.equal(pw, ps)
        assert float(lw) == pytest.approx(float(ls), rel=1e-5)
        top2 = want.topk(2, dim=1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-4  # leave out near-ties that rounding may flip
        assert torch.equal(pw[clear], want.argmax(1)[clear])
        if scale != 1.0:  # the model really saw the smaller image
            calls = []
            model.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape[-2:])))
            with torch.no_grad():
                evaluate_batch(model, images, targets, tree, "hier-softmax", None, "reference", "whole", scale=scale)
            assert calls == [(h, w)]
    with pytest.raises(ValueError, match="scale must be in"):
        evaluate_batch(model, images, targets, tree, "hier-softmax", scale=0.0)


@pytest.mark.parametrize("loss", ["ce", "hier-softmax", "tree-min", "tree-bce"])
def test_one_pixel_and_all_ignored_images(loss):
    """A 1x1 image (padded to the window by slide) and an image whose pixels are all ignored: predictions at
    the label size, a finite loss (0 when nothing is labelled), nothing counted by the metrics."""
    from hss_kernels.train.models import out_channels

    tree = build_tree(parse())
    model = PixelModel(out_channels(tree, loss)).eval()  # the U-Net's GroupNorm refuses a 1x1 input
    fn = make_loss(parse("--loss", loss, "--backend", "reference"), tree)
    for H, W in [(1, 1), (rand_size(2, 9), rand_size(2, 9))]:
        images = torch.randn(1, 3, H, W)
        targets = torch.full((1, H, W), 255)
        for mode, window in [("whole", None), ("slide", (4, 5))]:
            with torch.no_grad():
                pred, value = evaluate_batch(model, images, targets, tree, loss, fn, "reference", mode, window,
                                             window)
            assert pred.shape == (1, H, W) and 0 <= int(pred.min()) and int(pred.max()) < tree.num_leaves
            assert float(value) == 0.0
            metrics = HierarchicalMetrics(tree)
            metrics.update(pred, targets)
            assert int(metrics.confusion(1).sum()) == 0
            labelled = torch.randint(0, tree.num_leaves, (1, H, W))
            with torch.no_grad():
                _, value = evaluate_batch(model, images, labelled, tree, loss, fn, "reference", mode, window,
                                          window)
            assert float(value) == float(value) and float(value) > 0


# --------------------------------------------------------------------------- the command line
def test_eval_flags_parse_with_their_defaults():
    a = parse("--size", 48)
    assert eval_settings(a) == {"mode": "whole", "window": None, "stride": None, "scale": 1.0}  # synthetic: whole
    real = parse("--data", "cityscapes", "--data-root", "/nowhere", "--size", 512, 1024)
    assert eval_settings(real) == {"mode": "slide", "window": (512, 1024), "stride": default_stride((512, 1024)),
                                   "scale": 1.0}
    assert eval_settings(parse("--eval-mode", "whole", "--eval-scale", 0.5))["scale"] == 0.5
    s = parse("--eval-mode", "slide", "--size", 48, "--eval-window", 30, 40, "--eval-stride", 20)
    assert eval_settings(s) == {"mode": "slide", "window": (30, 40), "stride": (20, 20), "scale": 1.0}
    assert eval_settings(parse("--eval-mode", "slide", "--eval-window", 9))["stride"] == default_stride((9, 9))
    assert eval_settings(parse("--eval-mode", "crop"))["mode"] == "crop"
    assert "slide" in T.build_parser().format_help() and "--eval-stride" in T.build_parser().format_help()


@pytest.mark.parametrize("argv, message", [
    (["--eval-mode", "slide", "--eval-window", "0"], "--eval-window takes one or two positive integers"),
    (["--eval-mode", "slide", "--eval-window", "8", "8", "8"], "--eval-window takes one or two"),
    (["--eval-mode", "slide", "--eval-stride", "-1"], "--eval-stride takes one or two positive integers"),
    (["--eval-mode", "slide", "--eval-window", "8", "--eval-stride", "9"], "--eval-stride 9 9 is larger than"),
    (["--eval-mode", "slide", "--size", "30", "--eval-stride", "10", "31"], "larger than the window 30 30"),
    (["--eval-mode", "whole", "--eval-window", "8"], "are for --eval-mode slide, not whole"),
    (["--eval-stride", "8"], "are for --eval-mode slide, not whole"),  # auto on synthetic data: whole
    (["--eval-mode", "whole", "--eval-scale", "0"], "--eval-scale must be in (0, 1], got 0"),
    (["--eval-mode", "slide", "--eval-scale", "1.5"], "--eval-scale must be in (0, 1], got 1.5"),
    (["--eval-scale", "nan"], "--eval-scale must be in (0, 1], got nan"),
    (["--eval-mode", "crop", "--eval-scale", "0.5"], "--eval-scale is for --eval-mode whole|slide"),
    (["--val-image-size", "0"], "--val-image-size takes one or two positive integers"),
    (["--data", "helen", "--data-root", "x", "--val-image-size", "40"], "--val-image-size is for --data synthetic"),
])
def test_bad_eval_flags_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(argv + ["--steps", "1"] + TINY)
    assert str(exc.value).startswith("hss-train: ") and message in str(exc.value)


def test_unknown_eval_mode_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as exc:
        T.main(["--eval-mode", "tiles"])
    assert exc.value.code == 2 and "--eval-mode" in capsys.readouterr().err


# --------------------------------------------------------------------------- end to end
def train_run(tmp_path, name, *argv):
    out = tmp_path / name
    res = T.train(parse(*argv, "--out", out, *TINY))
    records = json.loads((out / "log.json").read_text())
    return res, [r for r in records if r["kind"] == "eval"], out


def test_every_mode_agrees_on_images_of_the_crop_size(tmp_path):
    """Synthetic images of the crop size: crop, whole and slide with the default window (one window) see
    the same pixels, so the same metrics."""
    got = {}
    for mode in ("crop", "whole", "slide"):
        res, evals, out = train_run(tmp_path, mode, "--size", 20, "--eval-mode", mode, "--steps", 2,
                                    "--eval-every", 2, "--seed", 7, "--loss", "tree-min")
        assert [r["eval_mode"] for r in evals] == [mode] and (out / "predictions.png").is_file()
        got[mode] = evals[-1]
    assert got["slide"]["eval_window"] == [20, 20] and got["slide"]["eval_stride"] == list(default_stride((20, 20)))
    for mode in ("whole", "slide"):
        assert got[mode]["val_loss"] == pytest.approx(got["crop"]["val_loss"], rel=1e-5)
        for d in ("1", "2"):
            assert got[mode]["metrics"][d]["miou"] == pytest.approx(got["crop"]["metrics"][d]["miou"], abs=1e-9)


@pytest.mark.parametrize("mode", ["crop", "whole", "slide", "whole-half"])
def test_each_mode_runs_on_larger_validation_images(tmp_path, mode):
    """Validation images larger than the crop (odd sizes): every mode writes its eval records; whole and
    slide score every labelled pixel of the full images, crop the centre crops only."""
    argv = ["--size", 16, "--val-image-size", 23, 29, "--eval-mode", mode, "--steps", 2, "--eval-every", 1,
            "--seed", 3, "--loss", "hier-softmax"]
    if mode == "slide":
        argv += ["--eval-window", 16, 12, "--eval-stride", 7, 9, "--amp", "bf16"]
    if mode == "whole-half":
        argv[argv.index("whole-half")] = "whole"
        argv += ["--eval-scale", 0.5]
    res, evals, out = train_run(tmp_path, mode, *argv)
    assert [r["step"] for r in evals] == [1, 2] and all(r["eval_mode"] == mode.split("-")[0] for r in evals)
    assert all(r.get("eval_scale", 1.0) == (0.5 if mode == "whole-half" else 1.0) for r in evals)
    assert all(r["val_loss"] == r["val_loss"] for r in evals)
    if mode == "slide":
        assert evals[-1]["eval_window"] == [16, 12] and evals[-1]["eval_stride"] == [7, 9]
    # Recount the labelled pixels the metrics saw from the checkpoint's own evaluation.
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["config"]["eval_mode"] == mode.split("-")[0]
    tree = build_tree(parse())
    from hss_kernels.train.data import ResizeCenterCrop, SyntheticHierarchy

    val = SyntheticHierarchy(tree, length=3, size=(23, 29), seed=3, offset=2 ** 40)
    labelled = sum(int((val[i][1] != 255).sum()) for i in range(3))
    model = build_model("unet", tree, "hier-softmax", width=8, levels=2)
    model.load_state_dict(ckpt["model"])
    model.eval()
    metrics = HierarchicalMetrics(tree)
    with torch.no_grad():
        for i in range(3):
            x, y = val[i]
            if mode == "whole":
                metrics.update(predict(model(x[None])[0], tree, "hier-softmax"), y[None])
            elif mode == "whole-half":
                half = (round(23 * 0.5), round(29 * 0.5))
                small = nn.functional.interpolate(x[None], size=half, mode="bilinear", align_corners=False)
                metrics.update(predict(model(small)[0], tree, "hier-softmax", size=(23, 29)), y[None])
            elif mode == "slide":
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    logits = slide_logits(model, x[None], (16, 12), (7, 9))
                metrics.update(logits.argmax(1), y[None])
            else:  # crop: the 16x16 centre crop of the image resized to cover it
                x, y = ResizeCenterCrop(16)(x, y)
                metrics.update(predict(model(x[None])[0], tree, "hier-softmax"), y[None])
    seen = int(metrics.confusion(1).sum())
    assert seen == labelled if mode != "crop" else seen < labelled
    for d in ("1", "2"):
        assert evals[-1]["metrics"][d]["pixel_accuracy"] == pytest.approx(
            metrics.compute()[int(d)]["pixel_accuracy"], abs=1e-9)


@pytest.mark.parametrize("mode", ["whole", "slide"])
def test_real_layout_is_evaluated_on_full_images(tmp_path, mode):
    """A fabricated Helen folder with images of different sizes: whole/slide evaluate each full image (batch
    of one), metrics over all its labelled pixels."""
    from PIL import Image

    root = tmp_path / "helen"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    sizes = [(20, 18), (17, 25), (22, 21)]
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(np.random.randint(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        Image.fromarray(np.random.randint(0, 11, (h, w), dtype=np.uint8)).save(root / "labels" / f"{i}.png")
    (root / "train.txt").write_text("0\n1\n2\n")
    (root / "test.txt").write_text("1\n2\n")
    res = T.train(parse("--data", "helen", "--data-root", root, "--loss", "tree-bce", "--steps", 2,
                        "--batch-size", 2, "--size", 16, "--out", tmp_path / "out", "--width", 8, "--levels", 2,
                        "--quiet", "--eval-mode", mode))
    ev = res["log"][-1]
    assert ev["eval_mode"] == mode and (tmp_path / "out" / "predictions.png").is_file()
    if mode == "slide":  # auto would be slide too for a real data set: window = crop, stride 2/3 of it
        assert ev["eval_window"] == [16, 16] and ev["eval_stride"] == [11, 11]
    # Every pixel of both full test images was scored (Helen's labels have no ignore value here).
    total = sum(h * w for h, w in sizes[1:])
    depth1 = ev["metrics"]["1"]
    assert depth1["pixel_accuracy"] == depth1["pixel_accuracy"]
    tree = build_tree(parse("--data", "helen", "--data-root", root))
    metrics = HierarchicalMetrics(tree)
    ckpt = torch.load(tmp_path / "out" / "checkpoint.pt", weights_only=True)
    model = build_model("unet", tree, "tree-bce", width=8, levels=2)
    model.load_state_dict(ckpt["model"])
    model.eval()
    from hss_kernels.train.data import build_dataset

    val = build_dataset("helen", root, False, 16, tree, crop=False)
    with torch.no_grad():
        for i in range(len(val)):
            x, y = val[i]
            logits = model(x[None])[0] if mode == "whole" else slide_logits(model, x[None], (16, 16), (11, 11))
            metrics.update(predict(logits, tree, "tree-bce"), y[None])
    assert int(metrics.confusion(1).sum()) == total
    assert depth1["pixel_accuracy"] == pytest.approx(metrics.compute()[1]["pixel_accuracy"], abs=1e-9)


def test_torchrun_slide_equals_one_process(tmp_path):
    """Two processes, each sliding over its shard of 5 validation images (uneven): the summed metrics equal
    one process's slide evaluation of the checkpoint over all 5."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from hss_kernels.train.data import SyntheticHierarchy

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(root))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hss_kernels.train", "--loss", "tree-min", "--steps", "2", "--eval-every", "2", "--seed", "4",
           "--size", "16", "--val-image-size", "21", "27", "--val-size", "5", "--eval-mode", "slide",
           "--eval-stride", "9", "--train-size", "8", "--batch-size", "4", "--width", "8", "--levels", "2",
           "--device", "cpu", "--quiet", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    lines = re.findall(r"\[rank (\d)/2\] final metrics: (\{.*\})", text)
    assert sorted(r for r, _ in lines) == ["0", "1"], text[-3000:]
    log = json.loads((tmp_path / "ddp" / "log.json").read_text())
    assert log[-1]["eval_mode"] == "slide" and log[-1]["eval_stride"] == [9, 9]
    ckpt = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=True)
    tree = build_tree(parse())
    model = build_model("unet", tree, "tree-min", width=8, levels=2)
    model.load_state_dict(ckpt["model"])
    model.eval()
    val = SyntheticHierarchy(tree, length=5, size=(21, 27), seed=4, offset=2 ** 40)
    metrics = HierarchicalMetrics(tree)
    with torch.no_grad():
        for i in range(5):
            x, y = val[i]
            metrics.update(predict(slide_logits(model, x[None], (16, 16), (9, 9)), tree, "tree-min"), y[None])
    for d, v in json.loads(lines[0][1]).items():
        assert v == pytest.approx(metrics.compute()[int(d)]["miou"], abs=1e-9)
