"""HierarchicalMetrics against a direct NumPy computation, and its edge cases."""
import math

import numpy as np
import pytest
import torch

from hss_kernels import Tree, labels_at_depth, trees
from hss_kernels.metrics import HierarchicalMetrics

IGNORE = 255
TREES = ["cityscapes", "helen", "vistas"]


def random_maps(tree, shape, ignore_frac=0.2, classes=None, unpredicted_frac=0.0):
    """Random leaf-label prediction and target; a fraction of the target ignored, and a fraction of the
    prediction IGNORE (no class: decode's label of NaN logits)."""
    L = tree.num_leaves
    hi = L if classes is None else classes
    pred = torch.randint(0, hi, shape)
    target = torch.randint(0, hi, shape)
    # A biased prediction (often right) so that IoUs are not all tiny.
    right = torch.rand(shape) < 0.5
    pred = torch.where(right, target, pred)
    target = torch.where(torch.rand(shape) < ignore_frac, torch.full_like(target, IGNORE), target)
    pred = torch.where(torch.rand(shape) < unpredicted_frac, torch.full_like(pred, IGNORE), pred)
    return pred, target


def numpy_scores(tree, pred, target, depth):
    """Per-class IoU etc. from explicit masks, one class at a time (no confusion matrix, no bincount); a
    prediction IGNORE is class -1, no class."""
    group = np.array(tree.leaf_group[depth - 1])
    K = tree.num_classes(depth)
    p = pred.numpy().reshape(-1)
    t = target.numpy().reshape(-1)
    keep = t != IGNORE
    p, t = p[keep], group[t[keep]]
    p = np.where(p == IGNORE, -1, group[np.where(p == IGNORE, 0, p)])
    iou, acc, freq = [], [], []
    for k in range(K):
        inter = np.sum((p == k) & (t == k))
        union = np.sum((p == k) | (t == k))
        iou.append(inter / union if union else np.nan)
        acc.append(inter / np.sum(t == k) if np.sum(t == k) else np.nan)
        freq.append(np.sum(t == k) / len(t))
    iou = np.array(iou)
    return {
        "iou": iou,
        "miou": np.nanmean(iou),
        "pixel_accuracy": np.mean(p == t),
        "mean_accuracy": np.nanmean(np.array(acc)),
        "fw_iou": np.nansum(np.array(freq) * iou),
    }


@pytest.mark.parametrize("unpredicted_frac", [0.0, 0.15])
@pytest.mark.parametrize("name", TREES)
def test_against_numpy(name, unpredicted_frac):
    """Also with predictions equal to ignore_index (no class): each a miss of its target class."""
    tree = trees.load(name)
    # Few classes used at the leaves so that some are absent from both (NaN, left out of the means).
    pred, target = random_maps(tree, (2, 13, 17), classes=max(2, tree.num_leaves - 3),
                               unpredicted_frac=unpredicted_frac)
    m = HierarchicalMetrics(tree)
    m.update(pred, target)
    res = m.compute()
    assert sorted(res) == list(range(1, tree.depth + 1))
    for d in range(1, tree.depth + 1):
        want = numpy_scores(tree, pred, target, d)
        got = res[d]
        assert got["iou"].shape == (tree.num_classes(d),)
        np.testing.assert_allclose(got["iou"].numpy(), want["iou"], rtol=1e-12, equal_nan=True)
        for k in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou"):
            assert isinstance(got[k], float)
            assert math.isclose(got[k], want[k], rel_tol=1e-12), (d, k, got[k], want[k])
        # the matrix itself: rows target, columns prediction, ignored pixels absent
        keep = target != IGNORE
        miss = keep & (pred == IGNORE)
        assert int(m.missed[d - 1].sum()) == int(miss.sum())
        assert torch.equal(m.missed[d - 1], torch.bincount(labels_at_depth(target[miss], tree, d),
                                                          minlength=tree.num_classes(d)))
        keep = keep & (pred != IGNORE)
        t = labels_at_depth(target, tree, d)[keep]
        p = labels_at_depth(pred, tree, d)[keep]
        cm = m.confusion(d)
        assert cm.dtype == torch.int64 and int(cm.sum()) == int(keep.sum())
        i, j = int(t[0]), int(p[0])
        assert int(cm[i, j]) == int(((t == i) & (p == j)).sum())


def test_leaf_depth_matches_leaf_labels():
    tree = trees.load("vistas")
    pred, target = random_maps(tree, (1, 9, 8), ignore_frac=0.0)
    m = HierarchicalMetrics(tree)
    m.update(pred, target)
    direct = torch.zeros(tree.num_leaves, tree.num_leaves, dtype=torch.int64)
    for t, p in zip(target.reshape(-1).tolist(), pred.reshape(-1).tolist()):
        direct[t, p] += 1
    assert torch.equal(m.confusion(tree.depth), direct)


@pytest.mark.parametrize("name", TREES)
def test_perfect_prediction(name):
    tree = trees.load(name)
    _, target = random_maps(tree, (2, 8, 8))
    pred = torch.where(target == IGNORE, torch.zeros_like(target), target)
    m = HierarchicalMetrics(tree)
    m.update(pred, target)
    for d, r in m.compute().items():
        assert r["miou"] == 1.0 and r["pixel_accuracy"] == 1.0 and r["mean_accuracy"] == 1.0 and r["fw_iou"] == 1.0
        present = ~r["iou"].isnan()
        assert bool(present.any()) and bool((r["iou"][present] == 1.0).all())


def test_right_at_depth1_wrong_at_leaves():
    tree = trees.load("cityscapes")
    # Every target leaf predicted as a sibling under the same depth-1 node (a different leaf).
    target = torch.tensor([[0, 2, 3, 5, 8, 11, 13]])  # road, building, wall, pole, vegetation, person, car
    pred = torch.tensor([[1, 3, 4, 6, 9, 12, 14]])
    m = HierarchicalMetrics(tree)
    m.update(pred, target)
    res = m.compute()
    assert res[1]["miou"] == 1.0 and res[1]["pixel_accuracy"] == 1.0
    assert res[2]["miou"] == 0.0 and res[2]["pixel_accuracy"] == 0.0 and res[2]["mean_accuracy"] == 0.0
    assert "2" in m.table() and "100.00" in m.table() and "0.00" in m.table()


def test_batches_accumulate_like_one_batch():
    tree = trees.load("helen")
    pred, target = random_maps(tree, (5, 7, 11))
    whole = HierarchicalMetrics(tree)
    whole.update(pred, target)
    parts = HierarchicalMetrics(tree)
    for i in range(5):
        parts.update(pred[i], target[i])  # also: any shape, here (H, W)
    for d in range(1, tree.depth + 1):
        assert torch.equal(whole.confusion(d), parts.confusion(d))
    a, b = whole.compute(), parts.compute()
    for d in a:
        assert a[d]["miou"] == b[d]["miou"]
    parts.reset()
    assert all(int(m.sum()) == 0 for m in parts.matrices)
    parts.all_reduce()  # not distributed: a no-op
    parts.update(pred.to(torch.uint8), target.to(torch.int32))  # other integer dtypes
    assert torch.equal(parts.confusion(1), whole.confusion(1))


def test_all_ignored_and_empty():
    tree = trees.load("cityscapes")
    m = HierarchicalMetrics(tree)
    m.update(torch.zeros(2, 3, 3, dtype=torch.long), torch.full((2, 3, 3), IGNORE))
    m.update(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    for r in m.compute().values():
        assert math.isnan(r["miou"]) and math.isnan(r["pixel_accuracy"]) and bool(r["iou"].isnan().all())
    assert "nan" in str(m)


def test_custom_ignore_index_and_device():
    tree = Tree.from_parents([-1, -1, 0, 0, 1, 1])  # leaves 2,3 under 0 and 4,5 under 1 → labels 0..3
    m = HierarchicalMetrics(tree, ignore_index=-1, device="cpu")
    m.update(torch.tensor([0, 1, 2, 3]), torch.tensor([0, -1, 3, 2]))
    assert m.confusion(2).tolist() == [[1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]]
    assert m.confusion(1).tolist() == [[1, 0], [0, 2]]
    state = m.state_dict()
    m2 = HierarchicalMetrics(tree, ignore_index=-1)
    m2.load_state_dict(state)
    assert torch.equal(m2.confusion(1), m.confusion(1))


def test_bad_input():
    tree = trees.load("cityscapes")
    m = HierarchicalMetrics(tree)
    t = torch.zeros(1, 4, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="pred holds label 19"):
        m.update(torch.full_like(t, 19), t)
    with pytest.raises(ValueError, match="pred holds label -1"):
        m.update(torch.full_like(t, -1), t)
    with pytest.raises(ValueError, match="pred holds label 254"):
        m.update(torch.full_like(t, 254), t)
    with pytest.raises(ValueError, match="pred holds label 255"):  # another ignore_index's, not this one's
        HierarchicalMetrics(tree, ignore_index=-1).update(torch.full_like(t, 255), t)
    with pytest.raises(ValueError, match="target holds label 30"):
        m.update(t, torch.full_like(t, 30))
    with pytest.raises(ValueError, match="shape"):
        m.update(t, t[0])
    with pytest.raises(TypeError, match="integer"):
        m.update(t.float(), t)
    with pytest.raises(TypeError, match="torch.Tensor"):
        m.update(t.numpy(), t)
    with pytest.raises(ValueError, match="depth"):
        m.confusion(3)
    with pytest.raises(TypeError):
        HierarchicalMetrics(3)
    assert HierarchicalMetrics("cityscapes").tree is tree  # a shipped tree by name
    assert all(int(x.sum()) == 0 for x in m.matrices)  # failed updates added nothing


def test_all_reduce_in_a_process_group(tmp_path):
    """A one-process gloo group: the collective runs and leaves the (only) process's counts as they are."""
    import torch.distributed as dist

    tree = trees.load("helen")
    pred, target = random_maps(tree, (2, 5, 5))
    m = HierarchicalMetrics(tree)
    m.update(pred, target)
    before = [x.clone() for x in m.matrices]
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        m.all_reduce()
    finally:
        dist.destroy_process_group()
    assert all(torch.equal(a, b) for a, b in zip(before, m.matrices))
    assert all(x.shape == (tree.num_classes(d + 1),) * 2 for d, x in enumerate(m.matrices))


def test_all_reduce_reassembles_the_matrices(monkeypatch):
    """With a stand-in collective that sums two identical processes, every matrix doubles in place."""
    import torch.distributed as dist

    tree = trees.load("vistas")
    pred, target = random_maps(tree, (1, 6, 6), unpredicted_frac=0.3)
    m = HierarchicalMetrics(tree)
    m.update(pred, target)
    before = [x.clone() for x in m.matrices]
    missed = [x.clone() for x in m.missed]
    assert int(missed[0].sum()) > 0 or not bool(((pred == IGNORE) & (target != IGNORE)).any())
    calls = []

    def fake_all_reduce(t, op=None):
        calls.append(t.numel())
        t.mul_(2)

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    m.all_reduce()
    assert calls == [sum(x.numel() for x in before + missed)]  # one collective for all depths
    assert all(torch.equal(a * 2, b) for a, b in zip(before, m.matrices))
    assert all(torch.equal(a * 2, b) for a, b in zip(missed, m.missed))


@pytest.mark.gpu
def test_on_cuda_matches_cpu():
    tree = trees.load("vistas")
    pred, target = random_maps(tree, (2, 32, 32))
    a, b = HierarchicalMetrics(tree), HierarchicalMetrics(tree)
    a.update(pred, target)
    b.update(pred.cuda(), target.cuda())
    assert b.matrices[0].device.type == "cuda"
    for d in range(1, tree.depth + 1):
        assert torch.equal(a.confusion(d), b.confusion(d).cpu())


def test_ignored_leaves_leave_the_means():
    # A data set that does not evaluate some leaves: their pixels are ignored in the target, the model may
    # still predict them. Expected by hand from numpy_scores: those classes' IoU and recall dropped from the
    # means; at a coarser depth a class is dropped only when all its leaves are.
    tree = trees.load("cityscapes")
    group1 = np.array(tree.leaf_group[0])
    whole = [k for k in range(tree.num_classes(1)) if (group1 == k).sum() == 1][0]  # a one-leaf top class
    lone = int(np.flatnonzero(group1 == whole)[0])
    shared = int(np.flatnonzero(group1 == np.bincount(group1).argmax())[0])  # a leaf with siblings
    skip = [lone, shared]
    pred, target = random_maps(tree, (2, 19, 23))
    target[torch.isin(target, torch.tensor(skip))] = IGNORE
    pred.view(-1)[:40] = lone  # predicted, never a target
    m = HierarchicalMetrics(tree, ignored_leaves=skip)
    m.update(pred, target)
    res = m.compute()
    plain = HierarchicalMetrics(tree)
    plain.update(pred, target)
    for d in range(1, tree.depth + 1):
        want = numpy_scores(tree, pred, target, d)
        group = np.array(tree.leaf_group[d - 1])
        kept = set(group[[i for i in range(tree.num_leaves) if i not in skip]].tolist())
        dropped = [k for k in range(tree.num_classes(d)) if k not in kept]
        iou = want["iou"].copy()
        iou[dropped] = np.nan
        np.testing.assert_allclose(res[d]["iou"].numpy(), iou, rtol=1e-12, equal_nan=True)
        assert math.isclose(res[d]["miou"], np.nanmean(iou), rel_tol=1e-12)
        assert res[d]["pixel_accuracy"] == plain.compute()[d]["pixel_accuracy"]
        assert m.counted(d).tolist() == [k in kept for k in range(tree.num_classes(d))]
    # the lone leaf's class is gone at every depth and its predictions lowered the truth's IoU
    assert int((~m.counted(1)).sum()) == 1 and res[1]["miou"] != plain.compute()[1]["miou"]
    assert str(int(m.counted(tree.depth).sum())) in m.table().splitlines()[-1]


@pytest.mark.parametrize("bad", [[-1], [19], [0.5], [True], list(range(19))])
def test_ignored_leaves_bad_input(bad):
    with pytest.raises(ValueError, match="ignored_leaves"):
        HierarchicalMetrics("cityscapes", ignored_leaves=bad)


def test_unpredicted_pixels_are_misses():
    """A labelled pixel predicted as ignore_index (decode's label of NaN logits) is a miss of its class: its
    class's recall and IoU and the pixel accuracy drop, no class gains a prediction; an ignored target pixel
    predicted as ignore_index counts for nothing. Batches, state_dict and a state without counts agree."""
    tree = trees.load("cityscapes")
    target = torch.tensor([[0, 0, 1, 1, IGNORE]])
    pred = torch.tensor([[0, IGNORE, 1, 1, IGNORE]])
    m = HierarchicalMetrics(tree)
    m.update(pred, target)
    r = m.compute()[tree.depth]
    assert r["pixel_accuracy"] == 3 / 4
    assert float(r["iou"][0]) == 1 / 2 and float(r["iou"][1]) == 1.0
    assert r["mean_accuracy"] == (1 / 2 + 1) / 2
    assert int(m.confusion(tree.depth).sum()) == 3 and int(m.missed[tree.depth - 1][0]) == 1
    assert "4 pixels" in str(m)
    m2 = HierarchicalMetrics(tree)
    m2.load_state_dict(m.state_dict())
    assert m2.compute()[tree.depth]["pixel_accuracy"] == 3 / 4
    m2.load_state_dict({"matrices": m.state_dict()["matrices"]})  # a state from before the missed counts
    assert m2.compute()[tree.depth]["pixel_accuracy"] == 1.0 and int(m2.missed[0].sum()) == 0
    m.reset()
    assert all(int(x.sum()) == 0 for x in m.missed)
