"""Triton launches on the current CUDA device, not on its arguments' (triton-lang/triton#2441): every
launch of the backend must run inside ``_common.device_guard(logits)``."""
import contextlib

import pytest
import torch

import hss_kernels
from hss_kernels import trees

triton_mod = pytest.importorskip("hss_kernels.triton")
C = pytest.importorskip("hss_kernels.triton._common")


class _Probe:
    def __init__(self, device):
        self.device = torch.device(device)


def test_guard_selects_the_tensors_device():
    guard = C.device_guard(_Probe("cuda:1"))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(C.device_guard(_Probe("cpu")), contextlib.nullcontext)


def test_every_launch_is_guarded(monkeypatch):
    """Records the guard's entries and the launches: each launch happens inside a guard on the logits."""
    entered = []
    depth = [0]

    @contextlib.contextmanager
    def recording_guard(t):
        entered.append(t)
        depth[0] += 1
        try:
            yield
        finally:
            depth[0] -= 1

    monkeypatch.setattr(C, "device_guard", recording_guard)
    from hss_kernels.triton import decode as dmod, hierarchical_softmax as hmod, tree_min as tmod
    launches = []
    for mod, name in ((hmod, "_hsm_kernel"), (tmod, "_tree_kernel"), (dmod, "_decode_kernel")):
        kernel = getattr(mod, name)

        class Wrapped:
            def __init__(self, k=kernel, n=name):
                self.k, self.n = k, n

            def __getitem__(self, grid):
                launch = self.k[grid]

                def run(*args, **kw):
                    launches.append((self.n, depth[0] > 0, args[0]))
                    return launch(*args, **kw)
                return run
        monkeypatch.setattr(mod, name, Wrapped())

    tree = trees.load("cityscapes")
    y = torch.randint(0, tree.num_leaves, (1, 3, 4))
    xl = torch.randn(1, tree.num_leaves, 3, 4, requires_grad=True)
    xn = torch.randn(1, tree.num_nodes, 3, 4, requires_grad=True)
    hss_kernels.hierarchical_softmax_loss(xl, y, tree, backend="triton").backward()
    hss_kernels.tree_min_loss(xn, y, tree, backend="triton").backward()
    triton_mod.OPS["decode"](xn.detach(), tree)
    names = [n for n, _, _ in launches]
    assert names.count("_hsm_kernel") == 2 and names.count("_tree_kernel") == 2 and "_decode_kernel" in names
    assert all(inside for _, inside, _ in launches)
    assert all(any(e is arg for e in entered) for _, _, arg in launches)


@pytest.mark.gpu
def test_second_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    assert torch.cuda.current_device() != dev.index
    tree = trees.load("cityscapes")
    y = torch.randint(0, tree.num_leaves, (2, 17, 9), device=dev)
    for fn, channels in ((hss_kernels.hierarchical_softmax_loss, tree.num_leaves),
                         (hss_kernels.tree_min_loss, tree.num_nodes)):
        x = torch.randn(2, channels, 17, 9, device=dev, requires_grad=True)
        for backend in hss_kernels.available_backends(dev, fn.__name__):
            loss = fn(x, y, tree, backend=backend)
            (g,) = torch.autograd.grad(loss, x)
            ref = fn(x.detach().cpu(), y.cpu(), tree, backend="reference")
            torch.testing.assert_close(loss.cpu(), ref, rtol=1e-4, atol=1e-5)
            assert g.device == dev
