"""Demo: both hierarchical losses on the Vistas tree, on random logits of a realistic size, per backend.

    python -m hss_kernels.demo                 # or: hss-demo
    python -m hss_kernels.demo --batch 8 --size 1024x1024 --device cuda

Prints the tree, then for each loss and each backend available on the device the loss value, the
gradient's agreement with the reference and the forward+backward time (median of a few runs; for
careful numbers use ``python -m benchmarks``).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import functional, trees
from .backends import available_backends


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device, reps):
    fn()  # warm-up (compilation, caches)
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hss-demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--tree", default="vistas", choices=trees.names())
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--size", default="256x512", help="HxW (default 256x512)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args(argv)
    H, W = (int(v) for v in a.size.lower().split("x"))
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    tree = trees.load(a.tree)
    print(f"tree {a.tree!r}: {tree!r}; classes per depth: "
          f"{[tree.num_classes(d) for d in range(1, tree.depth + 1)]}")
    for d in range(1, min(tree.depth, 2) + 1):
        names = tree.class_names(d)
        print(f"  depth {d}: {', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    print(f"inputs: batch {a.batch}, {H}x{W}, {dtype}, device {device}; ~10% of pixels ignored (label 255)\n")
    y = torch.randint(0, tree.num_leaves, (a.batch, H, W), device=device)
    y[torch.rand(a.batch, H, W, device=device) < 0.1] = 255
    header = f"{'loss':28s} {'backend':10s} {'value':>10s} {'grad rel err':>12s} {'fwd+bwd ms':>11s}"
    print(header)
    print("-" * len(header))
    for op, C in [("hierarchical_softmax_loss", tree.num_leaves), ("tree_min_loss", tree.num_nodes)]:
        x = (torch.randn(a.batch, C, H, W, device=device) * 2).to(dtype)
        fn = getattr(functional, op)
        ref_grad = None
        for backend in ["reference"] + [b for b in available_backends(device, op) if b != "reference"]:
            if backend == "triton" and device.type == "cpu":
                continue  # the CPU interpreter is for tests, not for timing
            xa = x.detach().requires_grad_()

            def step():
                xa.grad = None
                loss = fn(xa, y, tree, backend=backend)
                loss.backward()
                return loss

            ms = _time(step, device, a.reps) * 1e3
            value = step().item()
            if ref_grad is None:
                ref_grad, err = xa.grad.float().clone(), 0.0
            else:
                err = float((xa.grad.float() - ref_grad).abs().max() / ref_grad.abs().max())
            print(f"{op:28s} {backend:10s} {value:10.4f} {err:12.1e} {ms:11.1f}")
    print("\nbackends available here:", ", ".join(available_backends(device)),
          "(triton runs on a GPU; native needs the C++ extension)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
