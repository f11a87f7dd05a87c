"""Backend registry: which implementation of an op runs for a given ``backend`` and tensor device.

A backend is a module that defines

* ``OPS``: a dict from op name (``"hierarchical_softmax_loss"``, ``"tree_min_loss"``, ``"tree_bce_loss"``,
  ``"decode"``, ...) to a function with the reference's signature (it may take keywords of its own
  beyond it), called with 4-D ``(N, C, H, W)`` logits, ``(N, H, W)`` targets and options that the public
  API has already checked;
* ``unavailable_reason(device) -> str | None``: ``None`` when the backend runs on that device, else
  why not (extension not built, no GPU, Triton missing, ...).

``"reference"`` is :mod:`hss_kernels.reference` and runs everywhere. ``"auto"`` picks, per device, the
first available backend that implements the op: on the CPU native; on a CUDA device native or Triton in
the order of ``gpu_auto.json`` for that op and dtype (written by ``python -m benchmarks.auto_choice
--write`` from the GPU measurements committed under ``benchmarks/results/``, or from the static sm_90
model's estimates until a GPU has measured them); then the reference.
"""
from __future__ import annotations

import importlib
import json
import os
from typing import Callable, Dict, List, Optional

import torch

from . import reference

__all__ = ["BACKENDS", "available_backends", "gpu_auto_order", "resolve", "unavailable_reason"]

# name → module path. The modules are imported lazily: a missing Triton or extension never breaks import.
BACKENDS: Dict[str, str] = {
    "reference": "hss_kernels.reference",
    "triton": "hss_kernels.triton",
    "native": "hss_kernels.native",
}
_AUTO_ORDER = {"cuda": ["native", "triton"], "cpu": ["native"]}  # when gpu_auto.json has no entry
_GPU_AUTO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu_auto.json")
_gpu_order: Optional[Dict[str, Dict[str, List[str]]]] = None
_loaded: Dict[str, object] = {}
_import_errors: Dict[str, str] = {}


def _module(name: str):
    if name in _loaded:
        return _loaded[name]
    if name in _import_errors:
        return None
    try:
        mod = importlib.import_module(BACKENDS[name])
    except Exception as exc:  # ImportError, or a Triton/extension that fails to initialise
        _import_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _loaded[name] = mod
    return mod


def load_all() -> None:
    """Import every backend now (failures are recorded, not raised). The package calls this on import,
    so that ``torch.compile(fullgraph=True)`` never has to trace a lazy import."""
    for name in BACKENDS:
        if name != "reference":
            _module(name)


def _ops(name: str) -> Dict[str, Callable]:
    if name == "reference":
        return {op: getattr(reference, op) for op in
                ("hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss", "tree_triplet_loss", "decode")}
    mod = _module(name)
    return getattr(mod, "OPS", {}) if mod is not None else {}


def unavailable_reason(name: str, device="cpu", op: Optional[str] = None) -> Optional[str]:
    """``None`` if backend ``name`` can run ``op`` (any op if None) on ``device``, else the reason."""
    if name not in BACKENDS:
        return f"unknown backend {name!r}; choose one of {['auto'] + list(BACKENDS)}"
    if name == "reference":
        return None
    mod = _module(name)
    if mod is None:
        return f"the {name} backend could not be imported ({_import_errors[name]})"
    why = mod.unavailable_reason(torch.device(device))
    if why is not None:
        return why
    if op is not None and op not in _ops(name):
        return f"the {name} backend does not implement {op}"
    return None


def available_backends(device="cpu", op: Optional[str] = None) -> List[str]:
    """Names of the backends that run (``op``, if given) on ``device``."""
    return [b for b in BACKENDS if unavailable_reason(b, device, op) is None]


def gpu_auto_order(op: str, dtype: Optional[torch.dtype] = None) -> List[str]:
    """The order in which ``"auto"`` tries the backends for ``op`` on a CUDA device (``gpu_auto.json``):
    float64 follows float32, float16 follows bfloat16 unless listed itself."""
    global _gpu_order
    if _gpu_order is None:
        try:
            with open(_GPU_AUTO) as f:
                doc = json.load(f)
            _gpu_order = {o: {d: c["order"] for d, c in per.items()} for o, per in doc["ops"].items()}
        except (OSError, ValueError, KeyError, TypeError):
            _gpu_order = {}
    per = _gpu_order.get(op, {})
    name = str(dtype).replace("torch.", "") if dtype is not None else "float32"
    for key in (name, {"float64": "float32", "float16": "bfloat16"}.get(name), "float32"):
        if key in per:
            return list(per[key])
    return list(_AUTO_ORDER["cuda"])


def resolve(op: str, backend: str, device: torch.device, dtype: Optional[torch.dtype] = None) -> Callable:
    """The function that implements ``op`` for ``backend`` (or ``"auto"``, which may depend on the
    logits' ``dtype``) on ``device``."""
    if backend == "auto":
        order = gpu_auto_order(op, dtype) if device.type == "cuda" else _AUTO_ORDER.get(device.type, [])
        for name in order:
            if unavailable_reason(name, device, op) is None:
                return _ops(name)[op]
        return _ops("reference")[op]
    why = unavailable_reason(backend, device, op)
    if why is not None:
        raise RuntimeError(f"backend={backend!r} cannot run {op} on {device}: {why}")
    return _ops(backend)[op]
