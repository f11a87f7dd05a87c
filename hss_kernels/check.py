"""Self-check: run every backend available on this machine against the reference.

    python -m hss_kernels.check            # or: hss-check
    python -m hss_kernels.check --device cuda --dtype bfloat16

For each op and each backend that runs on the device, on fresh random inputs over every shipped tree
and a random unbalanced one: the loss (or decoded labels) and the gradient against the pure-PyTorch
reference, then ``torch.autograd.gradcheck`` in float64 on a tiny input. Prints one table row per
check and exits with status 1 if any fails, or if a backend asked for with ``--backend`` ran no check
(its rows say "not run" and why); status 2 for a device this machine does not have. Run it on a new GPU
before trusting the kernels there.
"""
from __future__ import annotations

import argparse
import random
import sys
import traceback
from typing import List, Optional

import torch
import torch.nn.functional as F

from . import functional, reference, trees
from .backends import available_backends, unavailable_reason
from .tree import Tree

LOSSES = ["hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss"]
TOLERANCE = {torch.float32: 2e-4, torch.float64: 1e-10, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def random_unbalanced_tree(seed: int, n: int = 15) -> Tree:
    r = random.Random(seed)
    parents = [-1]
    for i in range(1, n):
        parents.append(r.choice([-1] + list(range(i))))
    return Tree.from_parents(parents)


def _inputs(tree: Tree, op: str, shape, dtype, device, p_ignore=0.1):
    N, H, W = shape
    C = tree.num_leaves if op == "hierarchical_softmax_loss" else tree.num_nodes
    x = (torch.randn(N, C, H, W, device=device) * 3).to(dtype)
    y = torch.randint(0, tree.num_leaves, (N, H, W), device=device)
    y[torch.rand(N, H, W, device=device) < p_ignore] = 255
    return x, y


def _options(op: str, tree: Tree):
    if op == "hierarchical_softmax_loss":
        return [{}, {"level_weights": [0.5 + d for d in range(tree.depth)], "eps": 1e-4}]
    return [{"gamma": 0.0}, {"gamma": 2.0, "scale": 5.0, "eps": 1e-8, "normalize": "node"}]


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0)) if a.numel() else 0.0


def check_loss(op, backend, tree, dtype, device, shape, reduction) -> float:
    """Largest relative error of the loss and its gradient against the reference."""
    worst = 0.0
    for opts in _options(op, tree):
        x, y = _inputs(tree, op, shape, dtype, device)
        fn = getattr(functional, op)
        xa = x.detach().requires_grad_()
        out = fn(xa, y, tree, reduction=reduction, backend=backend, **opts)
        xr = x.detach().double().requires_grad_()
        ref = getattr(reference, op)(xr, y, tree, reduction=reduction, **opts)
        g = torch.randn_like(ref)
        (ga,) = torch.autograd.grad(out, xa, g.to(out.dtype))
        (gr,) = torch.autograd.grad(ref, xr, g)
        if ga.dtype != x.dtype:
            raise AssertionError(f"gradient dtype {ga.dtype}, expected {x.dtype}")
        worst = max(worst, _rel_err(out, ref), _rel_err(ga, gr))
    return worst


def check_decode(backend, tree, dtype, device, shape) -> float:
    """Share of pixels whose decoded leaf scores worse than the reference's best (float64 path scores)
    by more than rounding: kernels sum in another order, so exact near-ties may go either way."""
    x, _ = _inputs(tree, "tree_min_loss", shape, dtype, device)
    worst = 0.0
    for act in ("sigmoid", "softmax"):
        for score in ("sum", "mean"):
            a = functional.decode(x, tree, activation=act, score=score, backend=backend)
            s = reference.path_scores(x.double(), tree, activation=act, score=score)
            best = s.max(dim=1).values
            got = s.gather(1, a.unsqueeze(1)).squeeze(1)
            wrong = (best - got) > 1e-5 * best.abs().clamp(min=1)
            worst = max(worst, float(wrong.double().mean()))
    return worst


def gradcheck_loss(op, backend, tree, device) -> bool:
    x, y = _inputs(tree, op, (1, 3, 2), torch.float64, device, p_ignore=0.2)
    x.requires_grad_()
    fn = getattr(functional, op)
    return all(torch.autograd.gradcheck(lambda a: fn(a, y, tree, backend=backend, reduction=r, **opts), x)
               for r in ("mean", "none") for opts in _options(op, tree)[:1])


def run(device: str = "cpu", dtype: torch.dtype = torch.float32, quick: bool = False,
        backends: Optional[List[str]] = None, out=sys.stdout) -> bool:
    """Run the checks and print the table; True when everything holds."""
    dev = torch.device(device)
    tree_list = [(n, trees.load(n)) for n in trees.names()] + [("random", random_unbalanced_tree(random.randrange(10**6)))]
    if quick:
        tree_list = [t for t in tree_list if t[0] in ("helen", "cityscapes", "random")]
    shape = (2, 17, 33) if not quick else (2, 5, 7)
    rows = []
    ok_all = True

    def record(op, backend, tree_name, check, err, ok):
        nonlocal ok_all
        ok_all &= ok
        rows.append((op, backend, tree_name, check, err, "ok" if ok else "FAIL"))

    for op in LOSSES + ["decode"]:
        names = backends or available_backends(dev, op)
        for b in names:
            why = unavailable_reason(b, dev, op)
            if why is not None:
                rows.append((op, b, "-", "not run: " + why[:60], "", "n/a"))
                continue
            for tname, tree in tree_list:
                try:
                    if op == "decode":
                        err = check_decode(b, tree, dtype, dev, shape)
                        record(op, b, tname, f"labels {dtype}".replace("torch.", ""), f"{err:.1e}", err == 0)
                        continue
                    for red in ("mean", "none"):
                        err = check_loss(op, b, tree, dtype, dev, shape, red)
                        tol = TOLERANCE[dtype] if b != "reference" else 1e-4 if dtype != torch.float64 else 1e-10
                        if b == "reference" and dtype in (torch.bfloat16, torch.float16):
                            tol = TOLERANCE[dtype]
                        record(op, b, tname, f"value+grad {dtype} {red}".replace("torch.", ""), f"{err:.1e}", err <= tol)
                except Exception as exc:  # a crash is a failed check, with the reason in the table
                    record(op, b, tname, "runs", type(exc).__name__, False)
                    traceback.print_exc(file=sys.stderr)
            if op != "decode":
                tname, tree = tree_list[-1]
                try:
                    ok = gradcheck_loss(op, b, tree, dev)
                except Exception as exc:
                    ok = False
                    traceback.print_exc(file=sys.stderr)
                record(op, b, tname, "gradcheck float64", "", ok)
    # the reference itself: a flat tree gives exactly cross-entropy
    flat = Tree.from_parents([-1] * 9)
    x, y = _inputs(flat, "hierarchical_softmax_loss", shape, torch.float64, dev)
    err = _rel_err(reference.hierarchical_softmax_loss(x, y, flat), F.cross_entropy(x, y, ignore_index=255))
    record("hierarchical_softmax_loss", "reference", "flat", "== F.cross_entropy", f"{err:.1e}", err < 1e-12)

    header = ("op", "backend", "tree", "check", "max rel err", "result")
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "| " + " | ".join(str(v).ljust(w) for v, w in zip(r, widths)) + " |"
    print(f"hss_kernels self-check on {dev} ({torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'CPU'}), "
          f"torch {torch.__version__}, backends: {', '.join(available_backends(dev))}", file=out)
    print(line(header), file=out)
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|", file=out)
    for r in rows:
        print(line(r), file=out)
    n_fail = sum(r[-1] == "FAIL" for r in rows)
    n_skip = sum(r[-1] == "n/a" for r in rows)
    n_ok = len(rows) - n_fail - n_skip
    if n_fail or n_skip:
        print(f"{n_ok} passed, {n_fail} failed, {n_skip} not run", file=out)
    else:
        print(f"all {n_ok} checks hold", file=out)
    idle = [b for b in (backends or []) if not any(r[1] == b and r[-1] != "n/a" for r in rows)]
    if idle:  # a backend that was asked for and ran nothing has not been checked
        print(f"nothing ran for --backend {', '.join(idle)} on {dev}: not checked", file=out)
    return ok_all and not idle


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="hss-check", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="device to check (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"],
                   help="logits dtype for the value/gradient checks (gradcheck is always float64)")
    p.add_argument("--backend", action="append", help="check only this backend (repeatable)")
    p.add_argument("--quick", action="store_true", help="fewer trees, smaller inputs")
    a = p.parse_args(argv)
    why = _device_missing(a.device)
    if why:
        print(f"hss-check: --device {a.device}: {why}", file=sys.stderr)
        return 2
    ok = run(a.device, getattr(torch, a.dtype), a.quick, a.backend)
    return 0 if ok else 1


def _device_missing(device: str) -> Optional[str]:
    """Why this machine cannot run tensors on ``device``, or None."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        return f"not a device name ({exc})"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            built = "torch was built without CUDA" if torch.version.cuda is None else "torch sees no CUDA device"
            return f"{built} (torch {torch.__version__})"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif dev.type != "cpu":
        return "hss-check runs on cpu or cuda devices"
    return None


if __name__ == "__main__":
    sys.exit(main())
