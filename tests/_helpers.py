"""Helpers shared by test files of every backend."""
import importlib

import pytest


def backend_or_skip(name: str, device="cpu"):
    """The backend module ``hss_kernels.<name>`` (``triton``, ``native``), or a pytest skip saying why it
    cannot run on ``device`` (Triton not installed, extension not built, no GPU)."""
    try:
        mod = importlib.import_module(f"hss_kernels.{name}")
    except ImportError as exc:
        pytest.skip(f"{name}: {exc}")
    why = mod.unavailable_reason(device)
    if why is not None:
        pytest.skip(why)
    return mod
