"""Triton hierarchical softmax with level weights given as a strided tensor view: the kernel reads the
weights at w_ptr + d, so they must be made contiguous (reshape(-1) keeps a strided 1-D view)."""
import pytest
import torch

import hss_kernels
from hss_kernels import reference, trees

pytest.importorskip("hss_kernels.triton")


def test_strided_level_weights():
    tree = trees.load("helen")
    x = torch.randn(2, tree.num_leaves, 3, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, tree.num_leaves, (2, 3, 5))
    w = (torch.rand(2 * tree.depth, dtype=torch.float64) + 0.5)[::2]
    assert not w.is_contiguous()
    for reduction in ("mean", "none"):
        out = hss_kernels.hierarchical_softmax_loss(x, y, tree, level_weights=w, reduction=reduction, backend="triton")
        ref = reference.hierarchical_softmax_loss(x, y, tree, level_weights=w, reduction=reduction)
        torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)
        g = torch.randn_like(out)
        torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0],
                                   rtol=1e-9, atol=1e-11)
