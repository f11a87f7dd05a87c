"""backend="auto" on a CUDA device follows hss_kernels/gpu_auto.json, which benchmarks.auto_choice computes
from the committed GPU measurements, else from the static sm_90 model."""
import json

import pytest
import torch

from benchmarks import auto_choice
from hss_kernels import backends

CUDA = torch.device("cuda")


def test_committed_choice_is_up_to_date():
    """A new benchmark or model run committed under benchmarks/results/ must be followed by
    `python -m benchmarks.auto_choice --write`."""
    committed = json.load(open(auto_choice.OUT))
    assert committed == json.loads(json.dumps(auto_choice.choose())), \
        "hss_kernels/gpu_auto.json is stale: run python -m benchmarks.auto_choice --write"
    assert set(committed["ops"]) == {"hierarchical_softmax_loss", "tree_min_loss", "tree_bce_loss", "decode"}


def _model(rows):
    return {"kernels": [dict(op=op, backend=b, dtype=dt, layout=lay, issue_ms=i, floor_ms=f, **{"pass": p},
                             **({"upsample": up[0]} if up else {}))
                        for op, b, dt, p, lay, i, f, *up in rows]}


def _bench(device_type, date, dtype, rows):
    return {"meta": {"device_type": device_type, "date_utc": date},
            "configs": [{"dtype": dtype, "rows": [dict(loss=loss, backend=b, median_ms=ms, status="ok", **{"pass": p})
                                                  for loss, b, p, ms in rows]}]}


def test_model_then_measurements(tmp_path):
    model = tmp_path / "sm90.json"
    model.write_text(json.dumps(_model([
        # forward+backward by max(issue, floor): triton 5 + 2 = 7, native 1 + 4 = 5 -> native first
        ("hierarchical_softmax", "triton", "float32", "forward", "nchw", 5.0, 1.0),
        ("hierarchical_softmax", "triton", "float32", "backward", "nchw", 1.0, 2.0),
        ("hierarchical_softmax", "cuda", "float32", "forward", "nchw", 1.0, 0.5),
        ("hierarchical_softmax", "cuda", "float32", "backward", "nchw", 4.0, 2.0),
        ("hierarchical_softmax", "cuda", "float32", "backward", "channels_last", 99.0, 2.0),  # not NCHW: ignored
        ("hierarchical_softmax", "cuda", "float32", "backward", "nchw", 99.0, 2.0, 4),  # upsampled x4: ignored
        ("decode", "triton", "bfloat16", "forward", "nchw", 3.0, 1.0),
        ("decode", "cuda", "bfloat16", "forward", "nchw", 2.0, 1.0),
    ])))
    doc = auto_choice.choose(str(tmp_path), str(model))
    hs = doc["ops"]["hierarchical_softmax_loss"]["float32"]
    assert hs["order"] == ["native", "triton"] and hs["ms"] == {"native": 5.0, "triton": 7.0}
    assert hs["source"].startswith("model")
    assert doc["ops"]["decode"]["bfloat16"]["order"] == ["native", "triton"]

    # a CUDA benchmark that timed both backends overrides the model; CPU runs and one-backend rows do not
    (tmp_path / "gpu-1.json").write_text(json.dumps(_bench("cuda", "2026-12-01T00:00:00Z", "float32", [
        ("hierarchical_softmax", "triton", "forward+backward", 1.0),
        ("hierarchical_softmax", "native", "forward+backward", 2.0),
        ("hierarchical_softmax", "native", "forward", 0.1),
        ("decode", "triton", "forward", 1.0)])))
    (tmp_path / "cpu-1.json").write_text(json.dumps(_bench("cpu", "2026-12-02T00:00:00Z", "bfloat16", [
        ("decode", "triton", "forward", 9.0), ("decode", "native", "forward", 1.0)])))
    doc = auto_choice.choose(str(tmp_path), str(model))
    hs = doc["ops"]["hierarchical_softmax_loss"]["float32"]
    assert hs["order"] == ["triton", "native"] and hs["source"] == "measured: " + auto_choice._rel(
        str(tmp_path / "gpu-1.json"))
    assert doc["ops"]["decode"]["bfloat16"]["source"].startswith("model")

    # the newest CUDA run wins
    (tmp_path / "gpu-0.json").write_text(json.dumps(_bench("cuda", "2026-12-03T00:00:00Z", "float32", [
        ("hierarchical_softmax", "triton", "forward+backward", 3.0),
        ("hierarchical_softmax", "native", "forward+backward", 2.0)])))
    assert auto_choice.choose(str(tmp_path), str(model))["ops"]["hierarchical_softmax_loss"]["float32"]["order"] \
        == ["native", "triton"]


@pytest.fixture
def every_backend_on_cuda(monkeypatch):
    """Both backends 'run' on CUDA (their modules import on the CPU); resolve then follows the order."""
    for name in ("triton", "native"):
        if backends._module(name) is None:
            pytest.skip(f"{name} backend not importable here")
    monkeypatch.setattr(backends, "unavailable_reason", lambda name, device="cpu", op=None: None)


def test_auto_on_cuda_follows_the_committed_order(every_backend_on_cuda, monkeypatch):
    order = {"hierarchical_softmax_loss": {"float32": ["triton", "native"], "bfloat16": ["native", "triton"]},
             "decode": {"float32": ["native", "triton"]}}
    monkeypatch.setattr(backends, "_gpu_order", order)
    triton_ops, native_ops = backends._ops("triton"), backends._ops("native")
    hs = "hierarchical_softmax_loss"
    assert backends.resolve(hs, "auto", CUDA, torch.float32) is triton_ops[hs]
    assert backends.resolve(hs, "auto", CUDA, torch.float64) is triton_ops[hs]  # float64 follows float32
    assert backends.resolve(hs, "auto", CUDA, torch.bfloat16) is native_ops[hs]
    assert backends.resolve(hs, "auto", CUDA, torch.float16) is native_ops[hs]  # float16 follows bfloat16
    assert backends.resolve("decode", "auto", CUDA, torch.bfloat16) is native_ops["decode"]  # falls back to float32
    # an op the file does not list: native first
    assert backends.resolve("tree_min_loss", "auto", CUDA, torch.float32) is native_ops["tree_min_loss"]
    # the first in the order that runs
    monkeypatch.setattr(backends, "unavailable_reason",
                        lambda name, device="cpu", op=None: "absent" if name == "triton" else None)
    assert backends.resolve(hs, "auto", CUDA, torch.float32) is native_ops[hs]
    # the CPU ignores the file
    assert backends.resolve(hs, "auto", torch.device("cpu"), torch.float32) is native_ops[hs]


def test_the_package_reads_the_committed_file(monkeypatch):
    monkeypatch.setattr(backends, "_gpu_order", None)
    committed = json.load(open(auto_choice.OUT))["ops"]
    for op, per in committed.items():
        for dtype, entry in per.items():
            assert backends.gpu_auto_order(op, getattr(torch, dtype)) == entry["order"]
