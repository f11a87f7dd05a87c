"""The Triton backend (minimal stand-in: the Triton helper's branch holds the full one; merge keeps theirs
plus the ``"decode"`` entry of ``OPS``).

Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (``TRITON_INTERPRET=1``).
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton  # noqa: F401  (an ImportError here marks the backend unavailable)

from .decode import decode as _decode  # keeps hss_kernels.triton.decode the module

__all__ = ["OPS", "unavailable_reason"]

OPS = {"decode": _decode}


def unavailable_reason(device) -> Optional[str]:
    """None if the Triton kernels run on ``device``: CUDA with a GPU, or the CPU under the interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available"
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return None
        return "Triton runs on CPU tensors only under its interpreter (set TRITON_INTERPRET=1 before import)"
    return f"Triton does not run on {device.type} tensors"
