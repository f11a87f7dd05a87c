"""Low-resolution logits: the loss with bilinear upsampling fused (``upsample="bilinear"``) against what
frameworks do today, ``F.interpolate`` then the loss, forward + backward, time and peak extra memory.

    python -m benchmarks.lowres                         # the CPU configuration (2 x 66 x 64 x 64 -> 512 x 512)
    python -m benchmarks.lowres --config vistas4,vistas8,vistas2_4,vistas2_8 --dtype bfloat16   # on a GPU
    python -m benchmarks.lowres --out benchmarks/results   # also writes lowres-<device>-<date>.json/.md

Rows per configuration (B, C, h x w -> H x W, the tree of the configuration):

* ``fused``: ``hss_kernels.<loss>(logits, target, tree, upsample="bilinear", backend=B)`` on the small logits;
* ``interpolate + hss``: ``F.interpolate`` (float32) then the same loss at full resolution;
* ``interpolate + F.cross_entropy``: the flat baseline frameworks run (``F.interpolate`` in the logits' dtype).

Each row: median milliseconds of forward + backward (``benchmarks.measure.time_pass``: CUDA events on a GPU,
``perf_counter`` on the CPU) and the peak memory beyond the inputs during the step (CUDA: the caching
allocator's peak; CPU: the resident high-water mark in a fresh process, as ``benchmarks/memprobe.py``
measures it), next to the size of the full-resolution logits. A backend that does not fuse the
upsampling interpolates first; its ``fused`` row says so (every loss of the native and Triton backends
fuses it now).
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F

import hss_kernels
from hss_kernels import trees

from . import measure


@dataclass(frozen=True)
class LowRes:
    name: str
    tree: str
    batch: int
    low: tuple
    full: tuple
    note: str = ""


CONFIGS: Dict[str, LowRes] = {
    "cpu": LowRes("cpu", "vistas", 2, (64, 64), (512, 512), "issue 14's CPU target size"),
    "vistas4": LowRes("vistas4", "vistas", 8, (256, 256), (1024, 1024), "Vistas, logits at 1/4"),
    "vistas8": LowRes("vistas8", "vistas", 8, (128, 128), (1024, 1024), "Vistas, logits at 1/8"),
    "vistas2_4": LowRes("vistas2_4", "vistas_v2", 8, (256, 256), (1024, 1024), "Vistas 2.0, logits at 1/4"),
    "vistas2_8": LowRes("vistas2_8", "vistas_v2", 8, (128, 128), (1024, 1024), "Vistas 2.0, logits at 1/8"),
}
LOSSES = ("hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss")
ROWS = ("fused", "interpolate + hss", "interpolate + F.cross_entropy")


def _inputs(cfg: LowRes, loss: str, dtype: torch.dtype, device: torch.device, seed: int = 0):
    tree = trees.load(cfg.tree)
    C = tree.num_leaves if loss == "hierarchical_softmax_loss" else tree.num_nodes
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(cfg.batch, C, *cfg.low, generator=g) * 2).to(device=device, dtype=dtype)
    y = torch.randint(0, tree.num_leaves, (cfg.batch, *cfg.full), generator=g)
    y[torch.rand(y.shape, generator=g) < 0.05] = 255
    return tree, x, y.to(device)


def _step(row: str, loss: str, tree, backend: str):
    """``run(state)`` of one row: forward + backward from the low-resolution logits."""
    fn = getattr(hss_kernels, loss)

    def run(state):
        x, y = state
        a = x.detach().requires_grad_(True)
        if row == "fused":
            out = fn(a, y, tree, upsample="bilinear", backend=backend)
        elif row == "interpolate + hss":
            up = F.interpolate(a.float() if a.dtype != torch.float64 else a, size=y.shape[-2:], mode="bilinear")
            out = fn(up, y, tree, backend=backend)
        else:
            up = F.interpolate(a, size=y.shape[-2:], mode="bilinear")
            out = F.cross_entropy(up, y, ignore_index=255) if loss == "hierarchical_softmax_loss" else \
                F.binary_cross_entropy_with_logits(up, torch.zeros_like(up))
        out.backward()
        return a.grad
    return run


def _fuses(loss: str, backend: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``backend`` fuses the upsampling of ``loss`` on ``device``: the native kernels (CPU and CUDA)
    and the Triton losses do; a backend whose function lacks ``takes_upsample`` gets interpolated logits."""
    from hss_kernels import backends
    return bool(getattr(backends.resolve(loss, backend, device, dtype), "takes_upsample", False))


def _cpu_peak(cfg: str, loss: str, row: str, dtype: str, backend: str, threads: int) -> Optional[int]:
    """Peak extra resident memory of one CPU step, in a fresh process (see benchmarks/memprobe.py)."""
    from .memprobe import ENV
    req = json.dumps(dict(cfg=cfg, loss=loss, row=row, dtype=dtype, backend=backend, threads=threads))
    done = subprocess.run([sys.executable, "-m", "benchmarks.lowres", "--probe", req], capture_output=True,
                          text=True, env=dict(os.environ, **ENV), timeout=1800,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if done.returncode != 0:
        return None
    value = json.loads(done.stdout.strip().splitlines()[-1])
    return None if value is None else int(value)


def _probe(request: str) -> None:
    r = json.loads(request)
    torch.set_num_threads(r["threads"])
    tree, x, y = _inputs(CONFIGS[r["cfg"]], r["loss"], getattr(torch, r["dtype"]), torch.device("cpu"))
    run = _step(r["row"], r["loss"], tree, r["backend"])
    run((x, y))  # warm-up
    gc.collect()
    if not measure.reset_rss_peak():
        print(json.dumps(None))
        return
    base = measure.rss_now()
    out = run((x, y))
    peak = measure.rss_peak()
    del out
    print(json.dumps(None if base is None or peak is None else peak - base))


def bench(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    info = measure.machine_info(device)
    copy = measure.copy_bandwidth(device)
    results = []
    for name in args.config:
        cfg = CONFIGS[name]
        for loss in args.loss:
            tree, x, y = _inputs(cfg, loss, dtype, device)
            full_bytes = x.shape[0] * x.shape[1] * cfg.full[0] * cfg.full[1] * x.element_size()
            for row in ROWS:
                if row == ROWS[2] and loss != "hierarchical_softmax_loss" and not args.bce_baseline:
                    continue
                run = _step(row, loss, tree, args.backend)
                t = measure.time_pass(lambda i: (x, y), run, device, reps=args.reps)
                if device.type == "cuda":
                    mem = measure.cuda_peak_extra(lambda i: (x, y), run, device)
                elif args.memory:
                    mem = _cpu_peak(name, loss, row, args.dtype, args.backend, torch.get_num_threads())
                else:
                    mem = None
                results.append(dict(config=name, loss=loss, row=row, backend=args.backend,
                                    shape=f"{cfg.batch}x{x.shape[1]}x{cfg.low[0]}x{cfg.low[1]} -> "
                                          f"{cfg.full[0]}x{cfg.full[1]}",
                                    ms=t.median_ms, timing=t.as_dict(), peak_extra_bytes=mem,
                                    full_logits_bytes=full_bytes,
                                    fused=row != "fused" or _fuses(loss, args.backend, device, dtype)))
                print(_line(results[-1]), flush=True)
                gc.collect()
    return dict(machine=info, copy_bandwidth=copy, dtype=args.dtype, command=" ".join(["python -m benchmarks.lowres"] + sys.argv[1:]),
                rows=results)


def _mib(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2**20:.0f}"


def _line(r: dict) -> str:
    return (f"{r['config']:>9} {r['loss']:<26} {r['row']:<31} {r['ms']:9.1f} ms  peak extra {_mib(r['peak_extra_bytes']):>6} MiB"
            f"  (full-res logits {_mib(r['full_logits_bytes'])} MiB){'' if r['fused'] else '  [not fused on this device]'}")


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = [f"# Low-resolution logits: fused upsampling vs interpolate first",
             "", f"{m.get('device_name')}, torch {m.get('torch')}, {m.get('torch_threads')} threads, "
             f"{m.get('date_utc')}, dtype {doc['dtype']}; command: `{doc['command']}`",
             "", f"Load average at the start: {', '.join(f'{v:.2f}' for v in m.get('load_average_start') or [])}; "
             f"copy bandwidth measured in the same run: {doc['copy_bandwidth']['GBps']:.0f} GB/s. "
             "x fused: the row's time over the fused row's.", "",
             "| config | loss | row | shape | ms (fwd+bwd) | x fused | peak extra MiB | full-res logits MiB |",
             "|---|---|---|---|---|---|---|---|"]
    fused = {(r["config"], r["loss"]): r["ms"] for r in doc["rows"] if r["row"] == "fused"}
    for r in doc["rows"]:
        ratio = r["ms"] / fused[(r["config"], r["loss"])] if (r["config"], r["loss"]) in fused else float("nan")
        lines.append(f"| {r['config']} | {r['loss']} | {r['row']}{'' if r['fused'] else ' (not fused here)'} | "
                     f"{r['shape']} | {r['ms']:.1f} | {ratio:.2f} | {_mib(r['peak_extra_bytes'])} | "
                     f"{_mib(r['full_logits_bytes'])} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.lowres", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None,
                   help=f"comma-separated among {sorted(CONFIGS)} (default: cpu on the CPU, the four Vistas ones on a GPU)")
    p.add_argument("--loss", default="hierarchical_softmax_loss",
                   help=f"comma-separated among {list(LOSSES)} (default: hierarchical_softmax_loss)")
    p.add_argument("--backend", default="auto", help="the hss backend of the fused and interpolate + hss rows")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--reps", type=int, default=None, help="timed repetitions (default: as many as fit in ~1 s)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the CPU memory probes")
    p.add_argument("--bce-baseline", action="store_true",
                   help="also time F.interpolate + F.binary_cross_entropy_with_logits for the node losses")
    p.add_argument("--out", help="folder for lowres-<device>-<date>.json and .md")
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.probe:
        _probe(args.probe)
        return 0
    cuda = args.device.startswith("cuda")
    args.config = (args.config.split(",") if args.config else
                   (["vistas4", "vistas8", "vistas2_4", "vistas2_8"] if cuda else ["cpu"]))
    args.loss = args.loss.split(",")
    for c in args.config:
        if c not in CONFIGS:
            p.error(f"unknown --config {c!r}; choose among {sorted(CONFIGS)}")
    for loss in args.loss:
        if loss not in LOSSES:
            p.error(f"unknown --loss {loss!r}; choose among {list(LOSSES)}")
    doc = bench(args)
    md = markdown(doc)
    print(md)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        day = datetime.date.today().isoformat()
        stem = os.path.join(args.out, f"lowres-{measure.device_slug(doc['machine'])}-{day}")
        with open(stem + ".json", "w") as f:
            json.dump(doc, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(md)
        print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
