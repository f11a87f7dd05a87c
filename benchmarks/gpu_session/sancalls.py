"""One small call of each kernel, for ``compute-sanitizer --tool memcheck``.

    compute-sanitizer --tool memcheck --error-exitcode 1 python -m benchmarks.gpu_session.sancalls --backend native

For each backend named: the hierarchical softmax loss, the focal tree-min loss and the tree BCE, forward
and backward (reductions mean and none, NCHW and channels_last, float32 and bfloat16), and decode (both
activations and scores), on a few pixels of odd sizes (2x3x5, 1x1x7) with some ignored labels, on the
Vistas trees (66 leaves / 80 nodes, 123 / 147: channel counts that are not powers of two). Each call is
followed by a synchronize, so that memcheck reports an error right after the ``CALL`` line that caused it.
Run it with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` so that every tensor is its own allocation and an
access past its end is seen. Exit status: 0 when every call ran, 1 when one raised, 3 when no named
backend is available on the device.
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def calls(backend: str, device, quick: bool = False):
    """(name, thunk) pairs: each thunk runs one call (and its backward) and returns a tensor. ``quick``:
    the Vistas v2 tree and the 2x3x5 shape only."""
    import torch

    import hss_kernels as H
    from hss_kernels import trees

    def inputs(tree, channels, shape, dtype, channels_last=False):
        N, Hh, W = shape
        x = torch.randn(N, channels, Hh, W, device=device).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        y = torch.randint(0, tree.num_leaves, (N, Hh, W), device=device)
        y[torch.rand(N, Hh, W, device=device) < 0.25] = 255
        y.view(-1)[0] = 255  # at least one ignored pixel
        return x.requires_grad_(True), y

    def loss_call(fn, tree, channels, shape, dtype, reduction, channels_last=False, **kw):
        def go():
            x, y = inputs(tree, channels, shape, dtype, channels_last)
            out = fn(x, y, tree, reduction=reduction, backend=backend, **kw)
            g = torch.ones_like(out) if out.dim() else None
            (gx,) = torch.autograd.grad(out, x, g)
            return gx
        return go

    tree_list = [(trees.load("vistas"), "vistas"), (trees.load("vistas_v2"), "vistas_v2")]
    out = []
    for tree, tname in tree_list[1:] if quick else tree_list:
        L, V = tree.num_leaves, tree.num_nodes
        for shape in ((2, 3, 5),) if quick else ((2, 3, 5), (1, 1, 7)):
            s = "x".join(map(str, shape))
            for red in ("mean", "none"):
                out.append((f"hierarchical_softmax {tname} {s} float32 {red}",
                            loss_call(H.hierarchical_softmax_loss, tree, L, shape, torch.float32, red)))
                out.append((f"tree_min {tname} {s} float32 {red} gamma=2",
                            loss_call(H.tree_min_loss, tree, V, shape, torch.float32, red, gamma=2.0)))
                out.append((f"tree_bce {tname} {s} float32 {red}",
                            loss_call(H.tree_bce_loss, tree, V, shape, torch.float32, red)))
        out.append((f"hierarchical_softmax {tname} 2x3x5 bfloat16 mean channels_last",
                    loss_call(H.hierarchical_softmax_loss, tree, L, (2, 3, 5), torch.bfloat16, "mean", True)))
        out.append((f"tree_min {tname} 2x3x5 bfloat16 mean channels_last",
                    loss_call(H.tree_min_loss, tree, V, (2, 3, 5), torch.bfloat16, "mean", True)))
        for act in ("sigmoid", "softmax"):
            for score in ("sum", "mean"):
                def dec(tree=tree, V=V, act=act, score=score, cl=False):
                    x = torch.randn(2, V, 3, 5, device=device)
                    if cl:
                        x = x.to(memory_format=torch.channels_last)
                    return H.decode(x, tree, activation=act, score=score, backend=backend)
                out.append((f"decode {tname} 2x3x5 float32 {act} {score}", dec))
        out.append((f"decode {tname} 2x3x5 float32 sigmoid sum channels_last",
                    lambda tree=tree, V=V: H.decode(torch.randn(2, V, 3, 5, device=device).to(
                        memory_format=torch.channels_last), tree, backend=backend)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session.sancalls", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--backend", action="append", help="native and/or triton (repeatable; default native)")
    p.add_argument("--quick", action="store_true", help="one tree (vistas_v2) and one shape (2x3x5)")
    a = p.parse_args(argv)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch

    import hss_kernels  # noqa: F401
    from hss_kernels.backends import unavailable_reason

    device = torch.device(a.device)
    torch.manual_seed(0)
    failed, ran, available = 0, 0, 0
    for backend in a.backend or ["native"]:
        why = unavailable_reason(backend, device)
        if why is not None:
            print(f"UNAVAILABLE {backend} on {device}: {why}", flush=True)
            continue
        available += 1
        for name, thunk in calls(backend, device, a.quick):
            print(f"CALL {backend} {name}", flush=True)
            try:
                r = thunk()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                finite = bool(torch.isfinite(r.float()).all()) if r.is_floating_point() else True
                print(f"DONE {backend} {name}" + ("" if finite else " (non-finite values)"), flush=True)
                ran += 1
            except Exception:
                failed += 1
                print(f"RAISED {backend} {name}", flush=True)
                traceback.print_exc()
    print(f"sancalls: {ran} calls ran, {failed} raised", flush=True)
    if available == 0:
        return 3
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
