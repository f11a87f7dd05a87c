"""64-bit element offsets on the CPU, without 2^31 real elements: the logits are a strided view into one
large ``torch.empty`` storage (4 GiB of bfloat16 address space, of which only the pages the view touches
are ever written, so a few MB of memory), with every stride below 2^31 but offsets past it: the batch
stride times n, or the channel stride times c. A kernel that computes an offset in 32 bits reads
elsewhere (or faults) and disagrees with the reference on a compact copy.

Triton (under the interpreter here; a GPU uses the same index arithmetic) reads the view through its
strides in both directions; the native forward reads it through its strides, its backward from a
dense copy. The GPU tests with real 2^31-element tensors are in the per-backend files (marked gpu).
"""
import pytest
import torch

import hss_kernels
from hss_kernels import reference, trees

from _helpers import backend_or_skip

BIG = 2**31
LOSSES = {
    "hierarchical_softmax_loss": hss_kernels.hierarchical_softmax_loss,
    "tree_min_loss": hss_kernels.tree_min_loss,
}


def _backend(name):
    return backend_or_skip(name)


def _far_views(channels):
    """(view, storage) pairs: (3, C, 2, 3) logits whose batch stride is 2^30 + 4096 (n = 2 lands past
    2^31), and (1, C, 2, 3) logits whose channel stride puts the last channels past 2^31."""
    H, W = 2, 3
    try:  # address space only: the pages are touched (and backed) only where the views write
        store = torch.empty(BIG + 2**20, dtype=torch.bfloat16)
    except RuntimeError as exc:  # a machine that does not overcommit memory
        pytest.skip(f"cannot reserve 4 GiB of address space: {exc}")
    sn = 2**30 + 4096
    yield store.as_strided((3, channels, H, W), (sn, H * W, W, 1))
    sc = (BIG + 2**19) // (channels - 1)
    assert sc < BIG and (channels - 1) * sc >= BIG
    yield store.as_strided((1, channels, H, W), (channels * sc, sc, W, 1))


@pytest.mark.parametrize("backend", ["triton", "native"])
@pytest.mark.parametrize("loss", LOSSES)
def test_offsets_past_2_31_elements(backend, loss):
    _backend(backend)
    tree = trees.load("cityscapes")
    channels = tree.num_leaves if loss == "hierarchical_softmax_loss" else tree.num_nodes
    for view in _far_views(channels):
        compact = (torch.randn(view.shape) * 3).to(torch.bfloat16)
        view.copy_(compact)
        y = torch.randint(0, tree.num_leaves, (view.shape[0],) + tuple(view.shape[2:]))
        a = view.requires_grad_(True) if view.is_leaf else view
        out = LOSSES[loss](a, y, tree, reduction="none", backend=backend)
        go = torch.randn(out.shape)
        (g,) = torch.autograd.grad(out, a, go)
        c = compact.clone().requires_grad_(True)
        ref = getattr(reference, loss)(c, y, tree, reduction="none")
        (gref,) = torch.autograd.grad(ref, c, go)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g.float(), gref.float(), rtol=1.6e-2, atol=1e-3)
        del view, a, out, g
