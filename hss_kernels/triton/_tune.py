"""Time the Triton kernels' variants on a GPU, to choose the defaults (``python -m hss_kernels.triton._tune``).

Prints one line per (loss, dtype, variant, tile): milliseconds for forward, backward and the single
pass, and GB/s on the bytes MATH.md §5 counts (logits read once per pass, gradient written once).
Variants: the pixel block (``_common.block_sizes``) and, for tree-min, ``tree_min.USE_SCAN``. The
project's benchmarks (comparisons with PyTorch and the other backends) live under ``benchmarks/``.
"""
from __future__ import annotations

import argparse

import torch

from .. import trees
from . import _common as C
from . import tree_min as tm
from .hierarchical_softmax import hierarchical_softmax_loss, hierarchical_softmax_loss_and_grad


def _timer(fn, reps: int) -> float:
    """Median milliseconds of ``fn`` (CUDA events on a GPU, wall clock elsewhere)."""
    import time
    times = []
    for i in range(reps + 1):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            ms = a.elapsed_time(b)
        else:
            t0 = time.perf_counter()
            fn()
            ms = (time.perf_counter() - t0) * 1e3
        if i:  # the first run compiles
            times.append(ms)
    return sorted(times)[len(times) // 2]


def run(shape=(8, 1024, 1024), dtypes=("float32", "bfloat16"), block_ps=(None, 8, 16, 32), reps=10, device=None):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    N, H, W = shape
    original = C.block_sizes
    cases = [("hierarchical_softmax", trees.load("vistas"), False),
             ("tree_min", trees.load("vistas_v2"), False), ("tree_min", trees.load("vistas_v2"), True)]
    for name, tree, scan in cases:
        channels = tree.num_leaves if name == "hierarchical_softmax" else tree.num_nodes
        for dt in dtypes:
            dtype = getattr(torch, dt)
            x = torch.randn(N, channels, H, W, device=device, dtype=dtype, requires_grad=True)
            y = torch.randint(0, tree.num_leaves, (N, H, W), device=device)
            nbytes = x.numel() * x.element_size()
            for bp in block_ps:
                def sizes(c, p, interpret, bp=bp):
                    bc, bp0, warps = original(c, p, interpret)
                    return (bc, bp or bp0, warps)
                C.block_sizes = sizes
                tm.USE_SCAN = scan
                try:
                    if name == "hierarchical_softmax":
                        fwd = lambda: hierarchical_softmax_loss(x, y, tree)  # noqa: E731
                        one = lambda: hierarchical_softmax_loss_and_grad(x, y, tree)  # noqa: E731
                    else:
                        fwd = lambda: tm.tree_min_loss(x, y, tree)  # noqa: E731
                        one = lambda: tm.tree_min_loss_and_grad(x, y, tree)  # noqa: E731
                    loss = fwd()
                    t_fwd = _timer(fwd, reps)
                    t_bwd = _timer(lambda: torch.autograd.grad(loss, x, retain_graph=True), reps)
                    t_one = _timer(one, reps)
                finally:
                    C.block_sizes = original
                    tm.USE_SCAN = False
                tile = sizes(channels, N * H * W, C.interpreted(x.device))
                print(f"{name:22s} {dt:9s} scan={int(scan)} tile={tile[0]}x{tile[1]}/{tile[2]}w  "
                      f"fwd {t_fwd:7.3f} ms ({nbytes / t_fwd / 1e6:6.0f} GB/s)  "
                      f"bwd {t_bwd:7.3f} ms ({2 * nbytes / t_bwd / 1e6:6.0f} GB/s)  "
                      f"single {t_one:7.3f} ms ({2 * nbytes / t_one / 1e6:6.0f} GB/s)", flush=True)
            del x, y


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[8, 1024, 1024], metavar=("N", "H", "W"))
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--block-p", type=int, nargs="+", default=[0, 8, 16, 32], help="0: the default")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args(argv)
    run(tuple(args.shape), args.dtypes, [b or None for b in args.block_p], args.reps)


if __name__ == "__main__":
    main()
