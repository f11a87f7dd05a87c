"""Tests of what only the native (C++/CUDA) backend has: ``backend`` is "native", on every device."""
import pytest

import helpers


@pytest.fixture
def backend(device):
    helpers.require("native", device)
    return "native"
