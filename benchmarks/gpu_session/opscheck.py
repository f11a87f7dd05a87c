"""After the build: is every op of the ``hss_kernels::`` namespace registered for a dispatch key?

    python -m benchmarks.gpu_session.opscheck --key CUDA --json ops.json

Imports ``hss_kernels`` from this tree (and fails if another copy is imported), lists the ops its
extension defines and asks the dispatcher whether each has a kernel for ``--key`` (CUDA on the GPU
machine; CPU in the dry run). Exit status 1 when the extension is missing, defines no op, or an op has
no kernel for the key.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def check(key: str) -> dict:
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import torch

    import hss_kernels
    from hss_kernels import native

    res = {"key": key, "package": os.path.dirname(os.path.abspath(hss_kernels.__file__)), "ok": False}
    if os.path.realpath(res["package"]) != os.path.realpath(os.path.join(ROOT, "hss_kernels")):
        res["error"] = f"imported hss_kernels from {res['package']}, not from this tree ({ROOT})"
        return res
    if native._C is None:
        res["error"] = native._REASON
        return res
    res["library"] = getattr(native._C, "__file__", None)
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("hss_kernels::"))
    res["ops"] = ops
    res["missing"] = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, key)]
    if not ops:
        res["error"] = "the extension registers no hss_kernels:: ops"
    elif res["missing"]:
        res["error"] = f"no {key} kernel for {', '.join(res['missing'])}"
    else:
        res["ok"] = True
    if key == "CUDA":
        res["native_cuda_unavailable_reason"] = native.unavailable_reason("cuda")
    return res


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session.opscheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--key", default="CUDA", help="dispatch key (default CUDA)")
    p.add_argument("--json", help="also write the result here")
    a = p.parse_args(argv)
    res = check(a.key)
    if a.json:
        with open(a.json, "w", encoding="utf-8") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res, indent=1))
    if res["ok"]:
        print(f"opscheck: {a.key} kernels registered for {', '.join(res['ops'])}")
    else:
        print(f"opscheck: FAILED: {res.get('error')}", file=sys.stderr)
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
