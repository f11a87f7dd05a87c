"""Tests of what only the Triton backend has: ``backend`` is "triton", on every device (the interpreter on
the CPU, compiled on CUDA)."""
import pytest

import helpers


@pytest.fixture
def backend(device):
    helpers.require("triton", device)
    return "triton"
