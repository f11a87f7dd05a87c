"""The command-line tools the model needs (nvdisasm, cuobjdump, nvcc), the cache folder, and the
cu130 virtual environment whose torch headers the CUDA kernels compile against."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from .sass import resource_usage
from .source import ROOT

__all__ = ["ToolMissing", "binary", "cache_dir", "disassemble", "resources", "kparams", "nvcc", "cuda_venv",
           "versions"]


class ToolMissing(RuntimeError):
    """A tool the model needs is not on this machine."""


def _triton_bin() -> Optional[Path]:
    try:
        import triton
    except ImportError:
        return None
    return Path(triton.__file__).resolve().parent / "backends" / "nvidia" / "bin"


def cuda_home() -> Path:
    return Path(os.environ.get("CUDA_HOME") or "/usr/local/cuda-13.0")


def _venv_bin() -> Optional[Path]:
    try:
        venv = cuda_venv(create=False)
    except ToolMissing:
        return None
    found = sorted(venv.glob("lib/python3*/site-packages/nvidia/cu13/bin"))
    return found[-1] if found else None


def binary(name: str, cuda: bool = False) -> str:
    """Path of ``name`` (nvdisasm, cuobjdump, ptxas): Triton's wheel first, then CUDA_HOME/bin, then PATH.
    ``cuda``: for nvcc 13's cubins, the CUDA 13 tools of the cu130 venv first (.ci/cuda-venv installs them)."""
    dirs = [_triton_bin(), cuda_home() / "bin"]
    if cuda:
        dirs.insert(0, _venv_bin())
    for d in dirs:
        if d is not None and (d / name).is_file() and os.access(d / name, os.X_OK):
            return str(d / name)
    found = shutil.which(name)
    if found:
        return found
    raise ToolMissing(f"{name} not found (looked in Triton's backends/nvidia/bin, {cuda_home()}/bin and PATH)")


def nvcc() -> str:
    p = cuda_home() / "bin" / "nvcc"
    if p.is_file():
        return str(p)
    found = shutil.which("nvcc")
    if found:
        return found
    raise ToolMissing(f"nvcc not found (CUDA_HOME={cuda_home()}, PATH)")


def cache_dir() -> Path:
    """``HSS_SM90_CACHE``, else ``$XDG_CACHE_HOME/hss_kernels/sm90`` (``~/.cache/...``)."""
    env = os.environ.get("HSS_SM90_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "hss_kernels" / "sm90"


def _run(cmd: List[str], **kw) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def _with_file(data: bytes, fn):
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(data)
        f.flush()
        return fn(f.name)


def disassemble(cubin: bytes, cuda: bool = False, functions: Optional[Sequence[int]] = None) -> str:
    """``nvdisasm -gi -c``: code sections only, with line chains (inlined-at) for every instruction;
    ``functions``: only those symbol indices' (``-fun``, see elf.functions)."""
    only = ["-fun", ",".join(str(i) for i in functions)] if functions is not None else []
    return _with_file(cubin, lambda p: _run([binary("nvdisasm", cuda), "-gi", "-c"] + only + [p]))


def resources(cubin: bytes, cuda: bool = False) -> Dict[str, Dict[str, int]]:
    """``cuobjdump --dump-resource-usage``: {function: {REG, STACK, SHARED, LOCAL}}."""
    return resource_usage(_with_file(cubin, lambda p: _run([binary("cuobjdump", cuda), "--dump-resource-usage", p])))


def kparams(cubin: bytes, cuda: bool = False) -> Dict[str, List[tuple]]:
    """Kernel parameter layout from the ELF's EIATTR_KPARAM_INFO: {function: [(ordinal, offset, size)]},
    offsets relative to the first parameter, ordinals in order."""
    import re
    text = _with_file(cubin, lambda p: _run([binary("cuobjdump", cuda), "-elf", p]))
    out: Dict[str, List[tuple]] = {}
    cur = None
    for line in text.splitlines():
        m = re.match(r"^\s*\.nv\.info\.(\S+)\s*$", line)
        if m:
            cur = m.group(1)
            out.setdefault(cur, [])
            continue
        m = re.search(r"Ordinal\s*:\s*(0x[0-9a-f]+)\s+Offset\s*:\s*(0x[0-9a-f]+)\s+Size\s*:\s*(0x[0-9a-f]+)", line)
        if m and cur is not None:
            out[cur].append(tuple(int(g, 16) for g in m.groups()))
    return {k: sorted(v) for k, v in out.items() if v}


def cuda_venv(create: bool = True) -> Path:
    """The cu130 venv of ``.ci/cuda-venv`` (its torch headers are what the CUDA kernels build against);
    created by that script when missing and ``create``."""
    script = ROOT / ".ci" / "cuda-venv"
    default = Path(os.environ.get("HSS_CUDA_VENV") or "/tmp/hss-cuda-venv-torch2.11.0")
    if (default / ".hss-ok").is_file():
        return default
    if not create:
        raise ToolMissing(f"the cu130 venv {default} is missing (run .ci/cuda-venv)")
    if not script.is_file():
        raise ToolMissing(f"{script} is missing")
    out = _run([str(script)])
    path = Path(out.strip().splitlines()[-1])
    if not (path / ".hss-ok").is_file():
        raise ToolMissing(f".ci/cuda-venv did not create {path}")
    return path


def _version(cmd: List[str]) -> str:
    try:
        lines = _run(cmd).strip().splitlines()
        return lines[-1] if lines else "?"
    except (RuntimeError, ToolMissing, OSError):
        return "missing"


def versions() -> Dict[str, str]:
    out = {}
    for name in ("nvdisasm", "cuobjdump", "ptxas"):
        try:
            out[name] = _version([binary(name), "--version"])
        except ToolMissing:
            out[name] = "missing"
    for name in ("nvdisasm", "cuobjdump"):
        try:
            out[name + " (CUDA)"] = _version([binary(name, cuda=True), "--version"])
        except ToolMissing:
            out[name + " (CUDA)"] = "missing"
    try:
        out["nvcc"] = _version([nvcc(), "--version"])
    except ToolMissing:
        out["nvcc"] = "missing"
    return out
