"""A stand-in for ``mmcv.ops`` so that mmsegmentation 1.2.2 imports with mmcv-lite (CPU tests only).

mmseg imports ``mmcv.ops`` (``point_sample``, ``sigmoid_focal_loss``) at import time, and mmcv-lite's
``mmcv/ops/__init__.py`` loads the compiled ``mmcv._ext``, which it lacks. :func:`install` registers a
namespace-only ``mmcv.ops`` (its ``__path__`` is mmcv's ``ops`` folder, so the pure-torch
``mmcv.ops.point_sample`` still imports), gives it a pure-torch ``sigmoid_focal_loss``, and makes any
other attribute raise ``ModuleNotFoundError``, which mmseg's guards around optional ops expect. Call it
before importing mmseg; it does nothing when the real ``mmcv.ops`` imports.
"""
import importlib.util
import os
import sys
import types


def _sigmoid_focal_loss(pred, target, gamma=2.0, alpha=0.25, weight=None, reduction="mean"):
    import torch.nn.functional as F

    t = F.one_hot(target.long(), pred.shape[1]).to(pred.dtype) if target.dim() == 1 else target.to(pred.dtype)
    p = pred.sigmoid()
    pt = (1 - p) * t + p * (1 - t)
    w = (alpha * t + (1 - alpha) * (1 - t)) * pt.pow(gamma)
    loss = F.binary_cross_entropy_with_logits(pred, t, reduction="none") * w
    if weight is not None:
        loss = loss * weight.view(-1, 1)
    return {"mean": loss.mean, "sum": loss.sum}.get(reduction, lambda: loss)()


class _OpsStandIn(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        try:  # a pure-python submodule (point_sample) imports from the real folder
            return importlib.import_module(f"mmcv.ops.{name}")
        except ImportError:
            pass
        raise ModuleNotFoundError(f"mmcv.ops.{name} needs the full mmcv (this is mmcv-lite with a test stand-in)",
                                  name=f"mmcv.ops.{name}")


def install() -> bool:
    """Register the stand-in if ``mmcv.ops`` cannot be imported; True when it was installed."""
    if "mmcv.ops" in sys.modules:
        return isinstance(sys.modules["mmcv.ops"], _OpsStandIn)
    import mmcv

    try:
        import mmcv.ops  # noqa: F401  (the full mmcv)
        return False
    except ImportError:
        for k in [k for k in sys.modules if k == "mmcv.ops" or k.startswith("mmcv.ops.")]:
            del sys.modules[k]
    ops = _OpsStandIn("mmcv.ops")
    ops.__path__ = [os.path.join(os.path.dirname(mmcv.__file__), "ops")]
    ops.__spec__ = importlib.util.spec_from_loader("mmcv.ops", loader=None, is_package=True)
    ops.__spec__.submodule_search_locations = ops.__path__
    ops.sigmoid_focal_loss = _sigmoid_focal_loss
    sys.modules["mmcv.ops"] = ops
    mmcv.ops = ops
    return True
