"""CPU timing of the native backend's fused forward + backward against the reference and against
PyTorch's flat ``F.cross_entropy`` on logits of the same size.

    python -m benchmarks.native_cpu [--batch 2] [--size 256] [--tree vistas] [--reps 5]

Prints the median wall time of forward + backward per implementation (torch.get_num_threads() threads).
Timings on a shared machine are noisy: compare numbers from one run only.
"""
import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import hss_kernels
from hss_kernels import trees


def timeit(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--tree", default="vistas")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--skip-reference", action="store_true")
    args = ap.parse_args()
    tree = trees.load(args.tree)
    B, S = args.batch, args.size
    y = torch.randint(0, tree.num_leaves, (B, S, S))
    print(f"tree {args.tree}: {tree.num_leaves} leaves, {tree.num_nodes} nodes; B={B}, {S}x{S}, float32, "
          f"{torch.get_num_threads()} threads")

    def fwd_bwd(loss_fn, channels):
        x = torch.randn(B, channels, S, S, requires_grad=True)

        def run():
            x.grad = None
            loss_fn(x).backward()
        return run

    rows = [("F.cross_entropy (flat, leaves)", fwd_bwd(lambda x: F.cross_entropy(x, y), tree.num_leaves))]
    backends = ["native"] + ([] if args.skip_reference else ["reference"])
    for b in backends:
        rows.append((f"hierarchical_softmax_loss [{b}]",
                     fwd_bwd(lambda x, b=b: hss_kernels.hierarchical_softmax_loss(x, y, tree, backend=b),
                             tree.num_leaves)))
    for b in backends:
        rows.append((f"tree_min_loss [{b}]",
                     fwd_bwd(lambda x, b=b: hss_kernels.tree_min_loss(x, y, tree, backend=b), tree.num_nodes)))
        rows.append((f"tree_bce_loss [{b}]",
                     fwd_bwd(lambda x, b=b: hss_kernels.tree_bce_loss(x, y, tree, backend=b), tree.num_nodes)))
    for name, run in rows:
        print(f"{name:40s} {timeit(run, args.reps) * 1e3:9.1f} ms  (forward + backward)")


if __name__ == "__main__":
    main()
