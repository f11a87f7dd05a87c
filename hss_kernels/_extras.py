"""The optional parts of hss_kernels and what they need beyond torch: ``pip install "hss_kernels[train]"``.

The core library (trees, losses, decoding, metrics, ``hss-check``) imports torch only, and triton for the
Triton backend. The training package (:mod:`hss_kernels.train`) and the pictures (:mod:`hss_kernels.viz`)
also need the modules of :data:`TRAIN`; they call :func:`require_train` on import, which fails with an
``ImportError`` that says what to install. setup.py's ``train`` extra lists the same distributions.
"""
from __future__ import annotations

import importlib.util
import sys
from typing import Iterable

__all__ = ["TRAIN", "INSTALL_TRAIN", "require_train"]

# module → the distribution that provides it
TRAIN = {"numpy": "numpy", "PIL": "pillow", "matplotlib": "matplotlib", "tqdm": "tqdm"}
INSTALL_TRAIN = 'pip install "hss_kernels[train]"'


def _found(module: str) -> bool:
    if module in sys.modules:
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require_train(what: str, modules: Iterable[str] = tuple(TRAIN)) -> None:
    """Raise ``ImportError`` naming the missing distributions and the install command when one of
    ``modules`` (keys of :data:`TRAIN`) cannot be imported; ``what`` names the part that needs them."""
    missing = [TRAIN[m] for m in modules if not _found(m)]
    if missing:
        raise ImportError(f"{what} needs {', '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} "
                          f"not installed: {INSTALL_TRAIN}")
