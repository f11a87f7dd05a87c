"""Compile every Triton kernel variant for sm_90 without a GPU, as the runtime would (run in a subprocess
without TRITON_INTERPRET).

The interpreter runs Python, not the compiler: this catches what only the compiler rejects (type changes
of loop-carried values, float64 layout bugs, ...). The launchers themselves run on meta tensors with a
recorder in place of the launch (benchmarks/sm90/triton_side.py), so each variant is compiled with the
arguments, constexprs and specialisation (16-byte divisibility, stride-1 constants, i32 or i64 integers)
a real launch of that call gives. Prints one line per variant and exits 1 on the first failure.
Usage: python tests/_triton_compile_sm90.py [--shard SHARD/SHARDS]
"""
import sys

import torch

from benchmarks.sm90 import triton_side
from hss_kernels import trees
from hss_kernels.triton import OPS, decode as dk, hierarchical_softmax as hs, tree_min as tm

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
VISTAS = (8, 1024, 1024)
HUGE = (2, 8192, 8192)  # the batch stride passes 2**31: i64 integer arguments
TALL = (2, 16384, 8192)  # the same with the small tree's 26 channels


def meta(C, dtype, shape=VISTAS):
    B, H, W = shape
    return (torch.empty((B, C, H, W), dtype=dtype, device="meta"),
            torch.empty((B, H, W), dtype=torch.int64, device="meta"))


def variants():
    leaf_tree, big_tree = trees.load("vistas"), trees.load("vistas_v2")
    # The tree-min and decode kernels have the tree compiled in (straight-line code per node: 10-30 s per
    # Vistas 2.0 variant on 2 cores). A small tree reaches the same code paths, so it is the tree of every
    # variant but three kept at full size (the float32 single pass, the bfloat16 gradient and the float32
    # decode at the labels' size): .ci/sm90-model compiles the float32 tree-min forward and backward and the
    # decode rows (upsampled ones included) with Vistas 2.0 besides.
    small_tree = trees.load("cityscapes")
    L = leaf_tree.num_leaves
    out = []  # (name, call, backward)
    for name, dt in DTYPES.items():
        x, t = meta(L, dt)
        hierarchical_softmax = [("forward", lambda x=x, t=t: OPS["hierarchical_softmax_loss"](x, t, leaf_tree), False),
               ("backward, scalar grad", lambda x=x, t=t: OPS["hierarchical_softmax_loss"](x, t, leaf_tree), True),
               ("backward, per-pixel grad, eps", lambda x=x, t=t: hs.hierarchical_softmax_loss(
                   x, t, leaf_tree, eps=0.1, reduction="none"), True),
               ("single pass, eps", lambda x=x, t=t: hs.hierarchical_softmax_loss(
                   x, t, leaf_tree, eps=0.1, single_pass=True), False)]
        out += [(f"hierarchical_softmax {name} {v}", c, b) for v, c, b in hierarchical_softmax if name != "bf16" or "scalar" in v or "single" in v]

        def at(big=False, dt=dt):
            """(logits, target, tree) of a tree-min variant: Vistas 2.0 for the two kept at full size."""
            tree = big_tree if big else small_tree
            return meta(tree.num_nodes, dt) + (tree,)

        tree_min = [("tree_min forward, focal, eps", lambda a=at(): tm.tree_min_loss(*a, eps=0.1), False),
                    ("tree_min backward, per-pixel grad, focal, eps", lambda a=at(name == "bf16"):
                        tm.tree_min_loss(*a, eps=0.1, reduction="none"), True),
                    ("tree_min single pass, gamma 0", lambda a=at(name == "fp32"): tm.tree_min_loss(
                        *a, gamma=0.0, single_pass=True), False),
                    ("tree_bce per-pixel loss, focal, eps", lambda a=at(): tm.tree_bce_loss(
                        *a, gamma=2.0, eps=0.1, reduction="none"), False)]
        out += [(f"{v.split(' ', 1)[0]} {name} {v.split(' ', 1)[1]}", c, b) for v, c, b in tree_min if name != "bf16" or "per-pixel grad" in v]
        dtree = big_tree if name == "fp32" else small_tree
        V = dtree.num_nodes
        for act, score, C in (("sigmoid", "sum", V), ("softmax", "mean", V), ("sigmoid", "sum", dtree.num_leaves)):
            x, _ = meta(C, dt)
            kind = "leaf logits" if C != V else f"{act} {score}"
            out.append((f"decode {name} {kind}", lambda x=x, a=act, s=score, d=dtree: dk.decode(x, d, a, s), False))
        x, _ = meta(V, dt, HUGE if dtree is big_tree else TALL)
        out.append((f"decode {name} softmax mean, i64", lambda x=x, d=dtree: dk.decode(x, d, "softmax", "mean"), False))
    # Logits at 1/4 of the labels' size, upsampled inside the loss: the forward kernel's UPSAMPLE variant and
    # the gathering backward.
    for name, dt in DTYPES.items():
        x = torch.empty((8, L, 256, 256), dtype=dt, device="meta")
        _, t = meta(L, dt)
        up = [("forward", lambda x=x, t=t: hs.hierarchical_softmax_loss(x, t, leaf_tree, upsample="bilinear"), False),
              ("backward, scalar grad", lambda x=x, t=t: hs.hierarchical_softmax_loss(
                  x, t, leaf_tree, upsample="bilinear"), True),
              ("backward, per-pixel grad, eps, align_corners", lambda x=x, t=t: hs.hierarchical_softmax_loss(
                  x.contiguous(memory_format=torch.channels_last), t, leaf_tree, eps=0.1, reduction="none",
                  upsample="bilinear", align_corners=True), True)]
        out += [(f"hierarchical_softmax {name} upsampled {v}", c, b) for v, c, b in up if name == "fp32" or "align" not in v]
        # The tree-min and BCE: the forward kernel's UPSAMPLE variant and the gathering backward, with the small
        # tree (the backward walks the tree twice inside its window loops: Vistas 2.0 took 14 minutes to compile
        # here, the forward 3).
        node_tree = small_tree
        xn = torch.empty((8, node_tree.num_nodes, 256, 256), dtype=dt, device="meta")
        node_up = [("tree_min forward, focal, eps", lambda x=xn, t=t, nt=node_tree: tm.tree_min_loss(
                        x, t, nt, eps=0.1, upsample="bilinear"), False),
                   ("tree_min backward, scalar grad", lambda x=xn, t=t, nt=node_tree: tm.tree_min_loss(
                        x, t, nt, upsample="bilinear"), True),
                   ("tree_bce backward, per-pixel grad, focal, eps, align_corners", lambda x=xn, t=t, nt=node_tree:
                        tm.tree_bce_loss(x.contiguous(memory_format=torch.channels_last), t, nt, gamma=2.0, eps=0.1,
                                         reduction="none", upsample="bilinear", align_corners=True), True)]
        out += [(f"{v.split(' ', 1)[0]} {name} upsampled {v.split(' ', 1)[1]}", c, b) for v, c, b in node_up
                if name == "fp32" or "align" not in v]
        xd = torch.empty((8, small_tree.num_nodes, 256, 256), dtype=dt, device="meta")
        act, score, cl = ("sigmoid", "sum", False) if name == "fp32" else ("softmax", "mean", True)
        out.append((f"decode {name} upsampled {act} {score}{', channels_last' if cl else ''}",
                    lambda x=xd, a=act, s=score, cl=cl: dk.decode(
                        x.contiguous(memory_format=torch.channels_last) if cl else x, small_tree, a, s,
                        size=(1024, 1024), align_corners=cl), False))
    # Class and pixel weights fused in (HAS_CW / HAS_PW): each loss kernel's weighted variants, the node losses
    # with the small tree.
    out += weighted_variants(leaf_tree, small_tree)
    x, t = meta(L, torch.float32, HUGE)
    out.append(("hierarchical_softmax fp32 forward, i64", lambda: OPS["hierarchical_softmax_loss"](x, t, leaf_tree), False))
    x2, t2 = meta(small_tree.num_nodes, torch.float32, TALL)
    xp, tp = meta(small_tree.num_nodes, torch.bfloat16)  # the focal terms two pixels at a time (tree_min._pair)
    out.append(("tree_min bf16 forward, focal, pixel pairs", lambda: tm.tree_min_loss(xp, tp, small_tree), False))
    out.append(("tree_min fp32 backward, i64", lambda: OPS["tree_min_loss"](x2, t2, small_tree), True))
    return out


def weights(tree, t, dtype=torch.float32):
    """Meta class weights (one per leaf) and pixel weights (the target's shape) for ``tree`` and target ``t``."""
    return (torch.empty(tree.num_leaves, dtype=torch.float32, device="meta"),
            torch.empty(t.shape, dtype=dtype, device="meta"))


def weighted_variants(leaf_tree, node_tree):
    """The weighted launches (class and pixel weights, or one of them): the hierarchical softmax forward,
    backward, single pass (bfloat16, bfloat16 pixel weights) and upsampled forward and backward; the tree-min
    forward, backward (per-pixel grad) and upsampled backward, the tree BCE single pass and upsampled forward."""
    L, V = leaf_tree.num_leaves, node_tree.num_nodes
    out = []
    x, t = meta(L, torch.float32)
    cw, pw = weights(leaf_tree, t)
    xb, tb = meta(L, torch.bfloat16)
    cwb, pwb = weights(leaf_tree, tb, torch.bfloat16)
    xu = torch.empty((8, L, 256, 256), dtype=torch.float32, device="meta")
    out += [("hierarchical_softmax fp32 forward, weights", lambda: hs.hierarchical_softmax_loss(
                x, t, leaf_tree, class_weight=cw, pixel_weight=pw), False),
            ("hierarchical_softmax fp32 backward, scalar grad, class weights", lambda: hs.hierarchical_softmax_loss(
                x, t, leaf_tree, class_weight=cw), True),
            ("hierarchical_softmax bf16 single pass, weights", lambda: hs.hierarchical_softmax_loss(
                xb, tb, leaf_tree, single_pass=True, class_weight=cwb, pixel_weight=pwb), False),
            ("hierarchical_softmax fp32 upsampled forward, weights", lambda: hs.hierarchical_softmax_loss(
                xu, t, leaf_tree, upsample="bilinear", class_weight=cw, pixel_weight=pw), False),
            ("hierarchical_softmax fp32 upsampled backward, per-pixel grad, weights",
             lambda: hs.hierarchical_softmax_loss(xu, t, leaf_tree, upsample="bilinear", reduction="none",
                                                  class_weight=cw, pixel_weight=pw), True)]
    xn, tn = meta(V, torch.float32)
    cwn, pwn = weights(node_tree, tn)
    xnu = torch.empty((8, V, 256, 256), dtype=torch.float32, device="meta")
    out += [("tree_min fp32 forward, focal, weights", lambda: tm.tree_min_loss(
                xn, tn, node_tree, class_weight=cwn, pixel_weight=pwn), False),
            ("tree_min fp32 backward, per-pixel grad, pixel weights", lambda: tm.tree_min_loss(
                xn, tn, node_tree, reduction="none", pixel_weight=pwn), True),
            ("tree_bce fp32 single pass, focal, weights", lambda: tm.tree_bce_loss(
                xn, tn, node_tree, gamma=2.0, single_pass=True, class_weight=cwn, pixel_weight=pwn), False),
            ("tree_bce fp32 upsampled forward, class weights", lambda: tm.tree_bce_loss(
                xnu, tn, node_tree, upsample="bilinear", class_weight=cwn), False),
            ("tree_min fp32 upsampled backward, scalar grad, weights", lambda: tm.tree_min_loss(
                xnu, tn, node_tree, upsample="bilinear", class_weight=cwn, pixel_weight=pwn), True)]
    return out


def main(argv):
    """Compiles one shard of every variant's launches (``--shard SHARD/SHARDS``, default 0/1: all); prints the
    launch count of all variants first, then one line per compiled launch."""
    shard, shards = map(int, (argv[argv.index("--shard") + 1] if "--shard" in argv else "0/1").split("/"))
    recorded = []
    for name, call, backward in variants():
        try:
            launches = triton_side.record_call(call, backward)
            if not launches:
                raise RuntimeError("the call launched no kernel")
            for launch in launches:
                if "i64" in name and not any(type(a) is int and abs(a) >= 2 ** 31 for a in launch.args):
                    raise RuntimeError("no integer argument of this launch needs 64 bits")
                recorded.append((name, launch))
        except Exception as exc:  # report which variant, then fail
            print("FAIL", name, repr(exc)[-2000:])
            return 1
    # Launches of one kernel and mode next to each other, then every shards-th: each shard gets its share of
    # the slow compiles (the tree-min gradients) and of the fast ones.
    def kind(i):
        launch = recorded[i][1]
        modes = launch.constexprs
        return (launch.kernel.fn.__name__, str(modes.get("GRAD_MODE")), str(modes.get("LOSS_MODE")), i)

    mine = [recorded[i] for i in sorted(range(len(recorded)), key=kind)[shard::shards]]
    print(f"launches: {len(recorded)} in all, {len(mine)} in shard {shard}/{shards}", flush=True)
    for name, launch in mine:
        try:
            c = triton_side.compile_launch(launch, cache_dir=None)
        except Exception as exc:
            print("FAIL", name, repr(exc)[-2000:])
            return 1
        sig = ",".join(f"{k}={v}" for k, v in launch.describe().items() if k in ("LOSS_MODE", "GRAD_MODE")
                       or k.startswith(("HAS_", "USE_", "ACT", "MEAN")))
        print(f"ok {name}: {c.name} {c.num_warps} warps [{sig}]", flush=True)
    print(f"{len(mine)} variants compiled")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
