"""``hss-train``: a thin training script that shows the hierarchical losses doing their job.

    hss-train --demo                                   # CE vs hierarchical softmax on synthetic data, CPU
    hss-train --loss hier-softmax --tree vistas --steps 2000 --out runs/a
    hss-train --data cityscapes --data-root /data/cityscapes --loss tree-min --amp bf16 --out runs/b
    torchrun --nproc_per_node 8 -m hss_kernels.train --data vistas --data-root /data/vistas ...

Data: the synthetic hierarchical data set of :mod:`hss_kernels.data` by default (generated from
``--tree``), or a real data set from its folder (``--data NAME --data-root DIR``). Model: a small U-Net
(or torchvision's DeepLabV3). Loss: ``--loss ce|hier-softmax|tree-min|tree-bce`` through the
``hss_kernels`` functions with ``--backend``, plus ``--triplet-weight`` for the tree-triplet term.

Evaluation runs at the end of every epoch, or every ``--eval-every`` steps, and prints the per-depth
metrics table. Under ``--out DIR``: ``log.json`` (one record per evaluation), ``checkpoint.pt`` (tensors
and plain containers only: it loads with ``torch.load(weights_only=True)``; ``--resume`` continues from
it), ``curves.png`` and ``predictions.png``.

Several processes: launch with ``torchrun``; each process takes one GPU (nccl) or runs on the CPU
(gloo); the model is wrapped in DistributedDataParallel, each process reads its own shard of the data,
and the metrics' confusion matrices are summed over processes before they are reported.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from torch.utils.data.distributed import DistributedSampler

from . import functional as HF
from .data import DATASETS, SyntheticHierarchy, build_dataset
from .models import LEAF_LOSSES, NODE_LOSSES, build_model

__all__ = ["main", "train", "build_parser", "demo"]

LOSSES = LEAF_LOSSES + NODE_LOSSES


# --------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hss-train", description="Train a segmentation model with a hierarchical loss.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--data", default="synthetic", choices=["synthetic"] + sorted(DATASETS),
                   help="the synthetic hierarchical data set, or a real one read from --data-root")
    g.add_argument("--data-root", default=None, help="folder of the real data set (see hss_kernels.data)")
    g.add_argument("--tree", default=None,
                   help="shipped tree name or tree file; default: the data set's tree (synthetic: cityscapes)")
    g.add_argument("--size", type=int, nargs="+", default=[48], help="crop size H [W]")
    g.add_argument("--train-size", type=int, default=1024, help="synthetic: images per epoch (new ones every epoch)")
    g.add_argument("--val-size", type=int, default=32, help="synthetic: validation images")
    g.add_argument("--noise", type=float, default=0.6, help="synthetic: pixel noise")
    g.add_argument("--imbalance", type=float, default=1.0, help="synthetic: Zipf exponent of the leaf frequencies")
    g.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    g = p.add_argument_group("model and loss")
    g.add_argument("--model", default="unet", choices=["unet", "deeplabv3"])
    g.add_argument("--width", type=int, default=16, help="U-Net channels at full resolution")
    g.add_argument("--levels", type=int, default=3, help="U-Net resolutions")
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
    g.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (0: every epoch)")
    g.add_argument("--out", default=None, help="folder for log.json, checkpoint.pt, curves.png, predictions.png")
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


def _check_args(args) -> None:
    if args.data != "synthetic" and args.data_root is None:
        raise SystemExit(f"hss-train: --data {args.data} needs --data-root")
    if len(args.size) not in (1, 2) or min(args.size) < 1:
        raise SystemExit("hss-train: --size takes one or two positive integers")
    for name in ("batch_size", "epochs", "train_size", "val_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"hss-train: --{name.replace('_', '-')} must be >= 1")
    if args.steps is not None and args.steps < 1:
        raise SystemExit("hss-train: --steps must be >= 1")
    if args.triplet_weight < 0 or args.eval_every < 0:
        raise SystemExit("hss-train: --triplet-weight and --eval-every must be >= 0")


# --------------------------------------------------------------------------- distributed helpers
class _Shard(Sampler):
    """Indices ``rank, rank + world, ...``: every evaluation image exactly once over all processes
    (DistributedSampler would pad with repeats and count some pixels twice)."""

    def __init__(self, n: int, rank: int, world: int):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


def _setup_distributed(device_arg: str):
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device_arg == "auto":
        device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device(f"cuda:{local}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"hss-train: --device {device_arg} but CUDA is not available")
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _mean_over_processes(total: float, count: float, device) -> float:
    if dist.is_initialized():
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1.0)


# --------------------------------------------------------------------------- losses and decoding
def _parse_weights(text: Optional[str]):
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"hss-train: --level-weights must be comma-separated numbers, got {text!r}")


def make_loss(args, tree):
    """``loss(logits, target) -> scalar`` for ``args.loss`` (float32 for any logits dtype)."""
    ignore = 255
    weights = _parse_weights(args.level_weights)
    if weights is not None and len(weights) != tree.depth:
        raise SystemExit(f"hss-train: --level-weights needs {tree.depth} values for this tree, got {len(weights)}")
    gamma = args.gamma if args.gamma is not None else (2.0 if args.loss == "tree-min" else 0.0)

    def loss(logits, target):
        if args.loss == "ce":
            if not bool((target != ignore).any()):
                return logits.float().sum() * 0.0
            return F.cross_entropy(logits.float(), target, ignore_index=ignore)
        if args.loss == "hier-softmax":
            return HF.hierarchical_softmax_loss(logits, target, tree, level_weights=weights, ignore_index=ignore,
                                                backend=args.backend)
        fn = HF.tree_min_loss if args.loss == "tree-min" else HF.tree_bce_loss
        return fn(logits, target, tree, gamma=gamma, scale=args.scale, ignore_index=ignore, backend=args.backend)

    return loss


def predict(logits: torch.Tensor, tree, loss: str, backend: str = "auto") -> torch.Tensor:
    """Leaf label per pixel (int64 ``(N, H, W)``): argmax of leaf logits, or the best root-to-leaf path
    of node logits (:func:`hss_kernels.decode`)."""
    if loss in LEAF_LOSSES:
        return logits.argmax(1)
    return HF.decode(logits.float(), tree, backend=backend)


# --------------------------------------------------------------------------- records and plots
def _summary(metrics: Dict[int, dict]) -> Dict[str, dict]:
    """JSON-able per-depth metrics (NaN IoU of a class absent from both prediction and target → None)."""
    out = {}
    for d, m in metrics.items():
        out[str(d)] = {k: float(m[k]) for k in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou")}
        out[str(d)]["iou"] = [None if math.isnan(v) else float(v) for v in m["iou"].tolist()]
    return out


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save_curves(path, log: List[dict], title: str = "") -> None:
    """``curves.png``: training/validation loss and mIoU per depth against steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in log]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(steps, [r["train_loss"] for r in log], "o-", label="training")
    a.plot(steps, [r["val_loss"] for r in log], "s--", label="validation")
    a.set_xlabel("step"); a.set_ylabel("loss"); a.legend(); a.grid(alpha=0.3)
    depths = sorted(log[0]["metrics"], key=int) if log else []
    for d in depths:
        b.plot(steps, [r["metrics"][d]["miou"] for r in log], "o-", label=f"depth {d}")
    b.set_xlabel("step"); b.set_ylabel("validation mIoU"); b.set_ylim(0, 1); b.legend(); b.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------- checkpoints
def _plain(v):
    return v if isinstance(v, (int, float, str, bool, type(None))) else (list(v) if isinstance(v, (list, tuple)) else str(v))


def save_checkpoint(path: Path, model, optimizer, scheduler, step: int, epoch: int, log, args) -> None:
    state = {
        "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "step": int(step), "epoch": int(epoch), "log": log,
        "config": {k: _plain(v) for k, v in vars(args).items()},
    }
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`, loaded with ``weights_only=True``."""
    if not Path(path).is_file():
        raise SystemExit(f"hss-train: --resume {path}: no such file")
    return torch.load(path, map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------- training
def _datasets(args, tree):
    size = tuple(args.size) if len(args.size) == 2 else (args.size[0],) * 2
    if args.data == "synthetic":
        train_ds = SyntheticHierarchy(tree, length=args.train_size, size=size, seed=args.seed, noise=args.noise,
                                      imbalance=args.imbalance)
        # Same seed (same class colours), images far away from the training stream's.
        val_ds = SyntheticHierarchy(tree, length=args.val_size, size=size, seed=args.seed, noise=args.noise,
                                    imbalance=args.imbalance, offset=2 ** 40)
        return train_ds, val_ds
    return (build_dataset(args.data, args.data_root, True, size, tree, seed=args.seed),
            build_dataset(args.data, args.data_root, False, size, tree, seed=args.seed))


def _tree(args):
    from .tree import Tree

    name = args.tree
    if name is None:
        name = "cityscapes" if args.data == "synthetic" else DATASETS[args.data][1]
    if os.path.isfile(name):
        return Tree.from_file(name)
    try:
        return HF.as_tree(name)
    except ValueError as exc:
        raise SystemExit(f"hss-train: --tree: {exc}")


def train(args) -> dict:
    """Run one training job described by parsed ``args`` (see :func:`build_parser`).

    Returns ``{"log": [records], "step": final step, "metrics": last evaluation's per-depth metrics}``
    (the same on every process).
    """
    from .metrics import HierarchicalMetrics

    _check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    rank, world, device = _setup_distributed(args.device)
    tree = _tree(args)
    out = Path(args.out) if args.out else None
    if out is not None and rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)  # identical initial weights in every process
    train_ds, val_ds = _datasets(args, tree)
    use_triplet = args.triplet_weight > 0
    model = build_model(args.model, tree, args.loss, embed_dim=args.embed_dim if use_triplet else 0,
                        width=args.width, levels=args.levels).to(device)
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
    val_loader = DataLoader(val_ds, batch_size=args.batch_size, sampler=_Shard(len(val_ds), rank, world),
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
        for key in ("loss", "model", "width", "levels"):
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

    loss_fn = make_loss(args, tree)
    metrics = HierarchicalMetrics(tree, ignore_index=255, device=device)
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.amp == "bf16" else nullcontext
    gen = torch.Generator().manual_seed(args.seed * 1000 + rank)  # triplet sampling, per process
    show = rank == 0 and not args.quiet

    def evaluate(epoch: int, train_loss: float, rate: float) -> dict:
        model.eval()
        metrics.reset()
        vloss, vcount, shown = 0.0, 0.0, []
        with torch.no_grad(), autocast():
            for images, targets in val_loader:
                images, targets = images.to(device), targets.to(device)
                logits, _ = model(images)  # the bare module: no DDP synchronisation for uneven shards
                n = float((targets != 255).sum())
                vloss += float(loss_fn(logits, targets)) * n
                vcount += n
                pred = predict(logits, tree, args.loss, args.backend)
                metrics.update(pred, targets)
                if len(shown) < args.num_predictions:
                    shown.append((images.float().cpu(), pred.cpu(), targets.cpu()))
        metrics.all_reduce()
        vloss = _mean_over_processes(vloss, vcount, device)
        model.train()
        record = {"step": step, "epoch": epoch, "train_loss": train_loss, "val_loss": vloss,
                  "lr": opt.param_groups[0]["lr"], "images_per_s": rate, "metrics": _summary(metrics.compute())}
        log.append(record)
        if show:
            print(f"\nstep {step}/{total}  train loss {train_loss:.4f}  val loss {vloss:.4f}  ({args.loss})")
            print(metrics.table(), flush=True)
        if out is not None and rank == 0:
            _write_json(out / "log.json", log)
            save_checkpoint(out / "checkpoint.pt", model, opt, sched, step, epoch, log, args)
            save_curves(out / "curves.png", log, title=f"{args.loss} on {args.data}")
            if shown:
                from .viz import save_prediction_grid

                imgs = torch.cat([s[0] for s in shown])[: args.num_predictions]
                preds = torch.cat([s[1] for s in shown])[: args.num_predictions]
                tgts = torch.cat([s[2] for s in shown])[: args.num_predictions]
                save_prediction_grid(out / "predictions.png", tree, preds, tgts, images=val_ds.denormalize(imgs),
                                     ignore_index=255, scale=max(1, math.ceil(96 / imgs.shape[-2])))
        return record

    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, desc=args.loss, unit="step", dynamic_ncols=True,
               disable=rank > 0 or not sys.stderr.isatty())
    run_loss, run_n, seen, t0 = 0.0, 0, 0, time.perf_counter()
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
            run_loss += float(loss.detach())
            run_n += 1
            seen += images.shape[0] * world
            rate = seen / max(time.perf_counter() - t0, 1e-9)
            bar.update(1)
            bar.set_postfix(loss=f"{run_loss / run_n:.3f}", img_s=f"{rate:.1f}")
            evaluated = False
            if args.eval_every and (step % args.eval_every == 0 or step == total):
                evaluate(epoch, _mean_over_processes(run_loss, run_n, device), rate)
                run_loss, run_n, evaluated = 0.0, 0, True
        epoch += 1
        if not evaluated and (not args.eval_every or step == total) and run_n:
            evaluate(epoch, _mean_over_processes(run_loss, run_n, device), seen / max(time.perf_counter() - t0, 1e-9))
            run_loss, run_n = 0.0, 0
    bar.close()
    if not log or log[-1]["step"] != step:  # e.g. resumed at the end: still report where we are
        evaluate(epoch, float("nan"), 0.0)
    final = log[-1]["metrics"]
    if world > 1:
        # One line per process: the metrics are summed over processes, so every line must agree.
        print(f"[rank {rank}/{world}] final metrics: {json.dumps({d: final[d]['miou'] for d in final})}", flush=True)
    return {"log": log, "step": step, "metrics": final}


# --------------------------------------------------------------------------- demo
def _first_reach(log: List[dict], depth: str, target: float) -> Optional[int]:
    for r in log:
        if r["metrics"][depth]["miou"] >= target:
            return r["step"]
    return None


# Options the demo sets for its runs unless the command line gives them.
DEMO_DEFAULTS = {"--steps": "300", "--eval-every": "30", "--size": "32", "--val-size": "64", "--device": "cpu",
                 "--imbalance": "1.5"}
_DEMO_ONLY = {"--demo": 0, "--demo-losses": 1, "--demo-seeds": 1, "--demo-target": 1, "--demo-jobs": 1,
              "--seed": 1, "--out": 1, "--loss": 1,
              "--quiet": 0, "--threads": 1}


def _demo_argv(argv: List[str]) -> List[str]:
    """The command line of one demo run: the user's options minus the demo's own, over the defaults."""
    out, i = [], 0
    while i < len(argv):
        key = argv[i].split("=", 1)[0]
        if key in _DEMO_ONLY:
            i += 1 + (_DEMO_ONLY[key] if "=" not in argv[i] else 0)
            continue
        out.append(argv[i])
        i += 1
    given = {a.split("=", 1)[0] for a in out}
    for key, value in DEMO_DEFAULTS.items():
        if key not in given:
            out += [key, value]
    return out + ["--data", "synthetic"]


def _mean_log(logs: List[List[dict]]) -> List[dict]:
    """Per-evaluation mean over runs of the per-depth mIoU (the runs evaluate at the same steps)."""
    n = min(len(log) for log in logs)
    out = []
    for i in range(n):
        depths = logs[0][i]["metrics"]
        out.append({"step": logs[0][i]["step"], "metrics": {
            d: {"miou": sum(log[i]["metrics"][d]["miou"] for log in logs) / len(logs)} for d in depths}})
    return out


def _save_comparison(path, runs: Dict[str, List[dict]], depths: List[str], title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(depths), figsize=(4.5 * len(depths), 3.8), squeeze=False)
    for ax, d in zip(axes[0], depths):
        for n, log in runs.items():
            ax.plot([r["step"] for r in log], [r["metrics"][d]["miou"] for r in log], "o-", label=n)
        ax.set_title(f"depth {d}")
        ax.set_xlabel("step"); ax.set_ylabel("validation mIoU"); ax.grid(alpha=0.3); ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def demo(args, argv: Optional[List[str]] = None) -> dict:
    """Train every loss of ``--demo-losses`` with the same model, data and steps, for ``--demo-seeds``
    seeds (one process per run, ``--demo-jobs`` at a time, CPU threads shared out); print the seeds'
    mean validation mIoU per depth against steps, and the steps each loss needs to reach a target mIoU
    at every depth (on the mean curves, and per seed)."""
    import subprocess
    import tempfile

    losses = [s.strip() for s in args.demo_losses.split(",") if s.strip()]
    for name in losses:
        if name not in LOSSES:
            raise SystemExit(f"hss-train: --demo-losses: unknown loss {name!r}; choose from {LOSSES}")
    if args.demo_seeds < 1:
        raise SystemExit("hss-train: --demo-seeds must be >= 1")
    run_argv = _demo_argv(list(sys.argv[1:] if argv is None else argv))
    base = build_parser().parse_args(run_argv)
    _check_args(base)
    seeds = [args.seed + i for i in range(args.demo_seeds)]
    jobs_todo = [(n, sd) for sd in seeds for n in losses]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = max(1, min(len(jobs_todo), args.demo_jobs or cpus))
    threads = args.threads or max(1, cpus // jobs)
    tmp = None
    if args.out:
        root = Path(args.out)
        root.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="hss-demo-")
        root = Path(tmp.name)
    print(f"[demo] {', '.join(losses)} x seeds {', '.join(map(str, seeds))}: {base.steps} steps each, {jobs} "
          f"run(s) at a time, {threads} thread(s) each; outputs in {root}", flush=True)
    env = dict(os.environ)
    # The children must import this very package (a checkout run without installing included).
    pkg_parent = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(threads))
    logs, times, running = {}, {}, {}
    t_start = time.perf_counter()
    try:
        while jobs_todo or running:
            while jobs_todo and len(running) < jobs:
                name, sd = jobs_todo.pop(0)
                tag = f"{name}-seed{sd}"
                cmd = [sys.executable, "-m", "hss_kernels.train"] + run_argv + [
                    "--loss", name, "--seed", str(sd), "--out", str(root / tag), "--quiet", "--threads", str(threads)]
                logf = open(root / f"{tag}.txt", "w")
                running[(name, sd)] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env), logf,
                                       time.perf_counter())
            time.sleep(0.2)
            for (name, sd), (proc, logf, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                logf.close()
                del running[(name, sd)]
                tag = f"{name}-seed{sd}"
                times[(name, sd)] = time.perf_counter() - t0
                if proc.returncode != 0:
                    tail = (root / f"{tag}.txt").read_text()[-3000:]
                    raise SystemExit(f"hss-train --demo: the {tag} run failed (exit {proc.returncode}):\n{tail}")
                logs[(name, sd)] = json.loads((root / tag / "log.json").read_text())
                print(f"[demo] {tag}: done in {times[(name, sd)]:.0f} s", flush=True)
    finally:
        for proc, logf, _ in running.values():
            proc.kill()
            logf.close()
        if tmp is not None:
            tmp.cleanup()
    wall = time.perf_counter() - t_start
    runs = {n: _mean_log([logs[(n, sd)] for sd in seeds]) for n in losses}
    depths = sorted(runs[losses[0]][0]["metrics"], key=int)
    tree = _tree(base)
    print(f"\nSynthetic data on tree {tree!r} (leaf frequencies Zipf^{base.imbalance:g}, noise {base.noise:g}); "
          f"same U-Net, {base.steps} steps of batch {base.batch_size} at {base.size[0]}px, seeds {seeds}.\n"
          f"Validation mIoU per depth, mean over the seeds ({base.val_size} images; d1 = coarsest, "
          f"d{depths[-1]} = leaves):")
    w = 7 * len(depths)
    print("step  " + "".join(f"| {n:<{w}}" for n in losses))
    print("      " + "".join("| " + "".join(f"d{d:<6}" for d in depths) for _ in losses))
    for i, r in enumerate(runs[losses[0]]):
        row = f"{r['step']:<6}"
        for n in losses:
            rec = runs[n][i] if i < len(runs[n]) else None
            row += "| " + "".join(f"{rec['metrics'][d]['miou']:<7.3f}" if rec else " " * 7 for d in depths)
        print(row)

    ref = "ce" if "ce" in losses else None

    def reach_table(curves: Dict[str, List[dict]]):
        # The target at each depth: flat cross-entropy's final mIoU there (times --demo-target), i.e. how
        # many steps each loss needs to match what the flat loss reaches at the end of the run. Without
        # ce, the worst loss's final mIoU.
        targets = {d: args.demo_target * (curves[ref][-1]["metrics"][d]["miou"] if ref else
                                          min(curves[n][-1]["metrics"][d]["miou"] for n in losses)) for d in depths}
        reach = {n: {d: _first_reach(curves[n], d, targets[d]) for d in depths} for n in losses}
        every = {n: (None if None in reach[n].values() else max(reach[n].values())) for n in losses}
        return targets, reach, every

    def fmt(v):
        return "-" if v is None else str(v)

    targets, reach, every = reach_table(runs)
    what = "flat cross-entropy's" if ref else "the worst loss's"
    scale = "" if args.demo_target == 1 else f"{args.demo_target:g} x "
    print(f"\nSteps to reach {scale}{what} final mean mIoU at each depth ('-': not reached in {base.steps} steps):")
    cols = [f"d{d} ({targets[d]:.3f})  " for d in depths]
    print("loss          " + "".join(cols) + "every depth")
    for n in losses:
        print(f"{n:<14}" + "".join(f"{fmt(reach[n][d]):<{len(c)}}" for d, c in zip(depths, cols)) + fmt(every[n]))
    print("\nFinal mIoU per depth (mean over seeds): " + "; ".join(
        f"{n}: " + " ".join(f"d{d} {runs[n][-1]['metrics'][d]['miou']:.3f}" for d in depths) for n in losses))
    per_seed = {sd: reach_table({n: logs[(n, sd)] for n in losses})[2] for sd in seeds}
    if len(seeds) > 1:
        print("The same, seed by seed (steps to reach every depth's target): " + "; ".join(
            f"seed {sd}: " + ", ".join(f"{n} {fmt(per_seed[sd][n])}" for n in losses) for sd in seeds))
    if ref:
        flat = every[ref]
        for n in losses:
            if n == ref:
                continue
            mine = every[n]
            if mine is None:
                verdict = "did NOT reach"
            else:
                verdict = (f"reached it in {mine} steps, " + ("fewer than" if mine < flat else "as many as"
                           if mine == flat else "MORE than") + f" flat cross-entropy's {flat}")
            wins = sum(per_seed[sd][n] is not None and per_seed[sd][n] <= per_seed[sd][ref] for sd in seeds)
            print(f"{n} {verdict} (on the mean curves); seed by seed it matched flat cross-entropy's final mIoU at "
                  f"every depth as fast or faster on {wins} of {len(seeds)} seed(s).")
    print(f"Wall time: {wall:.0f} s for {len(logs)} runs ({jobs} at a time).")
    if args.out:
        _save_comparison(root / "comparison.png", runs, depths, f"mean over seeds {seeds}, {tree!r}")
        print(f"Plot: {root / 'comparison.png'}")
    return {"runs": runs, "logs": logs, "targets": targets, "reach": reach, "every": every, "times": times}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.demo:
            demo(args, argv)
        else:
            train(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
