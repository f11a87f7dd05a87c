"""hss-train: a few steps of every loss on tiny synthetic data, checkpoints, resume, torchrun, the demo."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hss_kernels import train as T
from hss_kernels.metrics import HierarchicalMetrics
from hss_kernels.train.data import SyntheticHierarchy
from hss_kernels.train.loop import build_tree, predict
from hss_kernels.train.models import build_model

ROOT = Path(__file__).resolve().parents[1]
# Tiny runs: 24x24 images, batch 4, a 2-level U-Net of width 8.
TINY = ["--size", "24", "--batch-size", "4", "--train-size", "16", "--val-size", "4", "--width", "8",
        "--levels", "2", "--device", "cpu", "--quiet", "--num-predictions", "2"]



def evaluate_checkpoint(path, loss, seed, n_val):
    """Per-depth mIoU of a checkpoint on the first ``n_val`` synthetic validation images, one process."""
    ckpt = torch.load(path, weights_only=True)
    tree = build_tree(T.build_parser().parse_args(TINY))
    model = build_model("unet", tree, loss, width=8, levels=2)
    model.load_state_dict(ckpt["model"])
    model.eval()
    val = SyntheticHierarchy(tree, length=n_val, size=24, seed=seed, offset=2 ** 40)
    metrics = HierarchicalMetrics(tree)
    with torch.no_grad():
        for i in range(n_val):
            x, y = val[i]
            metrics.update(predict(model(x[None])[0], tree, loss), y[None])
    return ckpt, {str(d): m["miou"] for d, m in metrics.compute().items()}


def run(*argv):
    return T.train(T.build_parser().parse_args(list(map(str, argv)) + TINY))


@pytest.mark.parametrize("backend", ["reference", "auto"])
@pytest.mark.parametrize("loss", ["ce", "hier-softmax", "tree-min", "tree-bce"])
def test_every_loss_trains(loss, backend):
    res = run("--loss", loss, "--backend", backend, "--steps", 12, "--eval-every", 4, "--lr", 0.01, "--seed", 1)
    log = res["log"]
    assert [r["step"] for r in log] == [4, 8, 12] and res["step"] == 12
    losses = [r["train_loss"] for r in log]
    assert all(map(lambda v: v == v and v < 1e3, losses))
    assert losses[-1] < losses[0], f"{loss}/{backend}: the training loss did not fall: {losses}"
    for r in log:
        assert set(r["metrics"]) == {"1", "2"}  # cityscapes tree: depth 2
        for m in r["metrics"].values():
            assert 0.0 <= m["pixel_accuracy"] <= 1.0 and 0.0 <= m["miou"] <= 1.0


def test_triplet_term_and_bf16_autocast():
    res = run("--loss", "hier-softmax", "--triplet-weight", 0.5, "--amp", "bf16",
              "--steps", 8, "--eval-every", 4, "--lr", 0.01, "--level-weights", "1,2")
    losses = [r["train_loss"] for r in res["log"]]
    assert all(v == v for v in losses) and losses[-1] < losses[0]
    # HSSN's cosine ramp starts the triplet weight at 0: the first step's loss is the plain loss.
    ramp = run("--loss", "tree-min", "--triplet-weight", 5.0, "--triplet-ramp", "cosine", "--steps", 1,
               "--eval-every", 1, "--seed", 3)
    plain = run("--loss", "tree-min", "--steps", 1, "--eval-every", 1, "--seed", 3)
    assert ramp["log"][0]["train_loss"] == pytest.approx(plain["log"][0]["train_loss"], rel=1e-6)


def test_outputs_checkpoint_round_trip_and_resume(tmp_path):
    out = tmp_path / "run"
    res = run("--loss", "tree-min", "--steps", 4, "--eval-every", 2, "--out", out, "--seed", 5)
    for name in ("log.json", "checkpoint.pt", "curves.png", "predictions.png"):
        assert (out / name).is_file(), name
    for name in ("curves.png", "predictions.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = json.loads((out / "log.json").read_text())
    log = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in log] == [2, 4] and log == json.loads(json.dumps(res["log"]))
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]  # every step of a 4-step run

    # The checkpoint loads with weights_only=True and holds the weights that produced the last record.
    ckpt, miou = evaluate_checkpoint(out / "checkpoint.pt", "tree-min", 5, 4)
    assert ckpt["step"] == 4 and ckpt["config"]["loss"] == "tree-min"
    for d in ("1", "2"):
        assert miou[d] == pytest.approx(log[-1]["metrics"][d]["miou"], abs=1e-9)

    # Resume: the step count goes on from 4, the earlier records stay, the optimiser state is reused.
    res2 = run("--loss", "tree-min", "--steps", 8, "--eval-every", 2, "--out", out, "--seed", 5,
               "--resume", out / "checkpoint.pt")
    assert [r["step"] for r in res2["log"]] == [2, 4, 6, 8]
    assert res2["log"][:2] == log
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 8

    with pytest.raises(SystemExit, match="--loss tree-min"):
        run("--loss", "ce", "--steps", 10, "--resume", out / "checkpoint.pt")
    with pytest.raises(SystemExit, match="is at step 8; --steps 8 would train nothing"):
        run("--loss", "tree-min", "--steps", 8, "--resume", out / "checkpoint.pt")


def test_short_runs_log_the_loss_and_draw_curves(tmp_path, capsys):
    """A 20-step run (the defaults) records the training loss at least 10 times and evaluates at least 5
    times; --quiet prints only the final table."""
    res = run("--loss", "hier-softmax", "--steps", 20, "--out", tmp_path, "--seed", 2)
    records = json.loads((tmp_path / "log.json").read_text())
    train = [r for r in records if r["kind"] == "train"]
    assert len(train) >= 10 and train == json.loads(json.dumps(res["train_log"]))
    assert all(r["train_loss"] == r["train_loss"] for r in train)
    assert len(res["log"]) >= 5 and res["log"][-1]["step"] == 20
    out = capsys.readouterr().out  # TINY has --quiet
    assert out.count("mIoU %") == 1 and "step 20/20" in out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit, match="--level-weights needs 2"):
        run("--loss", "hier-softmax", "--steps", 1, "--level-weights", "1,2,3")
    with pytest.raises(SystemExit, match="needs --data-root"):
        run("--data", "cityscapes", "--steps", 1)
    with pytest.raises(SystemExit, match="unknown tree"):
        run("--tree", "no-such-tree", "--steps", 1)


def test_demo_prints_the_comparison(capsys, tmp_path):
    # The demo runs each loss in its own process (here both at once) with the options given here.
    assert T.main(["--demo", "--steps", "4", "--eval-every", "2", "--demo-jobs", "2", "--demo-seeds", "1",
                   "--threads", "1", "--out", str(tmp_path)] + TINY) == 0
    for name in ("comparison.png", "ce-seed0/log.json", "hier-softmax-seed0/curves.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "Steps to reach flat cross-entropy's final mean mIoU at each depth" in out
    assert re.search(r"^hier-softmax (reached it in \d+ steps|did NOT reach)", out, re.M)
    assert re.search(r"^ce\s+\d+\s+\d+\s+\d+$", out, re.M)


def test_torchrun_two_processes_agree(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    tiny = ["5" if TINY[i - 1] == "--val-size" else a for i, a in enumerate(TINY)]  # 5: uneven shards
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "hss_kernels.train", "--loss", "hier-softmax", "--steps", "3", "--eval-every", "3",
           "--seed", "2", "--out", str(tmp_path / "ddp")] + tiny
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text[-3000:]
    lines = re.findall(r"\[rank (\d)/2\] final metrics: (\{.*\})", text)
    assert sorted(r for r, _ in lines) == ["0", "1"], text[-3000:]
    assert json.loads(lines[0][1]) == json.loads(lines[1][1])
    log = json.loads((tmp_path / "ddp" / "log.json").read_text())
    assert log[-1]["step"] == 3
    # The confusion matrices summed over the two processes equal one process's over all 5 images
    # (each image counted once, none twice as a padded shard would).
    ckpt, miou = evaluate_checkpoint(tmp_path / "ddp" / "checkpoint.pt", "hier-softmax", 2, 5)
    assert ckpt["step"] == 3
    for d, v in json.loads(lines[0][1]).items():
        assert v == pytest.approx(miou[d], abs=1e-9)


def test_trains_on_a_real_layout(tmp_path):
    # A fabricated Helen folder: the real-data path of the script (loader, augmentation, ImageNet
    # normalisation, denormalised images in predictions.png).
    import numpy as np
    from PIL import Image

    root = tmp_path / "helen"
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    for i in range(4):
        Image.fromarray(np.random.randint(0, 255, (20, 18, 3), dtype=np.uint8)).save(root / "images" / f"{i}.jpg")
        Image.fromarray(np.random.randint(0, 11, (20, 18), dtype=np.uint8)).save(root / "labels" / f"{i}.png")
    (root / "train.txt").write_text("0\n1\n2\n3\n")
    (root / "test.txt").write_text("1\n3\n")
    res = T.train(T.build_parser().parse_args(
        ["--data", "helen", "--data-root", str(root), "--loss", "tree-bce", "--steps", "2", "--batch-size", "2",
         "--size", "16", "--out", str(tmp_path / "out"), "--width", "8", "--levels", "2", "--quiet"]))
    assert res["step"] == 2 and set(res["metrics"]) == {"1", "2", "3", "4"}  # the helen tree: depth 4
    assert (tmp_path / "out" / "predictions.png").is_file()


@pytest.mark.parametrize("loss", ["ce", "hier-softmax", "tree-min"])
def test_low_resolution_logits(loss):
    """--out-stride 2: the U-Net emits logits at half the labels' size; the hierarchical losses upsample them
    inside (--upsample fused) with the same loss as F.interpolate first (--upsample interpolate), and the
    predictions and metrics are at the labels' size."""
    fused = run("--loss", loss, "--out-stride", 2, "--steps", 2, "--eval-every", 2, "--seed", 4)
    first = run("--loss", loss, "--out-stride", 2, "--upsample", "interpolate", "--steps", 2, "--eval-every", 2,
                "--seed", 4)
    a, b = fused["log"][-1], first["log"][-1]
    assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4) and a["val_loss"] == a["val_loss"]
    assert a["metrics"]["2"]["pixel_accuracy"] == pytest.approx(b["metrics"]["2"]["pixel_accuracy"], abs=0.02)
    tree = build_tree(T.build_parser().parse_args(TINY))
    model = build_model("unet", tree, loss, width=8, levels=2, out_stride=2)
    x, y = SyntheticHierarchy(tree, length=1, size=24, seed=0)[0]
    logits = model(x[None])[0]
    assert logits.shape[-2:] == (12, 12)
    assert predict(logits, tree, loss, size=(24, 24)).shape == (1, 24, 24)


def test_out_stride_must_fit_the_unet():
    with pytest.raises(SystemExit, match="--out-stride must be a power of 2 below 2\\*\\*levels = 4"):
        run("--out-stride", 4, "--steps", 1)
    with pytest.raises(SystemExit, match="power of 2"):
        run("--out-stride", 3, "--steps", 1)
