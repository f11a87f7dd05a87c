"""hss_kernels.integrations.torchmetrics: HierarchicalMetric equals HierarchicalMetrics on the same batches, its
states reset and move with the module, and two gloo processes sum their confusion matrices."""
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchmetrics")

from hss_kernels import trees  # noqa: E402
from hss_kernels.integrations.torchmetrics import HierarchicalMetric  # noqa: E402
from hss_kernels.metrics import HierarchicalMetrics  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _batches(tree, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(0, tree.num_leaves, (2, 7, 9), generator=g)
        t[torch.rand(t.shape, generator=g) < 0.1] = 255
        p = torch.where(torch.rand(t.shape, generator=g) < 0.6, t.clamp(max=tree.num_leaves - 1),
                        torch.randint(0, tree.num_leaves, t.shape, generator=g))
        p[torch.rand(t.shape, generator=g) < 0.1] = 255  # no prediction (decode's label of NaN logits): a miss
        out.append((p, t))
    return out


def test_equals_hierarchical_metrics_and_resets():
    tree = trees.load("vistas")
    m, ref = HierarchicalMetric(tree), HierarchicalMetrics(tree)
    for p, t in _batches(tree):
        m.update(p, t)
        ref.update(p, t)
    got, want = m.compute(), ref.compute()
    assert set(got) == {1, 2, 3}
    for d in got:
        torch.testing.assert_close(got[d]["iou"], want[d]["iou"], equal_nan=True)
        for k in ("miou", "pixel_accuracy", "mean_accuracy", "fw_iou"):
            assert got[d][k] == pytest.approx(want[d][k], nan_ok=True)
        assert torch.equal(getattr(m, f"confusion_{d}"), ref.confusion(d))
        assert torch.equal(getattr(m, f"missed_{d}"), ref.missed[d - 1]) and int(ref.missed[d - 1].sum()) > 0
    m.reset()
    assert all(int(getattr(m, f"confusion_{d}").sum()) == 0 for d in (1, 2, 3))
    assert all(int(getattr(m, f"missed_{d}").sum()) == 0 for d in (1, 2, 3))
    with pytest.raises(ValueError, match="HierarchicalMetric.update: pred holds label 66"):
        m.update(torch.full((2, 2), 66), torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="integer leaf labels"):
        m.update(torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_sum_their_matrices(tmp_path):
    """Each process updates with its half of the batches; compute() on both gives the scores of all of them."""
    tree = trees.load("cityscapes")
    batches = _batches(tree, n=4, seed=3)
    ref = HierarchicalMetrics(tree)
    for p, t in batches:
        ref.update(p, t)
    script = tmp_path / "worker.py"
    script.write_text(textwrap.dedent(f"""
        import sys, torch, torch.distributed as dist
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_torchmetrics import _batches
        from hss_kernels import trees
        from hss_kernels.integrations.torchmetrics import HierarchicalMetric
        rank = int(sys.argv[1])
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:{_free_port()}", rank=rank, world_size=2)
        tree = trees.load("cityscapes")
        m = HierarchicalMetric(tree)
        for p, t in _batches(tree, n=4, seed=3)[rank::2]:
            m.update(p, t)
        res = m.compute()
        torch.save({{d: res[d]["miou"] for d in res}}, {str(tmp_path)!r} + f"/out{{rank}}.pt")
        dist.destroy_process_group()
    """))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (0, 1)]
    for pr in procs:
        out, _ = pr.communicate(timeout=120)
        assert pr.returncode == 0, out[-2000:]
    want = {d: r["miou"] for d, r in ref.compute().items()}
    for r in (0, 1):
        got = torch.load(tmp_path / f"out{r}.pt")
        assert got == pytest.approx(want)
