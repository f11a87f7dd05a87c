"""A run's files that must survive it: ``checkpoint.pt`` and ``log.json``, each written atomically.

``checkpoint.pt`` holds tensors and plain containers only: it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["save_checkpoint", "load_checkpoint", "write_json"]


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


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
