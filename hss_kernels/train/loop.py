"""One training job: data, model, loss, the optimiser loop, evaluation, and the run's files.

Data: the synthetic hierarchical data set of :mod:`hss_kernels.train.data` by default (generated from
``--tree``), or a real data set from its folder (``--data NAME --data-root DIR``). Model: a small U-Net
(or torchvision's DeepLabV3). Loss: ``--loss ce|hier-softmax|tree-min|tree-bce`` through the
``hss_kernels`` functions with ``--backend``, plus ``--triplet-weight`` for the tree-triplet term.

Evaluation runs every ``--eval-every`` steps (by default about six times per run; 0: at the end of every
epoch) and prints the per-depth metrics table (``--quiet``: only the final one). It scores the labels at
their full size, on whole images or with sliding windows (``--eval-mode whole|slide``, ``--eval-window``,
``--eval-stride``; the default: slide for real data sets, whole for the synthetic one), or on centre crops
of the training size (``--eval-mode crop``): see :mod:`hss_kernels.train.inference`; the training loss is
recorded every ``--log-every`` steps (by default about ten times per run). Under ``--out DIR``: ``log.json``
(one record per logging step, ``"kind": "train"``, and per evaluation, ``"kind": "eval"``, naming its
``eval_mode``), ``checkpoint.pt`` (tensors
and plain containers only: it loads with ``torch.load(weights_only=True)``; ``--resume`` continues from
it), ``curves.png`` and ``predictions.png``.

Several processes: launch with ``torchrun`` (see :mod:`hss_kernels.train.distributed`); the model is
wrapped in DistributedDataParallel, each process reads its own shard of the data, and the metrics'
confusion matrices are summed over processes before they are reported.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .. import functional as HF
from ..metrics import HierarchicalMetrics
from ..tree import Tree
from . import distributed
from .checkpoint import load_checkpoint, save_checkpoint, write_json
from .cli import check_args, eval_settings
from .data import DATASETS, ResizeCenterCrop, SyntheticHierarchy, Transformed, build_dataset
from .inference import slide_logits, whole_logits
from .models import LEAF_LOSSES, build_model

__all__ = ["train", "make_loss", "predict", "evaluate_batch", "save_curves", "build_tree", "build_datasets"]


# --------------------------------------------------------------------------- set-up
def build_tree(args) -> Tree:
    """The tree of ``--tree`` (a shipped name or a file), by default the data set's."""
    name = args.tree
    if name is None:
        name = "cityscapes" if args.data == "synthetic" else DATASETS[args.data][1]
    if os.path.isfile(name):
        return Tree.from_file(name)
    try:
        return HF.as_tree(name)
    except ValueError as exc:
        raise SystemExit(f"hss-train: --tree: {exc}")


def build_datasets(args, tree):
    """``(training set, validation set)`` of ``--data`` (synthetic: generated from ``tree``)."""
    size = tuple(args.size) if len(args.size) == 2 else (args.size[0],) * 2
    crop = eval_settings(args)["mode"] == "crop"
    if args.data == "synthetic":
        train_ds = SyntheticHierarchy(tree, length=args.train_size, size=size, seed=args.seed, noise=args.noise,
                                      imbalance=args.imbalance)
        vsize = getattr(args, "val_image_size", None)
        vsize = size if vsize is None else (vsize[0], vsize[-1])
        # Same seed (same class colours), images far away from the training stream's.
        val_ds = SyntheticHierarchy(tree, length=args.val_size, size=vsize, seed=args.seed, noise=args.noise,
                                    imbalance=args.imbalance, offset=2 ** 40)
        if crop and vsize != size:
            val_ds = Transformed(val_ds, ResizeCenterCrop(size))
        return train_ds, val_ds
    return (build_dataset(args.data, args.data_root, True, size, tree, seed=args.seed),
            build_dataset(args.data, args.data_root, False, size, tree, seed=args.seed, crop=crop))


# --------------------------------------------------------------------------- losses and decoding
def _parse_weights(text: Optional[str]):
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"hss-train: --level-weights must be comma-separated numbers, got {text!r}")


def _full_size(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Logits bilinearly interpolated (in float32) to the labels' size, what frameworks do before a loss."""
    if tuple(logits.shape[-2:]) == tuple(target.shape[-2:]):
        return logits
    return F.interpolate(logits.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)


def make_loss(args, tree):
    """``loss(logits, target) -> scalar`` for ``args.loss`` (float32 for any logits dtype). Logits smaller
    than the labels are upsampled bilinearly: inside the hierarchical losses (``upsample="bilinear"``,
    fused on the CPU) with ``--upsample fused`` (the default), by ``F.interpolate`` first with
    ``--upsample interpolate`` and always for ``ce``."""
    ignore = 255
    weights = _parse_weights(args.level_weights)
    if weights is not None and len(weights) != tree.depth:
        raise SystemExit(f"hss-train: --level-weights needs {tree.depth} values for this tree, got {len(weights)}")
    gamma = args.gamma if args.gamma is not None else (2.0 if args.loss == "tree-min" else 0.0)

    fused = getattr(args, "upsample", "fused") == "fused"

    def loss(logits, target):
        if args.loss == "ce":
            if not bool((target != ignore).any()):
                return logits.float().sum() * 0.0
            return F.cross_entropy(_full_size(logits, target), target, ignore_index=ignore)
        up = None
        if tuple(logits.shape[-2:]) != tuple(target.shape[-2:]):
            if fused:
                up = "bilinear"
            else:
                logits = _full_size(logits, target)
        if args.loss == "hier-softmax":
            return HF.hierarchical_softmax_loss(logits, target, tree, level_weights=weights, ignore_index=ignore,
                                                backend=args.backend, upsample=up)
        fn = HF.tree_min_loss if args.loss == "tree-min" else HF.tree_bce_loss
        return fn(logits, target, tree, gamma=gamma, scale=args.scale, ignore_index=ignore, backend=args.backend,
                  upsample=up)

    return loss


def predict(logits: torch.Tensor, tree, loss: str, backend: str = "auto", size=None) -> torch.Tensor:
    """Leaf label per pixel (int64 ``(N, H, W)``, ``size = (H, W)`` when the logits are smaller): argmax of
    leaf logits, or the best root-to-leaf path of node logits (:func:`hss_kernels.decode`), of the logits
    upsampled bilinearly to ``size``."""
    if size is not None and tuple(size) == tuple(logits.shape[-2:]):
        size = None
    if loss in LEAF_LOSSES:
        if size is not None:
            logits = F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
        return logits.argmax(1)
    return HF.decode(logits.float(), tree, backend=backend, size=size)


def evaluate_batch(model, images: torch.Tensor, targets: torch.Tensor, tree, loss: str, loss_fn=None,
                   backend: str = "auto", mode: str = "whole", window=None, stride=None, size_divisor: int = 1,
                   windows_per_batch: int = 1, scale: float = 1.0):
    """``(prediction int64 (N, H, W), loss or None)`` of one batch of equally sized evaluation images in
    ``mode`` (see :mod:`hss_kernels.train.inference`): ``crop`` and ``whole`` run the batch through the
    model at once (padded to ``size_divisor``), ``slide`` averages the logits of ``window`` windows every
    ``stride`` pixels. ``scale`` in (0, 1] first resizes the images (bilinear) by that factor; the logits of
    the resized image are then upsampled to the labels. Predictions at the labels' size ``(H, W)``; the loss
    (``loss_fn(logits, target)``, when given) on the same logits, over the labelled pixels. Call under
    ``torch.no_grad()``."""
    H, W = targets.shape[-2:]
    if tuple(images.shape[-2:]) != (H, W):
        raise ValueError(f"evaluate_batch: images {tuple(images.shape[-2:])} and labels {(H, W)} differ in size")
    if not 0.0 < scale <= 1.0:
        raise ValueError(f"evaluate_batch: scale must be in (0, 1], got {scale}")
    h, w = (H, W) if scale == 1.0 else (max(1, round(H * scale)), max(1, round(W * scale)))
    if (h, w) != (H, W):
        images = F.interpolate(images, size=(h, w), mode="bilinear", align_corners=False)
    if mode == "slide":
        logits, (Hp, Wp) = slide_logits(model, images, window, stride, windows_per_batch), (h, w)
    elif mode in ("crop", "whole"):
        logits, (Hp, Wp) = whole_logits(model, images, size_divisor)
    else:
        raise ValueError(f"evaluate_batch: mode must be 'crop', 'whole' or 'slide', got {mode!r}")
    if (h, w) != (H, W):  # resized image: its logits at its own size, then upsampled to the labels below
        if (Hp, Wp) != (h, w) or tuple(logits.shape[-2:]) != (h, w):
            logits = F.interpolate(logits.float(), size=(Hp, Wp), mode="bilinear", align_corners=False)
            logits = logits[:, :, :h, :w]
        Hp, Wp = H, W
    padded = targets if (Hp, Wp) == (H, W) else F.pad(targets, (0, Wp - W, 0, Hp - H), value=255)
    value = None if loss_fn is None else loss_fn(logits, padded)
    pred = predict(logits, tree, loss, backend, size=(Hp, Wp))[:, :H, :W]
    return pred, value


def _display(shown, n: int, max_height: int = 128):
    """``(images, preds, targets)`` of the first ``n`` evaluation images for predictions.png, resized (labels
    by nearest neighbour) to the first image's size, at most ``max_height`` pixels high: the evaluation
    images of ``whole``/``slide`` differ in size and may be megapixels."""
    items = [(i[k], p[k], t[k]) for i, p, t in shown for k in range(i.shape[0])][:n]
    h, w = items[0][2].shape
    if h > max_height:
        h, w = max_height, max(1, round(w * max_height / h))
    imgs, preds, tgts = [], [], []
    for image, pred, tgt in items:
        if tuple(tgt.shape) != (h, w):
            image = F.interpolate(image[None], size=(h, w), mode="bilinear", align_corners=False)[0]
            pred = F.interpolate(pred[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
            tgt = F.interpolate(tgt[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
        imgs.append(image)
        preds.append(pred)
        tgts.append(tgt)
    return torch.stack(imgs), torch.stack(preds), torch.stack(tgts)


# --------------------------------------------------------------------------- records and plots
def _summary(metrics: Dict[int, dict]) -> Dict[str, dict]:
    """JSON-able per-depth metrics (NaN IoU of a class absent from both prediction and target → None)."""
    out = {}
    for d, m in metrics.items():
        out[str(d)] = {k: float(m[k]) for k in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou")}
        out[str(d)]["iou"] = [None if math.isnan(v) else float(v) for v in m["iou"].tolist()]
    return out


def _mode_text(ev: dict) -> str:
    """``eval whole`` / ``eval slide 48x48 stride 32x32`` for the printed tables."""
    text = f"eval {ev['mode']}"
    if ev["mode"] == "slide":
        text += f" {ev['window'][0]}x{ev['window'][1]} stride {ev['stride'][0]}x{ev['stride'][1]}"
    return text + (f" at scale {ev['scale']:g}" if ev["scale"] != 1.0 else "")


def evaluations(log: List[dict]) -> List[dict]:
    """The evaluation records of a run's log (those with metrics)."""
    return [r for r in log if "metrics" in r]


def save_curves(path, log: List[dict], title: str = "") -> None:
    """``curves.png``: training loss (every logging step) and validation loss, and validation mIoU per depth,
    against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    evals = evaluations(log)
    train = [r for r in log if r.get("kind") == "train"] or evals
    steps = [r["step"] for r in evals]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot([r["step"] for r in train], [r["train_loss"] for r in train], ".-", label="training")
    a.plot(steps, [r["val_loss"] for r in evals], "s--", label="validation")
    a.set_xlabel("step"); a.set_ylabel("loss"); a.legend(); a.grid(alpha=0.3)
    depths = sorted(evals[0]["metrics"], key=int) if evals else []
    for d in depths:
        b.plot(steps, [r["metrics"][d]["miou"] for r in evals], "o-", label=f"depth {d}")
    b.set_xlabel("step"); b.set_ylabel("validation mIoU"); b.set_ylim(0, 1); b.legend(); b.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- training
def train(args) -> dict:
    """Run one training job described by parsed ``args`` (see :func:`hss_kernels.train.cli.build_parser`).

    Returns ``{"log": [evaluation records], "train_log": [training-loss records], "step": final step,
    "metrics": last evaluation's per-depth metrics}`` (the same on every process).
    """
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = distributed.setup(args.device)
    tree = build_tree(args)
    out = Path(args.out) if args.out else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # identical initial weights in every process
    train_ds, val_ds = build_datasets(args, tree)
    use_triplet = args.triplet_weight > 0
    model = build_model(args.model, tree, args.loss, embed_dim=args.embed_dim if use_triplet else 0,
                        width=args.width, levels=args.levels, out_stride=args.out_stride).to(device)
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    lr = args.lr if args.lr is not None else (3e-3 if args.optimizer == "adamw" else 0.01)
    if args.optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=args.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=args.momentum, weight_decay=args.weight_decay)

    sampler = DistributedSampler(train_ds, num_replicas=world, rank=rank, shuffle=True, seed=args.seed, drop_last=True)
    loader = DataLoader(train_ds, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                        drop_last=True, pin_memory=device.type == "cuda")
    ev = eval_settings(args)
    # Full-size images of a real data set differ in size: one at a time (the synthetic ones are all alike).
    val_batch = args.batch_size if ev["mode"] == "crop" or args.data == "synthetic" else 1
    val_loader = DataLoader(val_ds, batch_size=val_batch, sampler=distributed.EvalShard(len(val_ds), rank, world),
                            num_workers=args.workers)
    per_epoch = len(loader)
    if per_epoch == 0:
        raise SystemExit(f"hss-train: {len(train_ds)} training images are fewer than one batch of "
                         f"{args.batch_size} per process x {world} processes")
    total = args.steps if args.steps is not None else args.epochs * per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: max(0.0, 1.0 - min(s, total) / total) ** args.poly_power)

    step, log = 0, []
    if args.resume:
        ckpt = load_checkpoint(args.resume)
        cfg = ckpt.get("config", {})
        for key in ("loss", "model", "width", "levels", "out_stride"):
            if key in cfg and cfg[key] != getattr(args, key):
                raise SystemExit(f"hss-train: --resume {args.resume} was trained with --{key} {cfg[key]}, "
                                 f"not {getattr(args, key)}")
        try:
            model.load_state_dict(ckpt["model"])
        except RuntimeError as exc:
            raise SystemExit(f"hss-train: --resume {args.resume} does not fit this model/tree: {exc}")
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        step, log = int(ckpt["step"]), list(ckpt.get("log", []))
        if step >= total:
            raise SystemExit(f"hss-train: --resume {args.resume} is at step {step}; --steps {total} would train "
                             f"nothing (ask for more steps to continue)")

    loss_fn = make_loss(args, tree)
    metrics = HierarchicalMetrics(tree, ignore_index=255, device=device,
                                  ignored_leaves=getattr(val_ds, "ignored_leaves", ()))
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp == "bf16" else nullcontext
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # triplet sampling, per process
    show = rank == 0 and not args.quiet
    windows_per_batch = max(1, args.batch_size // val_batch)  # slide: as many window pixels per forward as training

    def evaluate(epoch: int, train_loss: float, rate: float) -> dict:
        model.eval()
        metrics.reset()
        vloss, vcount, shown = 0.0, 0.0, []
        with torch.no_grad(), autocast():
            for images, targets in val_loader:
                images, targets = images.to(device), targets.to(device)
                # The bare module: no DDP synchronisation for uneven shards.
                pred, value = evaluate_batch(model, images, targets, tree, args.loss, loss_fn, args.backend,
                                             ev["mode"], ev["window"], ev["stride"],
                                             getattr(model, "size_divisor", 1), windows_per_batch, ev["scale"])
                n = float((targets != 255).sum())
                vloss += float(value) * n
                vcount += n
                metrics.update(pred, targets)
                if len(shown) < args.num_predictions:
                    shown.append((images.float().cpu(), pred.cpu(), targets.cpu()))
        metrics.all_reduce()
        vloss = distributed.mean_over_processes(vloss, vcount, device)
        model.train()
        record = {"kind": "eval", "step": step, "epoch": epoch, "train_loss": train_loss, "val_loss": vloss,
                  "lr": opt.param_groups[0]["lr"], "images_per_s": rate, "eval_mode": ev["mode"],
                  "metrics": _summary(metrics.compute())}
        if ev["mode"] == "slide":
            record["eval_window"], record["eval_stride"] = list(ev["window"]), list(ev["stride"])
        if ev["scale"] != 1.0:
            record["eval_scale"] = ev["scale"]
        log.append(record)
        if show:
            print(f"\nstep {step}/{total}  train loss {train_loss:.4f}  val loss {vloss:.4f}  ({args.loss}, "
                  f"{_mode_text(ev)})")
            print(metrics.table(), flush=True)
        if out is not None and rank == 0:
            write_json(out / "log.json", log)
            save_checkpoint(out / "checkpoint.pt", model, opt, sched, step, epoch, log, args)
            save_curves(out / "curves.png", log, title=f"{args.loss} on {args.data}")
            if shown:
                from ..viz import save_prediction_grid

                imgs, preds, tgts = _display(shown, args.num_predictions)
                save_prediction_grid(out / "predictions.png", tree, preds, tgts, images=val_ds.denormalize(imgs),
                                     ignore_index=255, scale=max(1, math.ceil(96 / imgs.shape[-2])))
        return record

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, desc=args.loss, unit="step", dynamic_ncols=True,
               disable=rank > 0 or not sys.stderr.isatty())
    run_loss, run_n, seen, t0 = 0.0, 0, 0, time.perf_counter()
    log_loss, log_n = 0.0, 0
    eval_every = args.eval_every if args.eval_every is not None else max(1, math.ceil(total / 6))
    log_every = args.log_every or max(1, math.ceil(total / 10))
    epoch = step // per_epoch
    model.train()
    while step < total:
        sampler.set_epoch(epoch)
        if hasattr(train_ds, "set_epoch"):
            train_ds.set_epoch(epoch)
        evaluated = False
        for images, targets in loader:
            if step >= total:
                break
            images, targets = images.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            with autocast():
                logits, emb = net(images)
            loss = loss_fn(logits, targets)
            if use_triplet:
                w = args.triplet_weight
                if args.triplet_ramp == "cosine":
                    w *= 0.5 * (1.0 - math.cos(math.pi * step / total))
                loss = loss + w * HF.tree_triplet_loss(emb.float(), targets, tree, generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            value = float(loss.detach())  # one host synchronisation per step, shared by both running means
            run_loss += value
            run_n += 1
            log_loss += value
            log_n += 1
            seen += images.shape[0] * world
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{run_loss / run_n:.3f}", img_s=f"{rate:.1f}")
            evaluated = False
            if step % log_every == 0 or step == total:
                log.append({"kind": "train", "step": step, "epoch": epoch,
                            "train_loss": distributed.mean_over_processes(log_loss, log_n, device),
                            "lr": opt.param_groups[0]["lr"], "images_per_s": rate})
                log_loss, log_n = 0.0, 0
            if eval_every and (step % eval_every == 0 or step == total):
                evaluate(epoch, distributed.mean_over_processes(run_loss, run_n, device), rate)
                run_loss, run_n, evaluated = 0.0, 0, True
        epoch += 1
        if not evaluated and (not eval_every or step == total) and run_n:
            evaluate(epoch, distributed.mean_over_processes(run_loss, run_n, device),
                     seen / max(time.perf_counter() - t0, 1e-9))
            run_loss, run_n = 0.0, 0
    bar.close()
    if not evaluations(log) or evaluations(log)[-1]["step"] != step:  # still report where we are
        evaluate(epoch, float("nan"), 0.0)
    final = evaluations(log)[-1]["metrics"]
    if rank == 0 and args.quiet:  # --quiet: the final table only
        print(f"step {step}/{total}  val loss {evaluations(log)[-1]['val_loss']:.4f}  ({args.loss}, "
              f"{_mode_text(ev)})")
        print(metrics.table(), flush=True)
    if world > 1:
        # One line per process: the metrics are summed over processes, so every line must agree.
        print(f"[rank {rank}/{world}] final metrics: {json.dumps({d: final[d]['miou'] for d in final})}", flush=True)
    return {"log": evaluations(log), "train_log": [r for r in log if r.get("kind") == "train"], "step": step,
            "metrics": final}
