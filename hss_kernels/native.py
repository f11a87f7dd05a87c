"""The ``native`` backend: C++ (CPU, OpenMP) and CUDA kernels of the extension ``hss_kernels._C``.

The extension registers its ops with the PyTorch dispatcher under ``torch.ops.hss_kernels``; this module
adds what PyTorch needs around them (``register_fake`` for tracing and ``torch.compile``,
``register_autograd`` for the fused backward) and the backend interface of :mod:`hss_kernels.backends`:
``OPS`` and :func:`unavailable_reason`.

The ops (see ``csrc/hierarchical_softmax.cpp`` and ``csrc/tree_min.cpp`` for their exact contracts):

* ``hsoftmax_fwd`` / ``hsoftmax_bwd``: the hierarchical softmax loss; the forward saves ``D + 1`` floats
  per pixel (the log-sum-exps) so that the backward reads the logits once and writes the gradient once;
* ``tree_loss_fwd`` / ``tree_loss_bwd``: the focal tree-min loss (``extrema=True``) and the tree BCE
  (``extrema=False``); the backward recomputes the per-pixel extrema from the logits it reads anyway.

The forwards return the loss per pixel (``reduction="none"``) or its sum, plus the number of
non-ignored pixels; ``mean`` divides here. Float16/bfloat16/float32 logits accumulate in float32,
float64 in float64; the loss comes back in the accumulation dtype, the gradient in the logits' dtype.

Labels: a target value that is neither ``ignore_index`` nor a leaf id in ``[0, L)`` (the public API
rejects those, but not under torch.compile, where the check would need a host sync) never indexes a
table: that pixel's loss is NaN and counts as a labelled pixel, so ``mean``/``sum`` are NaN, and its
gradient row is NaN; the other pixels are unaffected. The Triton backend does the same.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import reference
from .tree import Tree

__all__ = ["OPS", "unavailable_reason", "tree_index"]

try:
    from . import _C  # noqa: F401  (loading the library registers torch.ops.hss_kernels.*)
    _REASON: Optional[str] = None
except (ImportError, OSError) as exc:  # not built, or built against another torch
    _C = None
    _REASON = ("the C++ extension hss_kernels._C is not built: pip install --no-build-isolation -e . "
               f"({type(exc).__name__}: {exc})")

_OP_NAMES = ("hsoftmax_fwd", "hsoftmax_bwd", "tree_loss_fwd", "tree_loss_bwd")
_REDUCTIONS = ("mean", "sum", "none")


def unavailable_reason(device) -> Optional[str]:
    """``None`` if the native kernels run on ``device``, else why not."""
    if _C is None:
        return _REASON
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type == "cuda":
        missing = [op for op in _OP_NAMES
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(f"hss_kernels::{op}", "CUDA")]
        if missing:
            return ("the C++ extension hss_kernels._C was built without its CUDA kernels (build it with a CUDA "
                    "build of torch and CUDA_HOME set; HSS_REQUIRE_CUDA=1 makes a CPU-only build an error)")
        return None
    return f"the native backend runs on CPU and CUDA devices, not {device.type}"


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def tree_index(tree: Tree, device) -> torch.Tensor:
    """The tree tables the tree-loss kernels read, packed into one int32 tensor (cached per device):
    ``depth (V) | dfs_order (V) | dfs_pos (V) | subtree_size (V) | path_nodes (L*D)``."""
    def build():
        t = tree.tables(device)
        return torch.cat([t.depth, t.dfs_order, t.dfs_pos, t.subtree_size, t.path_nodes.reshape(-1)]).contiguous()
    return tree.cached(("native_index", str(torch.device(device))), build)


def _reduce(loss: torch.Tensor, count: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":  # 0 (with zero gradient) when every pixel is ignored
        return loss / count.clamp(min=1).to(loss.dtype)
    return loss


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def hierarchical_softmax_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    tree: Tree,
    level_weights: Optional[Sequence[float]] = None,
    eps: float = 0.0,
    ignore_index: int = 255,
    reduction: str = "mean",
) -> torch.Tensor:
    """:func:`hss_kernels.reference.hierarchical_softmax_loss` with fused C++/CUDA kernels.
    ``logits`` (N, L, H, W), ``target`` (N, H, W), already checked by the public API."""
    _check_reduction(reduction)
    w = reference.level_weight_vector(tree, level_weights, _acc(logits.dtype), logits.device)
    group = tree.tables(logits.device).leaf_group
    loss, _, count = torch.ops.hss_kernels.hsoftmax_fwd(logits, target.long(), group, w, float(eps),
                                                        int(ignore_index), reduction == "none")
    return _reduce(loss, count, reduction)


def _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, extrema):
    _check_reduction(reduction)
    k = reference.node_weight_vector(tree, scale, normalize, _acc(logits.dtype), logits.device)
    loss, count = torch.ops.hss_kernels.tree_loss_fwd(
        logits, target.long(), tree_index(tree, logits.device), k, tree.num_leaves, tree.depth, float(gamma),
        float(eps), int(ignore_index), reduction == "none", extrema)
    return _reduce(loss, count, reduction)


def tree_min_loss(logits, target, tree: Tree, gamma: float = 2.0, scale: float = 1.0, eps: float = 0.0,
                  normalize: str = "level", ignore_index: int = 255, reduction: str = "mean") -> torch.Tensor:
    """:func:`hss_kernels.reference.tree_min_loss` with fused C++/CUDA kernels."""
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, True)


def tree_bce_loss(logits, target, tree: Tree, gamma: float = 0.0, scale: float = 1.0, eps: float = 0.0,
                  normalize: str = "level", ignore_index: int = 255, reduction: str = "mean") -> torch.Tensor:
    """:func:`hss_kernels.reference.tree_bce_loss` with fused C++/CUDA kernels."""
    return _node_loss(logits, target, tree, gamma, scale, eps, normalize, ignore_index, reduction, False)


OPS = {
    "hierarchical_softmax_loss": hierarchical_softmax_loss,
    "tree_min_loss": tree_min_loss,
    "tree_bce_loss": tree_bce_loss,
}
if _C is not None:
    from .native_decode import decode as _decode

    OPS["decode"] = _decode


# --------------------------------------------------------------------------- fake kernels and autograd
def _new_loss(logits, per_pixel):
    N, _, H, W = logits.shape
    loss = logits.new_empty((N, H, W) if per_pixel else (), dtype=_acc(logits.dtype))
    return loss, logits.new_empty((), dtype=torch.int64)


def _grad_like(logits):
    """The backward ops' output: ``empty_like`` of the logits as the kernels walk them (ops.h
    dense_logits): any non-overlapping dense layout as is, anything else as a contiguous copy. A plain
    ``empty_like`` of a sliced channels_last view would be channels_last, the kernel's output NCHW, and
    torch.compile's stride assertion would fail."""
    import torch._prims_common as pc  # ATen's rule, also on fake tensors (the name changed across torch versions)
    dense = getattr(pc, "is_non_overlapping_and_dense_or_false", None) or pc.is_non_overlapping_and_dense
    return torch.empty_like(logits if dense(logits) else logits.contiguous())


def _register() -> None:
    lib = "hss_kernels::"

    @torch.library.register_fake(lib + "hsoftmax_fwd")
    def _(logits, target, leaf_group, level_weights, eps, ignore_index, per_pixel):
        loss, count = _new_loss(logits, per_pixel)
        N, _, H, W = logits.shape
        stats = logits.new_empty((leaf_group.shape[0] + 1, N, H, W), dtype=_acc(logits.dtype))
        return loss, stats, count

    @torch.library.register_fake(lib + "hsoftmax_bwd")
    def _(grad, logits, target, stats, leaf_group, level_weights, eps, ignore_index):
        return _grad_like(logits)

    @torch.library.register_fake(lib + "tree_loss_fwd")
    def _(logits, target, tree_index, node_weights, num_leaves, depth, gamma, eps, ignore_index, per_pixel,
          extrema):
        return _new_loss(logits, per_pixel)

    @torch.library.register_fake(lib + "tree_loss_bwd")
    def _(grad, logits, target, tree_index, node_weights, num_leaves, depth, gamma, eps, ignore_index, extrema):
        return _grad_like(logits)

    def hsm_setup(ctx, inputs, output):
        logits, target, leaf_group, level_weights, eps, ignore_index, _ = inputs
        ctx.save_for_backward(logits, target, output[1], leaf_group, level_weights)
        ctx.opts = (eps, ignore_index)

    def hsm_backward(ctx, grad_loss, grad_stats, grad_count):
        logits, target, stats, leaf_group, level_weights = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.hss_kernels.hsoftmax_bwd(grad_loss, logits, target, stats, leaf_group, level_weights,
                                                      *ctx.opts)
        return grad, None, None, None, None, None, None

    torch.library.register_autograd(lib + "hsoftmax_fwd", hsm_backward, setup_context=hsm_setup)

    def tree_setup(ctx, inputs, output):
        logits, target, tree_idx, node_weights, L, D, gamma, eps, ignore_index, _, extrema = inputs
        ctx.save_for_backward(logits, target, tree_idx, node_weights)
        ctx.opts = (L, D, gamma, eps, ignore_index, extrema)

    def tree_backward(ctx, grad_loss, grad_count):
        logits, target, tree_idx, node_weights = ctx.saved_tensors
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.ops.hss_kernels.tree_loss_bwd(grad_loss, logits, target, tree_idx, node_weights,
                                                       *ctx.opts)
        return (grad,) + (None,) * 10

    torch.library.register_autograd(lib + "tree_loss_fwd", tree_backward, setup_context=tree_setup)

    def no_double_backward(ctx, *grads):
        raise RuntimeError("the native backend's losses do not support double backward (use backend='reference')")

    for op in ("hsoftmax_bwd", "tree_loss_bwd"):
        torch.library.register_autograd(lib + op, no_double_backward, setup_context=lambda ctx, inputs, output: None)


if _C is not None:
    _register()
