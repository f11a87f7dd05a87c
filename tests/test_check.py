"""The user-facing self-check runs, reports, and fails when a backend is wrong."""
import io

import torch

from hss_kernels import backends, check, reference


def test_check_passes_on_this_machine():
    out = io.StringIO()
    assert check.run("cpu", torch.float32, quick=True, backends=["reference"], out=out)
    text = out.getvalue()
    assert "gradcheck float64" in text and "== F.cross_entropy" in text and "FAIL" not in text


def test_check_catches_a_wrong_backend(monkeypatch):
    def wrong(logits, target, tree, **kw):  # off by a little: the check must notice
        return reference.hierarchical_softmax_loss(logits, target, tree, **kw) * 1.001

    class Broken:
        OPS = {"hierarchical_softmax_loss": wrong}

        @staticmethod
        def unavailable_reason(device):
            return None

    monkeypatch.setitem(backends._loaded, "native", Broken)
    out = io.StringIO()
    assert not check.run("cpu", torch.float32, quick=True, backends=["native"], out=out)
    assert "FAIL" in out.getvalue()
    assert check.main(["--quick", "--backend", "reference"]) == 0
