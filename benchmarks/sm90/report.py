"""The model's output: the assumptions block of sm90.json and the Markdown table."""
from __future__ import annotations

import datetime
from collections import Counter
import platform
from pathlib import Path
from typing import Dict, List

from . import model, source, tools

__all__ = ["assumptions", "markdown", "dated_name"]


def assumptions(ctx: "model.Context") -> Dict[str, object]:
    import torch

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "missing"
    a = dict(model.ASSUMPTIONS)
    B, H, W = model.SHAPE
    a.update({
        "issue_rate": "warp-instructions / (warp_instructions_per_clock_per_sm x sms x clock)",
        "shape": {"B": B, "H": H, "W": W, "P": B * H * W},
        "trees": {op: {"tree": t, "channels": c, **{k: round(v, 4) for k, v in
                                                    source.tree_variables(ctx.tree(t)).items()}}
                  for op, (t, c) in model.OPS.items()},
        "calls": "the public API's defaults: reduction='mean', eps=0, ignore_index=255; tree_min gamma=2, "
                 "tree_bce gamma=0; decode activation='sigmoid', score='sum'; labels uniform over the leaves",
        "floor": {f"{op} {p}": f for (op, p), f in model.FLOOR_FORMULAS.items()},
        "floor_upsampled": {f"{op} {p}": f for (op, p), f in model.UP_FLOOR_FORMULAS.items()},
        "floor_note": "P pixels (of the labels), C channels (leaves or nodes), b bytes per logit, D tree depth; "
                      "upsampled rows (factor s): logits and their gradient at p = P / s² pixels; the loss partials "
                      "and the statistics' reduction are not counted",
        "upsample": "factor s > 1: logits (B, C, H / s, W / s), upsample='bilinear', align_corners=False, labels "
                    "(B, H, W); rows only for the kernels that fuse it (Triton: the registry function's "
                    "takes_upsample; CUDA: cuda_side.FUSED_UPSAMPLE); SASS/elt per label pixel and channel",
        "versions": {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(),
                     **tools.versions()},
        "line_table_repairs": {k: {"renamed": v[0], "unresolved": v[1]} for k, v in ctx.repairs.items() if any(v)},
    })
    return a


def _f(x, digits=3) -> str:
    if x is None:
        return "–"
    if isinstance(x, float):
        if x == int(x):
            return f"{int(x):,}"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        if abs(x) >= 10:
            return f"{x:.1f}" if digits > 2 else f"{x:.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def markdown(doc: dict) -> str:
    a = doc["assumptions"]
    rows: List[dict] = doc["kernels"]
    out = [
        "# Static model of the GPU kernels (sm_90)",
        "",
        f"{a['gpu']}: {a['sms']} SMs at {a['clock_ghz']} GHz issuing {a['warp_instructions_per_clock_per_sm']} "
        f"warp-instructions per clock per SM; memory floor at {a['bandwidth_tb_s']} TB/s. B = {a['shape']['B']}, "
        f"{a['shape']['H']}×{a['shape']['W']} (P = {a['shape']['P']:,} pixels). Computed on the CPU from the "
        "compiled code: see benchmarks/results/README.md for what it can and cannot see. up: the upsampling "
        f"factor s, logits at {a['shape']['H']}/s × {a['shape']['W']}/s fused-upsampled to the labels' size (– "
        "for logits at the labels' size).",
        "",
        "| op | backend | dtype | pass | layout | up | regs | spill B | smem B | load bits | SASS/elt | issue ms | "
        "MUFU ms | floor ms | issue/floor | |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        flag = "**issue-bound**" if r["issue_bound"] else ""
        if r["meets_targets"]:
            flag = "meets targets"
        up = r.get("upsample", 1)
        out.append(f"| {r['op']} | {r['backend']} | {r['dtype']} | {r['pass']} | {r['layout']} | "
                   f"{up if up > 1 else '–'} | {_f(r['registers'])} | {_f(r['spill_bytes'])} | {_f(r['shared_bytes'])} | "
                   f"{_f(r['global_load_bits'])} | {_f(r['sass_per_element'])} | {_f(r['issue_ms'])} | "
                   f"{_f(r.get('mufu_ms'))} | "
                   f"{_f(r['floor_ms'])} | {_f(r['ratio'], 2)} | {flag} |")
    out += [
        "",
        "Targets of the kernel rewrite, per row: issue ms ≤ 0.8 × floor ms (≤ 1.0 × for tree_min), MUFU ms ≤ "
        "floor ms, no spills, 128-bit loads of the logits (\"meets targets\"). SASS/elt: instructions issued per "
        "thread × threads launched / (P × C). MUFU ms: the special-function unit's own bound "
        f"({a.get('mufu_warp_instructions_per_clock_per_sm', 0.5)} MUFU warp-instructions per clock per SM: ex2, "
        "lg2, rcp, ...); a row whose MUFU ms passes its floor is compute-bound there even when its issue time is "
        "not.",
        "",
        "Floors (bytes the pass must move): " + "; ".join(f"{k}: {v}" for k, v in a["floor"].items()) + ".",
        "",
        "Floors with fused upsampling (up = s; p = P / s² low-resolution pixels; SASS/elt per label pixel and "
        "channel): " + "; ".join(f"{k}: {v}" for k, v in a.get("floor_upsampled", {}).items()) + ".",
        "",
        "## Where the instructions go",
        "",
    ]
    seen = set()
    for r in rows:
        up = r.get("upsample", 1)
        key = (r["op"], r["backend"], r["pass"], up)
        if key in seen or r["dtype"] != "float32" or r["layout"] != "nchw":
            continue
        seen.add(key)
        parts = []
        lines = Counter(lp["line"] for lp in r["loops"] if lp["per_thread"] > 0)
        for lp in r["loops"]:
            if lp["per_thread"] <= 0:
                continue
            share = lp["per_thread"] / r["instructions_per_thread"] if r["instructions_per_thread"] else 0
            site = lp.get("inlined_at") or []
            # a loop inlined at several call sites: the first two sites tell the copies apart
            where = lp["line"] + (" at " + " < ".join(x.rsplit("/", 1)[-1] for x in site[:2])
                                  if lines[lp["line"]] > 1 and site else "")
            parts.append(f"{where} ×{_f(lp['trips'])}" + (f" (unrolled ×{lp['unroll']})" if lp["unroll"] > 1 else "")
                         + f": {_f(lp['body'])}/iteration, {share:.0%}")
        out.append(f"- {r['op']} {r['backend']} {r['pass']} (float32, nchw{f', up {up}' if up > 1 else ''}): "
                   f"{_f(r['instructions_per_thread'])} "
                   f"instructions per thread, {r['threads']:,} threads; loops: " + ("; ".join(parts) or "none"))
    if doc.get("not_fused"):
        out += ["", "## Not fused", "",
                "Upsampled rows asked for whose kernels do not fuse the upsampling (the public API interpolates "
                "the logits first there, then runs the rows above at the labels' size):", ""]
        out += [f"- {n['rows']}: {n['reason']}" for n in doc["not_fused"]]
    warnings = sorted({w for r in rows for w in r["warnings"]})
    if warnings or doc.get("failures"):
        out += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
        out += [f"- FAILED {f['row']}: {f['error']}" for f in doc.get("failures", [])]
    v = a["versions"]
    out += ["", f"Tools: {', '.join(f'{k} {x}' for k, x in v.items())}.", ""]
    return "\n".join(out)


def dated_name(folder: Path) -> str:
    base = f"sm90-{datetime.date.today().isoformat()}"
    name, n = base, 1
    while (folder / f"{name}.json").exists():
        n += 1
        name = f"{base}-{n}"
    return name
