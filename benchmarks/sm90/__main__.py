"""``python -m benchmarks.sm90``: the static model of every GPU kernel, computed on the CPU (see
:mod:`benchmarks.sm90`)."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional, Sequence

from . import model, report, tools
from .sass import SassError
from .source import ROOT


def _csv(text: str, allowed: Sequence[str], what: str) -> List[str]:
    out = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in out if p not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(bad)}; choose from {', '.join(allowed)}")
    return out


def _factors(text: str) -> List[int]:
    out = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        try:
            s = int(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"upsampling factor {part!r} is not an integer") from None
        B, H, W = model.SHAPE
        if s < 1 or H % s or W % s:
            raise argparse.ArgumentTypeError(f"upsampling factor {s} must be a positive divisor of {H} and {W}")
        out.append(s)
    if not out:
        raise argparse.ArgumentTypeError("no upsampling factor")
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.sm90",
        description="Static model of the GPU kernels on an H100 (sm_90), computed without a GPU: compiles every "
                    "Triton and CUDA kernel variant for sm_90 as the runtime and setup.py would, reads registers, "
                    "spills, shared memory and the logits' load width from the cubins, counts the SASS "
                    "instructions each thread issues per launch (loop bodies times the trip counts annotated in "
                    "the kernel sources), and compares the issue-bound time with the memory floor. Writes "
                    "DIR/sm90.json and DIR/sm90.md and prints the table.",
        epilog="Rows: B=8, 1024x1024; hierarchical_softmax on the vistas tree (66 leaves), tree_min, tree_bce "
               "and decode on vistas_v2 (147 nodes); with --upsample s > 1 the logits are 1024/s x 1024/s (fused "
               "bilinear upsampling; rows only for the kernels that fuse it). issue_ms = warp-instructions / (4 per "
               "clock per SM x 132 SMs x 1.755 GHz); floor_ms = bytes the pass must move (docs/MATH.md §5.6, §6.5) "
               "/ 3.0 TB/s. The CUDA "
               "rows need nvcc (CUDA_HOME, default /usr/local/cuda-13.0) and the cu130 venv of .ci/cuda-venv "
               "(created on first use, about 5 GB); compiled code is cached (HSS_SM90_CACHE, default "
               "~/.cache/hss_kernels/sm90). See benchmarks/results/README.md for how to read the output.")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                   help="folder for sm90.json and sm90.md (default: benchmarks/results)")
    p.add_argument("--dated", action="store_true",
                   help="also write sm90-<date>.json/.md there (-2, -3, ... for later runs the same day)")
    p.add_argument("--op", default=",".join(model.OPS), type=lambda t: _csv(t, list(model.OPS), "op"),
                   help="ops, comma-separated (default: all): " + ", ".join(model.OPS))
    p.add_argument("--backend", default=",".join(model.BACKENDS),
                   type=lambda t: _csv(t, model.BACKENDS, "backend"), help="triton, cuda (default: both)")
    p.add_argument("--dtype", default=",".join(model.DTYPES), type=lambda t: _csv(t, list(model.DTYPES), "dtype"),
                   help="float32, bfloat16 (default: both)")
    p.add_argument("--pass", dest="passes", default=",".join(model.PASSES),
                   type=lambda t: _csv(t, model.PASSES, "pass"), help="forward, backward (default: both)")
    p.add_argument("--layout", default=",".join(model.LAYOUTS), type=lambda t: _csv(t, model.LAYOUTS, "layout"),
                   help="nchw, channels_last (default: both)")
    p.add_argument("--upsample", default=",".join(map(str, model.UPSAMPLE)), type=_factors,
                   help="upsampling factors, comma-separated (default: %(default)s): 1, logits at the labels' size; "
                        "s > 1, logits at 1/s of it in each axis (B, C, 1024/s, 1024/s) through "
                        "upsample=\"bilinear\", modelled for the kernels that fuse it (the others are listed as "
                        "not fused)")
    p.add_argument("--weights", choices=model.WEIGHTS, default="none",
                   help="class_weight / pixel_weight the loss rows pass (default: none): model the Triton kernels "
                        "with the weights fused in (the floor counts a float32 pixel weight per pixel); Triton "
                        "rows only, not with --update")
    p.add_argument("--force", action="store_true", help="recompile everything (ignore the cache)")
    p.add_argument("--cache", type=Path, default=None, help="cache folder (default: $HSS_SM90_CACHE or "
                                                             "~/.cache/hss_kernels/sm90)")
    p.add_argument("--unannotated", choices=("error", "warn"), default="error",
                   help="a SASS loop without an 'sm90: trips=' annotation in its source: fail (default) or "
                        "count it once per entry and list a warning")
    p.add_argument("--listing", type=Path, default=None, metavar="DIR",
                   help="write each kernel's SASS with the executions per thread the model counts for every "
                        "instruction (the way to check the model)")
    p.add_argument("--jobs", type=int, default=2, help="nvcc processes at a time (default 2)")
    p.add_argument("--update", action="store_true",
                   help="replace only the selected rows of the existing OUT/sm90.json (the others kept as they "
                        "were modelled), for re-running a few kernels without compiling all of them")
    p.add_argument("--no-write", action="store_true", help="print the table only")
    return p


def _row_key(row: dict) -> tuple:
    return (row["op"], row["backend"], row["dtype"], row["pass"], row["layout"], row.get("upsample", 1))


def _updated(args, rows: List[dict], not_fused: dict):
    """``--update``: this run's rows and not-fused notes in place of the same rows of ``OUT/sm90.json``, the
    rows it did not select kept as they are, in the model's order."""
    path = args.out / "sm90.json"
    if not path.is_file():
        raise SystemExit(f"benchmarks.sm90: --update needs an existing {path}")
    old = json.loads(path.read_text())
    selected = set(model.selection(args.op, args.backend, args.dtype, args.passes, args.layout, args.upsample))
    fresh = {_row_key(r): r for r in rows}
    kept = {_row_key(r): r for r in old["kernels"] if _row_key(r) not in selected}
    order = {k: i for i, k in enumerate(model.selection(list(model.OPS), model.BACKENDS, list(model.DTYPES),
                                                         model.PASSES, model.LAYOUTS, model.UPSAMPLE))}
    merged = sorted({**kept, **fresh}.values(), key=lambda r: order.get(_row_key(r), len(order)))
    done = {(op, b, p) for op, b, _, p, _, _ in selected}
    notes = {n["rows"]: n["reason"] for n in old.get("not_fused", [])
             if tuple(n["rows"].split()) not in done}
    return merged, {**notes, **not_fused}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.weights != "none" and (args.backend != ["triton"] or args.update):
        parser.error("--weights models the Triton rows only (--backend triton), and not with --update (the rows "
                     "of sm90.json are unweighted)")
    os.environ.pop("TRITON_INTERPRET", None)
    start = time.time()
    cache = args.cache or tools.cache_dir()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    ctx = model.Context(cache, args.force, args.unannotated, args.jobs, log, args.listing, args.weights)
    rows, failures, not_fused = [], [], {}
    selected = model.selection(args.op, args.backend, args.dtype, args.passes, args.layout, args.upsample)
    try:
        ctx.prefetch_cuda(selected)
    except (SassError, tools.ToolMissing) as exc:  # each CUDA row reports it below
        log(f"  CUDA kernels not disassembled up front: {exc}")
    for op, backend, dtype, pass_, layout, up in selected:
        tag = f"{op} {backend} {dtype} {pass_} {layout}" + (f" upsample {up}" if up > 1 else "")
        try:
            fn = ctx.triton_row if backend == "triton" else ctx.cuda_row
            rows.append(fn(op, dtype, pass_, layout, up).as_dict())
            log(f"  {tag}: {rows[-1]['issue_ms']:.3g} ms issue, {rows[-1]['floor_ms']:.3g} ms floor")
        except model.NotFused as exc:  # one line per backend, op and pass in the report
            not_fused.setdefault(f"{op} {backend} {pass_}", str(exc))
        except (SassError, tools.ToolMissing) as exc:
            failures.append((tag, f"{type(exc).__name__}: {exc}"))
            log(f"  {tag}: FAILED: {exc}")
    if args.update:
        rows, not_fused = _updated(args, rows, not_fused)
    doc = {
        "assumptions": report.assumptions(ctx),
        "kernels": rows,
        "failures": [{"row": t, "error": e} for t, e in failures],
        "not_fused": [{"rows": k, "reason": v} for k, v in not_fused.items()],
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.sm90 " + " ".join(argv if argv is not None else sys.argv[1:]),
        "seconds": {**{k: round(v, 1) for k, v in ctx.seconds.items()}, "total": round(time.time() - start, 1)},
    }
    text = report.markdown(doc)
    print(text)
    if not args.no_write:
        args.out.mkdir(parents=True, exist_ok=True)
        names = ["sm90"]
        if args.dated:
            names.append(report.dated_name(args.out))
        for name in names:
            (args.out / f"{name}.json").write_text(json.dumps(doc, indent=1) + "\n")
            (args.out / f"{name}.md").write_text(text)
        log(f"wrote {', '.join(str(args.out / n) + '.json/.md' for n in names)}")
    for tag, err in failures:
        log(f"FAILED {tag}: {err}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
