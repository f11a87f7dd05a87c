"""Several processes (``torchrun``): the process group, the evaluation sampler, means over processes.

Each process takes one GPU (nccl) or runs on the CPU (gloo); ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``
come from the launcher (one process without them).
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

__all__ = ["EvalShard", "setup", "mean_over_processes", "shutdown"]


class EvalShard(Sampler):
    """Indices ``rank, rank + world, ...``: every evaluation image exactly once over all processes
    (DistributedSampler would pad with repeats and count some pixels twice)."""

    def __init__(self, n: int, rank: int, world: int):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


def setup(device_arg: str):
    """``(rank, world size, device)`` of this process; joins the process group when there are several
    (``--device auto``: this process's GPU, else the CPU)."""
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


def mean_over_processes(total: float, count: float, device) -> float:
    """``sum(total) / sum(count)`` over the processes (``total / count`` alone)."""
    if dist.is_initialized():
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1.0)


def shutdown() -> None:
    """Destroy the process group if :func:`setup` (or anyone) created one."""
    if dist.is_initialized():
        dist.destroy_process_group()
