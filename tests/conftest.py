"""Test set-up.

* The Triton backend runs CPU tensors under its interpreter and CUDA tensors compiled, in one process
  (TRITON_INTERPRET stays unset).
* Fixtures ``device`` ("cpu", and "cuda" marked ``gpu``) and ``backend`` ("triton", "native"; skipped with
  the registry's reason where it cannot run on the device): a test that takes ``backend`` runs for every
  backend on every device. ``tests/native`` and ``tests/triton`` override ``backend`` with their own.
* Tests marked ``gpu`` skip cleanly without CUDA.
* ``helpers`` (this folder) is importable from the subfolders.
* Uninitialised memory is poisoned: every tensor from ``torch.empty*`` / ``at::empty*`` (kernel outputs
  and gradients included) starts as NaN (float) or the largest value (integers), so an element a kernel
  forgets to write fails the comparison instead of reading as a plausible 0 (PyTorch's
  ``fill_uninitialized_memory`` under ``use_deterministic_algorithms(True, warn_only=True)``).
* One intra-op thread per test (OpenMP threads spin under load); tests that need more set them.
* Every test gets fresh random inputs: torch's global generator is seeded from the OS per test, and a
  failing test's report shows the seed. ``HSS_SEED=<n>`` replays one.
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `import helpers` from tests/native, tests/triton

import helpers  # noqa: E402

DEVICES = ["cpu", helpers.CUDA]
BACKENDS = ["triton", "native"]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request):
    """Each device present: "cpu", and "cuda" (marked gpu, skipped without one)."""
    return request.param


@pytest.fixture(params=BACKENDS)
def backend(request, device):
    """Each kernel backend, on ``device``; skipped with the registry's reason where it cannot run there."""
    helpers.require(request.param, device)
    return request.param


@pytest.fixture(params=["default", "pixel"])
def cpu_path(request, monkeypatch):
    """The native CPU kernels' own paths ("default"), or ("pixel", HSS_CPU_PIXEL_PATH=1) the per-pixel code
    of the CUDA kernels run on the CPU."""
    if request.param == "pixel":
        monkeypatch.setenv("HSS_CPU_PIXEL_PATH", "1")
    else:
        monkeypatch.delenv("HSS_CPU_PIXEL_PATH", raising=False)
    return request.param


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """One intra-op thread per test. The CPU machines are shared and a GPU machine runs one pytest worker
    per core: several OpenMP threads per process spin against each other and against other load (a
    reference gradcheck took 2 s on one thread and 25-70 s on two under load). The native backend's
    threaded loop is checked with two threads by tests/native/test_native_cpu_paths.py."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _poison_uninitialised_memory():
    was_on, was_warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    yield
    torch.utils.deterministic.fill_uninitialized_memory = was_fill
    torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    seed = int(os.environ.get("HSS_SEED", int.from_bytes(os.urandom(4), "little")))
    torch.manual_seed(seed)
    request.node._hss_seed = seed
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    seed = getattr(item, "_hss_seed", None)
    if rep.failed and seed is not None:
        rep.sections.append(("random seed", f"HSS_SEED={seed} replays this test's inputs"))
