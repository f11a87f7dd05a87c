"""Peak extra memory of CPU rows, measured in a fresh process.

On the CPU there is no allocator statistic like ``torch.cuda.max_memory_allocated`` (torch's CPU
allocator does not cache, and ``tracemalloc`` does not see it), so the honest figure is the process's
resident high-water mark. It is only meaningful in a process whose allocator returns freed memory to
the system: this module is run as a subprocess with glibc's ``MALLOC_MMAP_THRESHOLD_`` fixed at
64 KiB (which also turns off glibc's adaptive threshold), so every tensor buffer is its own mapping,
mapped on allocation and unmapped on free. Per row: one warm-up call (compilation, thread pools), then
the high-water mark is reset (``/proc/self/clear_refs``), and the peak extra memory is
``VmHWM - VmRSS`` across one call. Linux only; elsewhere the rows report None.

Protocol: a JSON request on stdin, a JSON list of results on stdout.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from typing import List, Optional

ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}
METHOD = ("CPU: resident high-water mark (VmHWM after a reset) minus resident size before the call, in a fresh "
          "process with glibc's mmap threshold fixed at 64 KiB so that freed tensors leave the resident set")


def probe(request: dict, timeout: float = 1800.0) -> List[dict]:
    """Run the probe in a subprocess; returns one dict per requested case (``peak_extra_bytes`` or
    ``error``). Never raises for a failing probe: its error is in every result."""
    cases = request["cases"]
    if not sys.platform.startswith("linux"):
        return [{"error": "peak memory on the CPU needs Linux /proc"} for _ in cases]
    env = dict(os.environ, **ENV)
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.memprobe"], input=json.dumps(request),
                              capture_output=True, text=True, env=env, timeout=timeout,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    except subprocess.TimeoutExpired:
        return [{"error": "memory probe timed out"} for _ in cases]
    if done.returncode != 0:
        tail = (done.stderr or "").strip().splitlines()[-1:] or ["no output"]
        return [{"error": f"memory probe failed: {tail[0]}"} for _ in cases]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _measure(case) -> Optional[int]:
    from .measure import reset_rss_peak, rss_now, rss_peak

    out = case.run(case.setup(0))  # warm-up
    del out
    gc.collect()
    state = case.setup(0)
    gc.collect()
    if not reset_rss_peak():
        return None
    base = rss_now()
    out = case.run(state)
    peak = rss_peak()
    del out, state
    gc.collect()
    if base is None or peak is None:
        return None
    return max(0, peak - base)


def main() -> int:
    import torch

    from . import cases as C

    req = json.loads(sys.stdin.read())
    if req.get("threads"):
        torch.set_num_threads(int(req["threads"]))
    device = torch.device("cpu")
    dtype = getattr(torch, req["dtype"])
    tree = C.random_tree(req["random_tree_leaves"]) if req.get("random_tree_leaves") else C.load_tree(req["tree"])
    results = []
    by_loss = {}
    for loss, backend, pass_name in req["cases"]:
        by_loss.setdefault(loss, []).append((backend, pass_name))
    found = {}
    for loss, items in by_loss.items():
        spec = C.LOSSES[loss]
        torch.manual_seed(0)
        sets = C.make_inputs(spec, tree, req["batch"], req["height"], req["width"], dtype, device, 1,
                             need_dense_target="binary" in spec.baseline, weights=req.get("weights", "none"))
        fns = {}
        for backend, pass_name in items:
            try:
                if backend not in fns:
                    fns[backend] = C._call(spec, tree, backend, req.get("weights", "none"))
                case = C.build_case(spec, tree, backend, pass_name, sets, fns[backend], req.get("weights", "none"))
                found[(loss, backend, pass_name)] = {"peak_extra_bytes": _measure(case)}
            except Exception as exc:  # report, keep going
                found[(loss, backend, pass_name)] = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
        del sets, fns
        gc.collect()
    for loss, backend, pass_name in req["cases"]:
        results.append(found[(loss, backend, pass_name)])
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
