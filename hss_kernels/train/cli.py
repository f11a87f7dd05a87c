"""``hss-train`` / ``python -m hss_kernels.train``: the command line (options, their checks, ``main``).

    hss-train --demo                                   # CE vs hierarchical softmax on synthetic data, CPU
    hss-train --loss hier-softmax --tree vistas --steps 2000 --out runs/a
    hss-train --data cityscapes --data-root /data/cityscapes --loss tree-min --amp bf16 --out runs/b
    hss-train --data cityscapes --data-root /data/cityscapes --size 512 1024 --eval-mode slide \
        --eval-window 512 1024 --eval-stride 341 683     # windows of the crop, 2/3 stride (the defaults)
    torchrun --nproc_per_node 8 -m hss_kernels.train --data vistas --data-root /data/vistas ...

``main`` runs one training job (:func:`hss_kernels.train.loop.train`) or, with ``--demo``, the
comparison of :mod:`hss_kernels.train.demo`.
"""
from __future__ import annotations

import argparse
import sys

from . import distributed
from .data import DATASETS
from .inference import EVAL_MODES, default_stride
from .models import LOSSES

__all__ = ["build_parser", "check_args", "eval_settings", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hss-train", description="Train a segmentation model with a hierarchical loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=["synthetic"] + sorted(DATASETS),
                   help="the synthetic hierarchical data set, or a real one read from --data-root")
    g.add_argument("--data-root", default=None, help="folder of the real data set (see hss_kernels.train.data)")
    g.add_argument("--tree", default=None,
                   help="shipped tree name or tree file; default: the data set's tree (synthetic: cityscapes)")
    g.add_argument("--size", type=int, nargs="+", default=[48], help="crop size H [W]")
    g.add_argument("--train-size", type=int, default=1024, help="synthetic: images per epoch (new ones every epoch)")
    g.add_argument("--val-size", type=int, default=32, help="synthetic: validation images")
    g.add_argument("--val-image-size", type=int, nargs="+", default=None,
                   help="synthetic: validation image size H [W] (default: --size), e.g. larger than the crop "
                        "to try --eval-mode whole|slide; real data sets are evaluated at their images' size")
    g.add_argument("--noise", type=float, default=0.6, help="synthetic: pixel noise")
    g.add_argument("--imbalance", type=float, default=1.0, help="synthetic: Zipf exponent of the leaf frequencies")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("model and loss")
    g.add_argument("--model", default="unet", choices=["unet", "deeplabv3"])
    g.add_argument("--width", type=int, default=16, help="U-Net channels at full resolution")
    g.add_argument("--levels", type=int, default=3, help="U-Net resolutions")
    g.add_argument("--out-stride", type=int, default=1,
                   help="U-Net: logits at 1/N of the input (1, 2, 4, ... < 2**levels); DeepLabV3 always gives 1/8")
    g.add_argument("--upsample", default="fused", choices=["fused", "interpolate"],
                   help="logits smaller than the labels: upsampled inside the hierarchical loss (fused, the "
                        "default) or by F.interpolate before it (to compare); ce always interpolates")
    g.add_argument("--loss", default="hier-softmax", choices=LOSSES)
    g.add_argument("--backend", default="auto", choices=["auto", "reference", "triton", "native"])
    g.add_argument("--gamma", type=float, default=None, help="focal gamma of tree-min / tree-bce (default 2 / 0)")
    g.add_argument("--scale", type=float, default=1.0, help="tree-min / tree-bce scale (HSSN's c)")
    g.add_argument("--level-weights", default=None, help="hier-softmax: comma-separated weights, one per depth")
    g.add_argument("--triplet-weight", type=float, default=0.0, help="weight of the tree-triplet loss (0: off)")
    g.add_argument("--triplet-ramp", default="none", choices=["none", "cosine"],
                   help="cosine: HSSN-style weight rising from 0 to --triplet-weight over the run")
    g.add_argument("--embed-dim", type=int, default=16, help="embedding channels for the triplet loss")
    g = p.add_argument_group("optimisation")
    g.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    g.add_argument("--lr", type=float, default=None, help="peak learning rate (default 3e-3 AdamW, 0.01 SGD)")
    g.add_argument("--weight-decay", type=float, default=1e-4)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--poly-power", type=float, default=0.9, help="poly schedule: lr * (1 - step/steps)**power")
    g.add_argument("--batch-size", type=int, default=8, help="images per process per step")
    g.add_argument("--steps", type=int, default=None, help="total optimiser steps (default: --epochs epochs)")
    g.add_argument("--epochs", type=int, default=1)
    g.add_argument("--amp", default="none", choices=["none", "bf16"], help="bf16 autocast (CPU or GPU)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")
    g = p.add_argument_group("evaluation and output")
    g.add_argument("--eval-every", type=int, default=None,
                   help="evaluate every N steps (default: about 6 times per run; 0: at the end of every epoch)")
    g.add_argument("--eval-mode", default="auto", choices=("auto",) + EVAL_MODES,
                   help="crop: resize the evaluation image to cover --size and take the centre crop (fast, not "
                        "comparable with published numbers); whole: the full image through the model at once "
                        "(padded to the model's size divisor), metrics at the label's full size; slide: "
                        "windows of --eval-window every --eval-stride pixels (the last one flush with the "
                        "border), the windows' logits averaged per pixel, then decoded at full size "
                        "(mmsegmentation's whole/slide test modes); auto: slide for the real data sets, "
                        "whole for the synthetic one (its images are the crop size unless --val-image-size)")
    g.add_argument("--eval-window", type=int, nargs="+", default=None,
                   help="slide: window H [W] (default: the crop size --size)")
    g.add_argument("--eval-stride", type=int, nargs="+", default=None,
                   help="slide: stride H [W], at most the window (default: 2/3 of the window, rounded)")
    g.add_argument("--eval-scale", type=float, default=1.0,
                   help="whole/slide: resize the evaluation image by this factor in (0, 1] first (e.g. 0.5 for "
                        "Vistas' multi-megapixel images); predictions and metrics stay at the label's full size")
    g.add_argument("--log-every", type=int, default=0,
                   help="record the training loss every N steps in log.json (default 0: about 10 times per run)")
    g.add_argument("--out", default=None, help="folder for log.json, checkpoint.pt, curves.png, predictions.png "
                                               "(--demo: for its runs and comparison.png; default hss-train-demo)")
    g.add_argument("--resume", default=None, help="checkpoint.pt to continue from (its step count continues)")
    g.add_argument("--num-predictions", type=int, default=4, help="validation images in predictions.png")
    g.add_argument("--quiet", action="store_true", help="no per-evaluation tables")
    g = p.add_argument_group("demo")
    g.add_argument("--demo", action="store_true",
                   help="compare flat cross-entropy with the hierarchical losses on synthetic data (CPU, minutes)")
    g.add_argument("--demo-losses", default="ce,hier-softmax", help="losses the demo compares")
    g.add_argument("--demo-seeds", type=int, default=3, help="demo: seeds per loss (curves are averaged)")
    g.add_argument("--demo-jobs", type=int, default=0, help="demo: runs at a time (default: one per CPU)")
    g.add_argument("--demo-target", type=float, default=1.0,
                   help="demo: a depth's target mIoU is this fraction of flat cross-entropy's final mIoU there")
    return p


def check_args(args) -> None:
    if args.data != "synthetic" and args.data_root is None:
        raise SystemExit(f"hss-train: --data {args.data} needs --data-root")
    if len(args.size) not in (1, 2) or min(args.size) < 1:
        raise SystemExit("hss-train: --size takes one or two positive integers")
    for name in ("batch_size", "epochs", "train_size", "val_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"hss-train: --{name.replace('_', '-')} must be >= 1")
    if getattr(args, "val_image_size", None) is not None:
        if args.data != "synthetic":
            raise SystemExit("hss-train: --val-image-size is for --data synthetic; real data sets are evaluated "
                             "at their images' size (or centre-cropped with --eval-mode crop)")
        _hw(args.val_image_size, "--val-image-size")
    eval_settings(args)
    if args.steps is not None and args.steps < 1:
        raise SystemExit("hss-train: --steps must be >= 1")
    if args.triplet_weight < 0 or (args.eval_every or 0) < 0 or getattr(args, "log_every", 0) < 0:
        raise SystemExit("hss-train: --triplet-weight, --eval-every and --log-every must be >= 0")
    stride = getattr(args, "out_stride", 1)
    if stride < 1 or stride & (stride - 1) or (args.model == "unet" and stride >= 2 ** args.levels):
        raise SystemExit(f"hss-train: --out-stride must be a power of 2 below 2**levels = {2 ** args.levels}, "
                         f"got {stride}")


def _hw(values, name: str):
    """``(H, W)`` of a one-or-two-integer option (None stays None)."""
    if values is None:
        return None
    if len(values) not in (1, 2) or min(values) < 1:
        raise SystemExit(f"hss-train: {name} takes one or two positive integers (H [W]), got "
                         f"{' '.join(map(str, values))}")
    return (values[0], values[-1])


def eval_settings(args) -> dict:
    """``{"mode", "window", "stride", "scale"}`` of the evaluation (``window``/``stride``: ``(H, W)`` for
    slide, else None; ``scale``: ``--eval-scale``): ``--eval-mode auto`` resolved (slide for the real data sets, whole for the synthetic one), the
    slide window defaulting to the crop size and the stride to 2/3 of the window. Raises ``SystemExit``
    with an ``hss-train:`` message for values that do not fit."""
    mode = getattr(args, "eval_mode", "auto")
    if mode == "auto":
        mode = "whole" if args.data == "synthetic" else "slide"
    if mode not in EVAL_MODES:
        raise SystemExit(f"hss-train: --eval-mode must be one of auto, {', '.join(EVAL_MODES)}, got {mode!r}")
    scale = float(getattr(args, "eval_scale", 1.0))
    if not 0.0 < scale <= 1.0:  # also refuses NaN
        raise SystemExit(f"hss-train: --eval-scale must be in (0, 1], got {scale:g}")
    if mode == "crop" and scale != 1.0:
        raise SystemExit("hss-train: --eval-scale is for --eval-mode whole|slide; crop resizes to --size itself")
    window = _hw(getattr(args, "eval_window", None), "--eval-window")
    stride = _hw(getattr(args, "eval_stride", None), "--eval-stride")
    if mode != "slide":
        if window is not None or stride is not None:
            raise SystemExit(f"hss-train: --eval-window and --eval-stride are for --eval-mode slide, "
                             f"not {mode}")
        return {"mode": mode, "window": None, "stride": None, "scale": scale}
    if window is None:
        window = _hw(args.size, "--size")
    if stride is None:
        stride = default_stride(window)
    if stride[0] > window[0] or stride[1] > window[1]:
        raise SystemExit(f"hss-train: --eval-stride {stride[0]} {stride[1]} is larger than the window "
                         f"{window[0]} {window[1]}: pixels between the windows would get no logits")
    return {"mode": mode, "window": window, "stride": stride, "scale": scale}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .data import DataError

    try:
        if args.demo:
            from .demo import demo

            demo(args, argv)
        else:
            from .loop import train

            train(args)
    except (FileNotFoundError, DataError) as exc:  # the data set's files: one line naming the file, no traceback
        print(f"hss-train: {exc}", file=sys.stderr)
        return 2
    finally:
        distributed.shutdown()
    return 0
