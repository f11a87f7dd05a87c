"""Time the Triton kernels' variants on a GPU, to choose the defaults (``python -m benchmarks.tune_triton``).

Prints one line per (loss, dtype, variant, tile): milliseconds for forward, backward and the single
pass, and GB/s on the bytes docs/MATH.md §5.6 counts (logits read once per pass, gradient written once).
Variants: the pixels per program (``BLOCK_P`` of each kernel module's ``gpu_blocks``, whose other
choices stay). Times come from :func:`benchmarks.measure.time_pass` (CUDA
events on a GPU, ``perf_counter`` elsewhere; one untimed run first, which compiles). The comparisons with
PyTorch and the other backends are ``python -m benchmarks``.
"""
from __future__ import annotations

import argparse

import torch

from hss_kernels import trees
from hss_kernels.triton import hierarchical_softmax as hs
from hss_kernels.triton import tree_min as tm
from hss_kernels.triton.hierarchical_softmax import hierarchical_softmax_loss, hierarchical_softmax_loss_and_grad

from .measure import time_pass


def _timer(fn, reps: int, device: torch.device) -> float:
    """Median milliseconds of ``fn`` over ``reps`` runs after one untimed run."""
    return time_pass(lambda i: None, lambda _: fn(), device, reps=reps, warmup=1).median_ms


def run(shape=(8, 1024, 1024), dtypes=("float32", "bfloat16"), block_ps=(None, 256, 512, 1024), reps=10,
        device=None):
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    N, H, W = shape
    cases = [("hierarchical_softmax", trees.load("vistas"), hs), ("tree_min", trees.load("vistas_v2"), tm)]
    for name, tree, mod in cases:
        original = mod.gpu_blocks
        channels = tree.num_leaves if name == "hierarchical_softmax" else tree.num_nodes
        for dt in dtypes:
            dtype = getattr(torch, dt)
            x = torch.randn(N, channels, H, W, device=device, dtype=dtype, requires_grad=True)
            y = torch.randint(0, tree.num_leaves, (N, H, W), device=device)
            nbytes = x.numel() * x.element_size()
            for bp in block_ps:
                def sizes(*args, bp=bp, original=original):
                    bc, bp0, warps = original(*args)
                    return (bc, bp or bp0, warps)
                mod.gpu_blocks = sizes
                try:
                    if name == "hierarchical_softmax":
                        fwd = lambda: hierarchical_softmax_loss(x, y, tree)  # noqa: E731
                        one = lambda: hierarchical_softmax_loss_and_grad(x, y, tree)  # noqa: E731
                    else:
                        fwd = lambda: tm.tree_min_loss(x, y, tree)  # noqa: E731
                        one = lambda: tm.tree_min_loss_and_grad(x, y, tree)  # noqa: E731
                    loss = fwd()
                    t_fwd = _timer(fwd, reps, device)
                    t_bwd = _timer(lambda: torch.autograd.grad(loss, x, retain_graph=True), reps, device)
                    t_one = _timer(one, reps, device)
                finally:
                    mod.gpu_blocks = original
                tile = sizes(x)
                print(f"{name:22s} {dt:9s} tile={tile[0]}x{tile[1]}/{tile[2]}w  "
                      f"fwd {t_fwd:7.3f} ms ({nbytes / t_fwd / 1e6:6.0f} GB/s)  "
                      f"bwd {t_bwd:7.3f} ms ({2 * nbytes / t_bwd / 1e6:6.0f} GB/s)  "
                      f"single {t_one:7.3f} ms ({2 * nbytes / t_one / 1e6:6.0f} GB/s)", flush=True)
            del x, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[8, 1024, 1024], metavar=("N", "H", "W"))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--block-p", type=int, nargs="+", default=[0, 256, 512, 1024],
                    help="pixels per program (0: the default)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    run(tuple(args.shape), args.dtypes, [b or None for b in args.block_p], args.reps)


if __name__ == "__main__":
    main()
