"""Triton launches on the current CUDA device, not on its arguments' (triton-lang/triton#2441): every
launch of the backend goes through ``_common.launch``, which runs a compiled kernel inside
``_common.device_guard(logits)``."""
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


def test_compiled_launches_are_guarded(monkeypatch):
    """A compiled launch (CUDA tensors) runs inside device_guard(like); an interpreted one needs none."""
    events = []

    @contextlib.contextmanager
    def recording_guard(t):
        events.append(("enter", t))
        yield
        events.append(("exit", t))

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kw: events.append(("run", grid, args, kw))

    monkeypatch.setattr(C, "device_guard", recording_guard)
    monkeypatch.setattr(C, "interpreted", lambda device: False)
    like = _Probe("cuda:1")
    C.launch(Kernel(), (3,), like, 1, 2, BLOCK=4, num_warps=8)
    assert events == [("enter", like), ("run", (3,), (1, 2), {"BLOCK": 4, "num_warps": 8}), ("exit", like)]


def test_every_kernel_goes_through_launch(monkeypatch):
    """Each op launches its kernels through _common.launch, on the logits (so on their device)."""
    launches = []
    real = C.launch

    def recording_launch(kernel, grid, like, *args, **kw):
        launches.append((kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__, like, args[0]))
        return real(kernel, grid, like, *args, **kw)

    monkeypatch.setattr(C, "launch", recording_launch)
    tree = trees.load("cityscapes")
    y = torch.randint(0, tree.num_leaves, (1, 3, 4))
    xl = torch.randn(1, tree.num_leaves, 3, 4, requires_grad=True)
    xn = torch.randn(1, tree.num_nodes, 3, 4, requires_grad=True)
    hss_kernels.hierarchical_softmax_loss(xl, y, tree, backend="triton").backward()
    hss_kernels.tree_min_loss(xn, y, tree, backend="triton").backward()
    triton_mod.OPS["decode"](xn.detach(), tree)
    names = [n for n, _, _ in launches]
    assert names.count("_hsm_kernel") == 2 and names.count("_tree_kernel") == 2 and "_decode_kernel" in names
    # the device comes from the logits (the first argument), never from the current device
    assert all(like is first for _, like, first in launches)


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
