"""Which backend ``backend="auto"`` runs on a CUDA device, per op and dtype (``hss_kernels/gpu_auto.json``).

    python -m benchmarks.auto_choice            # print the choice, its figures and where they come from
    python -m benchmarks.auto_choice --write    # rewrite hss_kernels/gpu_auto.json (then commit it)

The figures come from what is committed under ``benchmarks/results/``:

* **measured** (preferred): the newest ``python -m benchmarks`` JSON run on a CUDA device that timed an op in a
  dtype for both the Triton and the native backend: the median ms of ``forward+backward`` (``forward``
  for decode), whatever the configuration (the GPU session times vistas for the hierarchical softmax
  and vistas2 for the rest);
* **model** otherwise: the static sm_90 model (``sm90.json``, :mod:`benchmarks.sm90`): per backend, the sum
  over the passes of ``max(issue_ms, floor_ms)`` on NCHW logits at the labels' size (no kernel runs faster
  than it can issue its instructions or move its bytes; the fused-upsampling rows are left out); the
  model's ``cuda`` rows are the native backend.

The backend with the smaller figure comes first. float64 follows the float32 choice and float16 the
bfloat16 one unless measured itself. A test checks that the committed ``gpu_auto.json`` is what this
module computes from the committed results, so a new GPU run or model run must be followed by
``--write``.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from typing import Dict, List, Optional, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "benchmarks", "results")
OUT = os.path.join(ROOT, "hss_kernels", "gpu_auto.json")

# benchmark loss / model op → the registry's op name
OPS = {"hierarchical_softmax": "hierarchical_softmax_loss", "tree_min": "tree_min_loss",
       "tree_bce": "tree_bce_loss", "decode": "decode"}
BACKENDS = ("triton", "native")


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def measured(results: str = RESULTS) -> Dict[Tuple[str, str], Tuple[Dict[str, float], str]]:
    """(op, dtype) → ({backend: median ms}, source file) from the newest CUDA benchmark timing both backends."""
    found: Dict[Tuple[str, str], Tuple[str, Dict[str, float], str]] = {}
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        try:
            doc = json.load(open(path))
        except (OSError, ValueError):
            continue
        meta = doc.get("meta") if isinstance(doc, dict) else None
        if not isinstance(meta, dict) or meta.get("device_type") != "cuda":
            continue
        date = str(meta.get("date_utc", ""))
        for cfg in doc.get("configs", []):
            dtype = cfg.get("dtype")
            times: Dict[str, Dict[str, float]] = {}
            for row in cfg.get("rows", []):
                loss, backend = row.get("loss"), row.get("backend")
                want = "forward" if loss == "decode" else "forward+backward"
                if (loss in OPS and backend in BACKENDS and row.get("pass") == want and row.get("status") == "ok"
                        and not row.get("interpreter")):
                    times.setdefault(OPS[loss], {})[backend] = float(row["median_ms"])
            for op, t in times.items():
                if len(t) == len(BACKENDS) and (found.get((op, dtype)) is None or date >= found[(op, dtype)][0]):
                    found[(op, dtype)] = (date, t, _rel(path))
    return {k: (t, src) for k, (_, t, src) in found.items()}


def modelled(path: Optional[str] = None) -> Tuple[Dict[Tuple[str, str], Dict[str, float]], Optional[str]]:
    """(op, dtype) → {backend: estimated ms} from the static model's newest JSON, and its path."""
    path = path or os.path.join(RESULTS, "sm90.json")
    if not os.path.exists(path):
        return {}, None
    est: Dict[Tuple[str, str], Dict[str, float]] = {}
    for row in json.load(open(path))["kernels"]:
        if row["layout"] != "nchw" or row["op"] not in OPS or (row.get("upsample") or 1) != 1:
            continue
        backend = "native" if row["backend"] == "cuda" else row["backend"]
        per = est.setdefault((OPS[row["op"]], row["dtype"]), {})
        per[backend] = per.get(backend, 0.0) + max(float(row["issue_ms"]), float(row["floor_ms"]))
    return est, _rel(path)


def choose(results: str = RESULTS, model_path: Optional[str] = None) -> dict:
    """The document written to ``gpu_auto.json``."""
    meas = measured(results)
    model, model_src = modelled(model_path)
    ops: Dict[str, Dict[str, dict]] = {}
    for key in sorted(set(meas) | set(model)):
        op, dtype = key
        if key in meas:
            ms, source = meas[key][0], f"measured: {meas[key][1]}"
        else:
            ms, source = model[key], f"model: {model_src}"
        if not all(b in ms for b in BACKENDS):
            continue
        order: List[str] = sorted(BACKENDS, key=lambda b: (ms[b], BACKENDS.index(b)))
        ops.setdefault(op, {})[dtype] = {"order": order, "ms": {b: round(ms[b], 4) for b in BACKENDS},
                                         "source": source}
    return {"generated_by": "python -m benchmarks.auto_choice --write",
            "rule": "the backend with the smaller forward+backward time (decode: forward) on a CUDA device comes "
                    "first: measured medians when a CUDA benchmark is committed, else the static sm_90 model's "
                    "max(issue, floor) per pass, NCHW, B=8 1024x1024",
            "ops": ops}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.auto_choice", description=__doc__.split("\n\n")[0])
    p.add_argument("--write", action="store_true", help=f"rewrite {_rel(OUT)}")
    a = p.parse_args(argv)
    doc = choose()
    for op, per in doc["ops"].items():
        for dtype, c in per.items():
            figures = ", ".join(f"{b} {c['ms'][b]:.3g} ms" for b in c["order"])
            print(f"{op:26s} {dtype:9s} auto = {c['order'][0]:7s} ({figures}; {c['source']})")
    if a.write:
        with open(OUT, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.write("\n")
        print(f"wrote {_rel(OUT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
