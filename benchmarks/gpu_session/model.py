"""The static sm_90 model's estimates beside the times measured in this session.

The model (``python -m benchmarks.sm90``, committed as ``benchmarks/results/sm90*.json``) gives per kernel
``{"op", "backend", "dtype", "pass", "layout", "issue_ms", "floor_ms", ...}``. A benchmark row
(configuration, loss, backend, pass) matches the model's kernels of the same op, dtype and pass in the
NCHW layout with the logits at the labels' size (``upsample`` 1 or absent), where the benchmark's ``native`` (on CUDA) is the model's ``cuda`` and ``triton`` is
``triton``; the configurations the model was made for are ``vistas`` (hierarchical softmax) and
``vistas2`` (tree-min, tree BCE, decode). A pass's estimate is the sum over its kernels; a
forward+backward row's is the forward's plus the backward's.
"""
from __future__ import annotations

import glob
import json
import os
import re
from typing import Dict, List, Optional, Tuple

MODEL_CONFIGS = {"vistas": ("hierarchical_softmax",), "vistas2": ("tree_min", "tree_bce", "decode")}
MODEL_BACKEND = {"native": "cuda", "triton": "triton"}
LAYOUT = "nchw"


def _natural(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def newest_model_json(results_dir: str) -> Optional[str]:
    """The newest ``sm90*.json`` in ``results_dir`` by the date and counter in its name (``sm90-2026-12-01.json``
    < ``sm90-2026-12-01-2.json`` < ``sm90-2026-12-02.json``), or None."""
    found = [p for p in glob.glob(os.path.join(results_dir, "sm90*.json")) if os.path.isfile(p)]
    if not found:
        return None

    def key(p):
        stem = os.path.basename(p)[:-5]
        m = re.match(r"^sm90-?(\d{4}-\d{2}-\d{2})?(?:-(\d+))?", stem)
        date = m.group(1) or "" if m else ""
        n = int(m.group(2)) if m and m.group(2) else 1
        return (date, n, _natural(stem))
    return max(found, key=key)


def _num(v) -> Optional[float]:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _sum(vals: List[Optional[float]]) -> Optional[float]:
    return None if not vals or any(v is None for v in vals) else sum(vals)


def compare(bench: dict, model: dict, model_name: str = "") -> dict:
    """Rows ``{config, loss, backend, pass, dtype, median_ms, model_backend, model_issue_ms,
    model_floor_ms, model_kernels, measured_over_floor, measured_over_issue}`` for every benchmark row
    that has a model estimate, and the benchmark rows the model has nothing for (``unmatched``)."""
    index: Dict[Tuple[str, str, str, str, str], List[dict]] = {}
    for k in model.get("kernels", []):
        if (k.get("upsample") or 1) != 1:  # fused-upsampling rows: the benchmark's rows are at the labels' size
            continue
        key = (k.get("op"), k.get("backend"), k.get("dtype"), k.get("pass"), str(k.get("layout", "")).lower())
        index.setdefault(key, []).append(k)
    rows, unmatched = [], []
    for cfg in bench.get("configs", []):
        ops = MODEL_CONFIGS.get(cfg.get("name"))
        if not ops:
            continue
        for r in cfg.get("rows", []):
            if r.get("status") != "ok" or r.get("loss") not in ops or r.get("backend") not in MODEL_BACKEND:
                continue
            mb = MODEL_BACKEND[r["backend"]]
            passes = ["forward", "backward"] if r["pass"] == "forward+backward" else [r["pass"]]
            per_pass = {p: index.get((r["loss"], mb, cfg.get("dtype"), p, LAYOUT), []) for p in passes}
            missing = [p for p, ks in per_pass.items() if not ks]
            base = {"config": cfg["name"], "loss": r["loss"], "backend": r["backend"], "pass": r["pass"],
                    "dtype": cfg.get("dtype"), "median_ms": r.get("median_ms"), "model_backend": mb}
            if missing:
                unmatched.append(dict(base, missing_model_passes=missing))
                continue
            kernels = [k for ks in per_pass.values() for k in ks]
            issue = _sum([_num(k.get("issue_ms")) for k in kernels])
            floor = _sum([_num(k.get("floor_ms")) for k in kernels])
            med = _num(r.get("median_ms"))
            rows.append(dict(base, model_issue_ms=issue, model_floor_ms=floor, model_kernels=len(kernels),
                             measured_over_floor=None if not (med and floor) else med / floor,
                             measured_over_issue=None if not (med and issue) else med / issue))
    return {"source": model_name, "assumptions": model.get("assumptions"), "rows": rows, "unmatched": unmatched,
            "rule": "native ↔ cuda, triton ↔ triton; vistas ↔ hierarchical_softmax, vistas2 ↔ tree_min/tree_bce/"
                    "decode; NCHW; forward+backward = forward + backward; a pass = the sum of its kernels"}


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)
