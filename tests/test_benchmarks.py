"""The benchmark command: runs end to end on the CPU at a tiny size, writes every column, counts bytes
by MATH.md §5. No test here asserts a speed or reads a clock."""
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import cases as C
from benchmarks.measure import PASSES, bytes_moved
from benchmarks.run import COLUMNS, main, parse_args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bytes_moved_hand_computed():
    # P = 2·3·5 = 30 pixels, C = 7 channels of bf16 (b = 2), int64 labels (8 B/pixel):
    # R = 30·(7·2 + 8) = 660; the gradient is 30·7·2 = 420 bytes.
    assert bytes_moved("forward", 30, 7, 2, 8, 4) == 660 + 4
    assert bytes_moved("forward+backward", 30, 7, 2, 8, 4) == 2 * 660 + 420
    assert bytes_moved("backward", 30, 7, 2, 8, 4) == 660 + 420
    # BCE baseline: a dense float target of the logits' shape and dtype replaces the labels.
    assert bytes_moved("forward+backward", 30, 7, 2, 7 * 2, 4) == 2 * 30 * 28 + 420
    # decode: logits in, int64 labels out.
    assert bytes_moved("forward", 30, 7, 4, 0, 8 * 30) == 30 * 28 + 240
    with pytest.raises(ValueError, match="unknown pass"):
        bytes_moved("sideways", 30, 7, 2, 8, 4)
    with pytest.raises(ValueError):
        bytes_moved("forward", -1, 7, 2, 8, 4)


def test_vistas_training_size_matches_math_md():
    # MATH.md §5: Vistas, B=8, 1024², 66 leaves, fp32: logits ≈ 2.2 GB, forward+backward ≈ 6.6 GB.
    P = 8 * 1024 * 1024
    total = bytes_moved("forward+backward", P, 66, 4, 8, 4)
    assert abs(P * 66 * 4 / 1e9 - 2.2) < 0.05
    assert abs(total / 1e9 - 6.8) < 0.1  # 3 × 2.2 GB of logits plus 2 × 67 MB of int64 labels


def _run_cli(tmp_path, *extra, size=(12, 20)):
    cmd = [sys.executable, "-m", "benchmarks", "--config", "small", "--size", "%dx%d" % size, "--reps", "2",
           "--warmup", "1", "--copy-mib", "8", "--out", str(tmp_path), *extra]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_cli_end_to_end_small_cpu(tmp_path):
    # 36x52: a tree-min tensor is 1.1 MB, well above the slack of Linux's per-CPU RSS counters (32 pages a CPU),
    # which the RSS probe below reads
    done = _run_cli(tmp_path, "--device", "cpu", "--backend", "reference,native", "--threads", "1", size=(36, 52))
    assert "| loss | backend | pass |" in done.stdout
    files = sorted(os.listdir(tmp_path))
    stems = {os.path.splitext(f)[0] for f in files}
    assert len(stems) == 1 and {os.path.splitext(f)[1] for f in files} == {".md", ".json", ".png"}
    stem = os.path.join(tmp_path, stems.pop())
    with open(stem + ".png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(stem + ".md", encoding="utf-8") as f:
        assert "copy bandwidth measured in this run" in f.read()
    doc = json.load(open(stem + ".json", encoding="utf-8"))

    meta = doc["meta"]
    for key in ("device_name", "torch", "triton", "cuda", "date_utc", "command"):
        assert key in meta
    assert "--config small" in meta["command"]
    copy = doc["copy_bandwidth"]
    assert copy["GBps"] == max(copy["GBps_start"], copy["GBps_end"]) > 0

    (cfg,) = doc["configs"]
    assert (cfg["batch"], cfg["height"], cfg["width"]) == (1, 36, 52)
    tree = C.load_tree("vistas")
    ok = [r for r in cfg["rows"] if r["status"] == "ok"]
    got = {(r["loss"], r["backend"], r["pass"]) for r in ok}
    for loss in C.DEFAULT_LOSSES:
        passes = PASSES if C.LOSSES[loss].has_backward else ("forward",)
        for p in passes:
            assert (loss, "reference", p) in got
            assert (loss, "flat", p) in got
    for r in ok:
        for col in COLUMNS:
            assert col in r, (col, r["loss"], r["backend"], r["pass"])
        assert r["median_ms"] > 0 and r["p25_ms"] <= r["median_ms"] <= r["p75_ms"]
        assert r["reps"] == 2 and len(r["times_ms"]) == 2
        # bytes by MATH.md §5, recomputed by hand from the configuration
        P = 36 * 52
        C_ = tree.num_leaves if r["loss"] == "hierarchical_softmax" else tree.num_nodes
        logits = P * C_ * 4
        if r["loss"] == "decode":
            want = logits + 8 * P
        else:
            labels = P * C_ * 4 if r["backend"] == "flat" and r["loss"] == "tree_min" else P * 8
            R = logits + labels
            want = {"forward": R + 4, "backward": R + logits, "forward+backward": 2 * R + logits}[r["pass"]]
        assert r["bytes"] == want, r
        assert r["GBps"] == pytest.approx(want / (r["median_ms"] * 1e-3) / 1e9)
        assert r["copy_share"] == pytest.approx(r["GBps"] / doc["copy_bandwidth"]["GBps"])
        assert r["speedup_vs_reference"] is not None and r["speedup_vs_flat"] is not None
        assert r["peak_extra_bytes"] is None or r["peak_extra_bytes"] >= 0
        if r["backend"] == "reference":
            assert r["check"] == 0.0 and r["speedup_vs_reference"] == 1.0
        if r["backend"] == "flat":
            assert r["check"] is None and r["speedup_vs_flat"] == 1.0
    # the reference's tree-min gradient pass needs memory the RSS probe can see (its tensors are above the
    # probe's 64 KiB mapping threshold and the counters' slack)
    assert any((r["peak_extra_bytes"] or 0) > 0 for r in ok if r["loss"] == "tree_min")
    # a backend that is not there is listed with its reason, never silently dropped
    for r in cfg["rows"]:
        if r["status"] != "ok":
            assert r["reason"]


def test_triton_on_cpu_is_never_timed_unmarked(monkeypatch):
    spec = C.LOSSES["hierarchical_softmax"]
    # the Triton backend runs on the CPU (under its interpreter); native pretends to be missing
    monkeypatch.setattr(C.hss_kernels, "available_backends", lambda device, op=None: ["reference", "triton"])
    status = C.hss_backends_for(spec, "cpu")
    assert status["reference"] is None and status["reference+compile"] is None
    assert status["triton"] is not None and "interpreter" in status["triton"]
    assert status["native"]  # not available: a reason, not None
    assert C.hss_backends_for(spec, "cpu", ["triton"]) == {"triton": None}
    assert C.row_label(spec, "triton", "cpu") == "triton (interpreter)"
    assert C.row_label(spec, "triton", "cuda") == "triton"
    assert C.row_label(spec, "flat", "cpu") == "F.cross_entropy"
    if torch.cuda.is_available():
        assert C.hss_backends_for(spec, "cuda")["triton"] is None


@pytest.fixture
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_sweep_points_and_chart(tmp_path, capsys, keep_threads):
    argv = ["--device", "cpu", "--threads", "1", "--config", "small", "--size", "8x8", "--reps", "1", "--warmup", "0",
            "--loss", "decode,hierarchical_softmax", "--backend", "reference", "--pass", "forward",
            "--memory", "off", "--copy-mib", "4", "--sweep", "--sweep-sizes", "4,8", "--sweep-leaves", "3,5",
            "--out", str(tmp_path)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "## Sweep" in out
    (jpath,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    doc = json.load(open(os.path.join(tmp_path, jpath)))
    pts = doc["sweep"]["points"]
    # 2 sizes + 2 trees, each × 2 losses × (reference + flat)
    assert len(pts) == 16 and all(p["status"] == "ok" for p in pts)
    res = [p for p in pts if p["sweep"] == "resolution"]
    assert sorted({p["pixels"] for p in res}) == [16, 64]
    cls = [p for p in pts if p["sweep"] == "classes" and p["loss"] == "hierarchical_softmax"]
    assert sorted({p["channels"] for p in cls}) == [3, 5]
    for p in pts:
        assert p["ns_per_pixel_channel"] == pytest.approx(p["median_ms"] * 1e6 / (p["pixels"] * p["channels"]))
    assert os.path.getsize(os.path.join(tmp_path, jpath[:-5] + ".png")) > 1000


@pytest.mark.parametrize("argv, message", [
    (["--config", "nowhere"], "unknown --config"),
    (["--size", "12"], "--size"),
    (["--size", "0x4"], "--size"),
    (["--loss", "dice"], "unknown --loss"),
    (["--backend", "cudnn"], "unknown --backend"),
    (["--pass", "sideways"], "unknown --pass"),
    (["--reps", "0"], "positive"),
    (["--sweep-leaves", "1"], "leaves"),
])
def test_bad_arguments_fail_clearly(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("leaves", [2, 3, 17, 66, 200])
def test_random_tree(leaves):
    t = C.random_tree(leaves, seed=leaves)
    assert t.num_leaves == leaves
    assert t.depth == 3
    # every internal node has a child: the tree has no leaf above depth 3
    assert all(d == 3 for c, d in enumerate(t.depths) if t.is_leaf(c))


def test_n_input_sets():
    assert C.n_input_sets(10 << 20, 50 << 20) == 8  # capped
    assert C.n_input_sets(60 << 20, 50 << 20) == 3  # > 3 × the cache in total
    assert C.n_input_sets(1 << 30, 50 << 20) == 1


def test_bce_target_is_the_path_indicator():
    tree = C.load_tree("pascal_person_part")
    spec = C.LOSSES["tree_min"]
    (s,) = C.make_inputs(spec, tree, 2, 3, 4, torch.float32, torch.device("cpu"), 1, need_dense_target=True)
    path = tree.tables("cpu").path
    for n, h, w in [(0, 0, 0), (1, 2, 3), (1, 1, 2)]:
        y = int(s["y"][n, h, w])
        assert torch.equal(s["t"][n, :, h, w], path[:, y].float())
    assert s["x"].abs().sum() > 0


def test_new_backends_are_picked_up_from_the_registry(monkeypatch):
    """A backend that appears in the registry gets rows with no change to the benchmarks: fake
    `native` and `triton` modules that forward to the reference stand in for the real ones."""
    import types

    from hss_kernels import backends, reference

    ops = {op: getattr(reference, op) for op in ("hierarchical_softmax_loss", "tree_min_loss", "decode")}
    for name in ("native", "triton"):
        fake = types.ModuleType(f"fake_{name}")
        fake.OPS = ops
        fake.unavailable_reason = lambda device: None
        monkeypatch.setitem(backends._loaded, name, fake)
        monkeypatch.delitem(backends._import_errors, name, raising=False)
    from benchmarks.run import run
    argv = ["--device", "cpu", "--config", "small", "--size", "4x6", "--reps", "1", "--warmup", "0",
            "--loss", "decode,hierarchical_softmax", "--backend", "reference,native,triton", "--memory", "off",
            "--copy-mib", "4", "--no-save"]
    args = parse_args(argv)
    args.argv = argv
    rows = run(args)["configs"][0]["rows"]
    for loss, passes in (("decode", ["forward"]), ("hierarchical_softmax", list(PASSES))):
        for backend, label in (("native", "native"), ("triton", "triton (interpreter)")):
            got = [r for r in rows if r["loss"] == loss and r["backend"] == backend]
            assert [r["pass"] for r in got] == passes
            for r in got:
                assert r["status"] == "ok" and r["label"] == label
                assert r["interpreter"] == (backend == "triton")
                assert r["check"] == 0.0  # the fake computes exactly the reference
                assert r["speedup_vs_reference"] is not None


def test_lowres_end_to_end_on_the_cpu(tmp_path):
    """python -m benchmarks.lowres at its CPU size: every row, the peak-memory probe, the JSON and the table
    (the numbers themselves are not checked: no test asserts a speed)."""
    from benchmarks import lowres
    assert lowres.main(["--config", "cpu", "--reps", "1", "--out", str(tmp_path)]) == 0
    (js,) = tmp_path.glob("lowres-*.json")
    doc = json.loads(js.read_text())
    rows = {r["row"]: r for r in doc["rows"]}
    assert set(rows) == set(lowres.ROWS) and doc["copy_bandwidth"]["GBps"] > 0
    for r in rows.values():
        assert r["ms"] > 0 and r["full_logits_bytes"] == 2 * 66 * 512 * 512 * 4
        assert r["peak_extra_bytes"] is None or r["peak_extra_bytes"] >= 0
    assert rows["fused"]["fused"] and rows["fused"]["shape"] == "2x66x64x64 -> 512x512"
    md = js.with_suffix(".md").read_text()
    assert md.count("| cpu | hierarchical_softmax_loss |") == 3 and "python -m benchmarks.lowres" in md
    with pytest.raises(SystemExit):
        lowres.main(["--config", "nowhere"])


def test_run_warnings_name_a_busy_machine_and_wide_rows():
    from benchmarks.measure import run_warnings
    row = {"status": "ok", "config": "small", "loss": "tree_min", "label": "native", "pass": "backward",
           "median_ms": 10.0, "iqr_ms": 1.0}
    wide = dict(row, label="reference", iqr_ms=3.0, **{"pass": "forward"})
    doc = {"meta": {"cpu_count": 2, "load_average_start": [0.4, 0, 0], "load_average_end": [0.9, 0, 0]},
           "configs": [{"rows": [row, wide]}]}
    w = run_warnings(doc)
    assert len(w) == 1 and w[0].startswith("1 row(s) spread widely") and "small tree_min reference forward" in w[0]
    doc["meta"]["load_average_end"] = [1.5, 0, 0]
    w = run_warnings(doc)
    assert w[0].startswith("busy machine: load average 0.4, 1.5 (start, end) on 2 logical cores")


@pytest.mark.parametrize("weights", ["class", "pixel", "class+pixel"])
def test_weighted_rows_match_the_flat_baseline_on_a_flat_tree(weights):
    # --weights: the flat baseline is weighted as a user would write it and the loss rows pass the same
    # weights, so on a flat tree the hierarchical softmax row and F.cross_entropy agree, values and gradients.
    from hss_kernels import Tree
    tree = Tree.from_parents([-1] * 7)
    spec = C.LOSSES["hierarchical_softmax"]
    (s,) = C.make_inputs(spec, tree, 2, 5, 3, torch.float64, torch.device("cpu"), 1, False, weights)
    assert ("pw" in s) == ("pixel" in weights)
    s["y"][0, 1, :2] = 255
    got_x = s["x"].clone().requires_grad_(True)
    want_x = s["x"].clone().requires_grad_(True)
    got = C._call(spec, tree, "reference", weights)(got_x, s["y"], None, s.get("pw"))
    want = C._call(spec, tree, "flat", weights)(want_x, s["y"], None, s.get("pw"))
    unweighted = C._call(spec, tree, "flat")(s["x"], s["y"], None, None)
    assert not torch.allclose(want, unweighted)  # the weights change the loss
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(torch.autograd.grad(got, got_x)[0], torch.autograd.grad(want, want_x)[0])


def test_weighted_cli_counts_the_pixel_weight_map(tmp_path):
    def run(weights):
        out = tmp_path / weights
        _run_cli(out, "--device", "cpu", "--backend", "native", "--threads", "1", "--loss", "hierarchical_softmax",
                 "--pass", "forward", "--weights", weights, "--memory", "off")
        (path,) = [p for p in out.iterdir() if p.suffix == ".json"]
        (cfg,) = json.load(open(path, encoding="utf-8"))["configs"]
        return cfg, {(r["backend"], r["pass"]): r for r in cfg["rows"] if r["status"] == "ok"}

    cfg, plain = run("none")
    wcfg, weighted = run("class+pixel")
    assert cfg["weights"] == "none" and wcfg["weights"] == "class+pixel"
    P = cfg["batch"] * cfg["height"] * cfg["width"]
    for key in [("native", "forward"), ("flat", "forward")]:
        assert weighted[key]["bytes"] == plain[key]["bytes"] + 4 * P
