"""The segmented-scan variant of tree-min's negative side (``tree_min.USE_SCAN``), on every device. The
interpreter's associative_scan costs seconds per call, so these inputs are a handful of pixels."""
import pytest
import torch

from hss_kernels import Tree, trees

from helpers import check, inputs

tm = pytest.importorskip("hss_kernels.triton.tree_min")


@pytest.mark.parametrize("name", ["vistas_v2", "helen", "pascal_person_part"])
def test_scan_variant_matches_reference(backend, device, name, monkeypatch):
    monkeypatch.setattr(tm, "USE_SCAN", True)
    tree = trees.load(name)
    x, y = inputs(tree, "tree_min_loss", (1, 1, 5), torch.float64, ignore_frac=0.2, device=device)
    check("tree_min_loss", backend, x, y, tree, reduction="none", gamma=2.0, scale=5.0)
    ties = torch.randint(-1, 2, x.shape).to(torch.float64).to(device)  # ties everywhere: first in pre-order wins
    check("tree_min_loss", backend, ties, y, tree, gamma=0.0, normalize="node")


@pytest.mark.parametrize("parents", [[-1] * 4, [-1, 0, 1, 2], [2, 2, -1, 2, 3, 3, 4, -1, 7]])
def test_scan_variant_on_odd_trees(backend, device, parents, monkeypatch):
    monkeypatch.setattr(tm, "USE_SCAN", True)
    tree = Tree.from_parents(parents)
    x, y = inputs(tree, "tree_min_loss", (1, 2, 3), device=device)
    check("tree_min_loss", backend, x, y, tree, reduction="sum", gamma=1.0, eps=1e-3)
    loss1, grad1 = tm.tree_min_loss_and_grad(x, y, tree, gamma=1.0)
    monkeypatch.setattr(tm, "USE_SCAN", False)
    loss2, grad2 = tm.tree_min_loss_and_grad(x, y, tree, gamma=1.0)
    # same terms, summed in another order: equal up to float32 rounding
    torch.testing.assert_close(loss1, loss2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad1, grad2, rtol=1e-6, atol=1e-8)
