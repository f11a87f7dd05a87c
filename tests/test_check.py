"""The user-facing self-check (``hss-check``): it runs every backend available on the device against the
reference and reports one row per check, and it fails when a backend is wrong."""
import functools
import io
import re
import types

import torch

import helpers
from hss_kernels import backends, check, reference, trees


def _rows(text):
    """(op, backend, tree, check, result) of each table row."""
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 6 and cells[0] != "op":
            rows.append((cells[0], cells[1], cells[2], cells[3], cells[5]))
    return rows


def test_quick_check_runs_every_available_backend(monkeypatch):
    """``hss-check --quick`` on the CPU exits 0 with a row per op, available backend, tree and check, every
    one ok, and the count it reports is the count of rows. Triton's functions forward to the native
    backend's here (or the reference's): under the interpreter its rows alone take a minute, and
    tests/test_*.py compare its kernels with the reference."""
    if "triton" in backends.available_backends("cpu"):
        stand_in = "native" if "native" in backends.available_backends("cpu") else "reference"
        fake = types.ModuleType(f"triton_forwarding_to_{stand_in}")
        fake.OPS = {op: backends.resolve(op, stand_in, torch.device("cpu")) for op in check.LOSSES + ["decode"]}
        fake.unavailable_reason = lambda device: None
        monkeypatch.setitem(backends._loaded, "triton", fake)
    out = io.StringIO()
    monkeypatch.setattr(check, "run", functools.partial(check.run, out=out))
    assert check.main(["--quick", "--device", "cpu"]) == 0
    text = out.getvalue()
    rows = _rows(text)
    quick_trees = [n for n in trees.names() if n in ("helen", "cityscapes")] + ["random"]
    want = []
    for op in check.LOSSES + ["decode"]:
        for b in backends.available_backends("cpu", op):
            for t in quick_trees:
                want += [(op, b, t, "labels float32")] if op == "decode" else [
                    (op, b, t, f"value+grad float32 {r}") for r in ("mean", "none")]
            if op != "decode":
                want.append((op, b, "random", "gradcheck float64"))
    want.append(("hierarchical_softmax_loss", "reference", "flat", "== F.cross_entropy"))
    assert [r[:4] for r in rows] == want
    assert all(r[4] == "ok" for r in rows), [r for r in rows if r[4] != "ok"]
    assert {"reference", "native"} <= {r[1] for r in rows}  # the extension is built here
    assert re.search(rf"^all {len(want)} checks hold$", text, re.M)


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
    fails = [r for r in _rows(out.getvalue()) if r[4] == "FAIL"]
    assert fails and {r[:2] for r in fails} == {("hierarchical_softmax_loss", "native")}


def test_a_missing_device_is_one_line_and_status_2(capsys):
    if torch.cuda.is_available():
        assert check.main(["--device", f"cuda:{torch.cuda.device_count()}", "--quick"]) == 2
    else:
        assert check.main(["--device", "cuda", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hss-check: --device cuda") and len(err.strip().splitlines()) == 1
    assert check.main(["--device", "tpu", "--quick"]) == 2


def test_a_backend_that_ran_nothing_is_not_a_pass(monkeypatch):
    monkeypatch.setitem(backends._loaded, "triton", helpers.absent_backend("not on this machine"))
    out = io.StringIO()
    assert not check.run("cpu", torch.float32, quick=True, backends=["triton"], out=out)
    text = out.getvalue()
    rows = _rows(text)
    assert {r[1] for r in rows if r[4] == "n/a"} == {"triton"} and "checks hold" not in text
    assert "nothing ran for --backend triton on cpu: not checked" in text
    assert re.search(r"^1 passed, 0 failed, 4 not run$", text, re.M)  # the reference's flat check ran
