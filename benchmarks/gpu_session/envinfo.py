"""The environment stage: GPU, driver, clocks and versions, as found (nothing is changed).

    python -m benchmarks.gpu_session.envinfo --json environment.json [--require-gpu]

Writes ``{"device": {...}, "versions": {...}}`` and prints it. Missing tools are recorded, not fatal;
with ``--require-gpu`` the exit status is 1 when torch sees no CUDA device.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Optional

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# nvidia-smi --query-gpu fields; an unknown field fails the whole query, so there is a short fallback.
SMI_FIELDS = ["name", "driver_version", "memory.total", "memory.used", "clocks.sm", "clocks.mem", "clocks.max.sm",
              "clocks.max.mem", "temperature.gpu", "power.draw", "power.limit", "pstate", "compute_mode",
              "persistence_mode", "pci.bus_id"]
SMI_FALLBACK = ["name", "driver_version", "memory.total"]
# The sources whose hash identifies the tree when it carries no .git.
SOURCE_GLOBS = ["setup.py", "pyproject.toml", "hss_kernels/**/*.py", "csrc/**/*.h", "csrc/**/*.cpp", "csrc/**/*.cu",
                "csrc/**/*.cuh", "benchmarks/**/*.py", "tests/**/*.py", "trees/*"]


def _run(cmd, timeout=20.0) -> tuple:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return p.returncode, (p.stdout or "") + (p.stderr or "")
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{type(exc).__name__}: {exc}"


def find_cuda_home() -> Optional[str]:
    """The CUDA toolkit folder: $CUDA_HOME or $CUDA_PATH, the folder of the nvcc on PATH (following a
    wrapper script whose exec line names the real one), or /usr/local/cuda; None if there is none."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        v = os.environ.get(var)
        if v and os.path.isfile(os.path.join(v, "bin", "nvcc")):
            return v
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        home = os.path.dirname(os.path.dirname(real))
        if os.path.isdir(os.path.join(home, "include")) and os.path.isfile(os.path.join(home, "include", "cuda.h")):
            return home
        try:  # a wrapper script: exec /usr/local/cuda-13.0/bin/nvcc "$@"
            with open(real, "r", errors="replace") as f:
                m = re.search(r"exec\s+(\S+)/bin/nvcc", f.read(4096))
            if m and os.path.isfile(os.path.join(m.group(1), "bin", "nvcc")):
                return m.group(1)
        except OSError:
            pass
    for cand in ["/usr/local/cuda"] + sorted(glob.glob("/usr/local/cuda-*"), reverse=True):
        if os.path.isfile(os.path.join(cand, "bin", "nvcc")):
            return cand
    return None


def find_tool(name: str) -> Optional[str]:
    """A CUDA tool on PATH, under the toolkit, /usr/local/cuda/bin, or a compute-sanitizer folder."""
    found = shutil.which(name)
    if found:
        return found
    homes = [h for h in (find_cuda_home(), "/usr/local/cuda") if h]
    cands = [os.path.join(h, "bin", name) for h in homes] + [os.path.join(h, name, name) for h in homes]
    cands += sorted(glob.glob(f"/usr/local/cuda*/bin/{name}")) + sorted(glob.glob(f"/opt/nvidia/*/{name}"))
    for c in cands:
        if os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def source_hash(root: str = ROOT) -> str:
    """sha256 (16 hex digits) over the sources' relative paths and contents."""
    h = hashlib.sha256()
    paths = sorted({p for g in SOURCE_GLOBS for p in glob.glob(os.path.join(root, g), recursive=True)
                    if os.path.isfile(p) and "__pycache__" not in p})
    for p in paths:
        h.update(os.path.relpath(p, root).encode() + b"\0")
        with open(p, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def git_info(root: str = ROOT) -> dict:
    if not os.path.exists(os.path.join(root, ".git")):
        return {"git_commit": None, "git_note": "no .git in this copy of the tree"}
    rc, out = _run(["git", "-C", root, "rev-parse", "HEAD"], 10)
    if rc != 0:
        return {"git_commit": None, "git_note": out.strip()[:200]}
    rc2, status = _run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"], 10)
    rc3, branch = _run(["git", "-C", root, "rev-parse", "--abbrev-ref", "HEAD"], 10)
    return {"git_commit": out.strip(), "git_branch": branch.strip() if rc3 == 0 else None,
            "git_dirty": bool(status.strip()) if rc2 == 0 else None}


def nvidia_smi() -> dict:
    smi = shutil.which("nvidia-smi")
    if not smi:
        return {"error": "nvidia-smi not found"}
    for fields in (SMI_FIELDS, SMI_FALLBACK):
        rc, out = _run([smi, f"--query-gpu={','.join(fields)}", "--format=csv,noheader,nounits"])
        if rc == 0 and out.strip():
            gpus = []
            for line in out.strip().splitlines():
                vals = [v.strip() for v in line.split(",")]
                gpus.append(dict(zip(fields, vals)))
            return {"gpus": gpus, "fields": "as named by nvidia-smi --query-gpu (MiB, MHz, W, C)"}
    return {"error": out.strip()[:500]}


def collect(require_gpu: bool = False) -> dict:
    versions = {"python": platform.python_version(), "executable": sys.executable, "platform": platform.platform(),
                "cpu_count": os.cpu_count(), "date_utc":
                datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    versions.update(git_info())
    versions["source_hash"] = source_hash()
    device: dict = {}
    try:
        import torch
        versions["torch"] = torch.__version__
        versions["torch_cuda"] = torch.version.cuda
        device["cuda_available"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            device.update(name=torch.cuda.get_device_name(0), count=torch.cuda.device_count(),
                          capability=f"{props.major}.{props.minor}", sm_count=props.multi_processor_count,
                          memory_gib=round(props.total_memory / 2**30, 1),
                          l2_mib=round((getattr(props, "L2_cache_size", 0) or 0) / 2**20, 1))
    except Exception as exc:
        versions["torch"] = f"import failed: {type(exc).__name__}: {exc}"
        device["cuda_available"] = False
    try:
        import triton
        versions["triton"] = triton.__version__
    except Exception as exc:
        versions["triton"] = f"unavailable: {type(exc).__name__}"
    for mod in ("xdist", "pytest_timeout", "pytest"):
        try:
            m = __import__(mod)
            versions[mod.replace("_", "-")] = getattr(m, "__version__", "present")
        except Exception:
            versions[mod.replace("_", "-")] = None
    cuda_home = find_cuda_home()
    versions["cuda_home"] = cuda_home
    nvcc = os.path.join(cuda_home, "bin", "nvcc") if cuda_home else shutil.which("nvcc")
    if nvcc:
        rc, out = _run([nvcc, "--version"])
        m = re.search(r"release ([\d.]+)", out)
        versions["nvcc"] = m.group(1) if m else out.strip()[-200:]
    else:
        versions["nvcc"] = None
    versions["compute_sanitizer"] = find_tool("compute-sanitizer")
    smi = nvidia_smi()
    device["nvidia_smi"] = smi
    if smi.get("gpus"):
        g = smi["gpus"][0]
        device.setdefault("name", g.get("name"))
        device["driver"] = g.get("driver_version")
    if not device.get("cuda_available"):
        device.setdefault("name", None)
        device["note"] = "no CUDA device seen by torch" + ("" if require_gpu else " (dry run on the CPU)")
    return {"device": device, "versions": versions}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_session.envinfo", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="where to write the JSON")
    p.add_argument("--require-gpu", action="store_true", help="exit 1 when torch sees no CUDA device")
    a = p.parse_args(argv)
    info = collect(a.require_gpu)
    with open(a.json, "w", encoding="utf-8") as f:
        json.dump(info, f, indent=1)
    print(json.dumps(info, indent=1))
    smi = shutil.which("nvidia-smi")
    if smi:  # the full clock report, for the log only
        print(_run([smi, "-q", "-d", "CLOCK,PERFORMANCE,POWER"])[1][-6000:])
    if a.require_gpu and not info["device"].get("cuda_available"):
        print("environment: torch sees no CUDA device", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
