"""Test set-up.

* The Triton backend runs CPU tensors under its interpreter and CUDA tensors compiled, in one process
  (TRITON_INTERPRET stays unset).
* Tests marked ``gpu`` skip cleanly without CUDA.
* Every test gets fresh random inputs: torch's global generator is seeded from the OS per test, and a
  failing test's report shows the seed. ``HSS_SEED=<n>`` replays one.
"""
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


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
