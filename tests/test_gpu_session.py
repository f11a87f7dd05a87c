"""python -m benchmarks.gpu_session: the stage runner (time limits, process groups, skips, background
stages, signals), the output folder's limits, the summary files, the parsers, the model comparison and
the benchmark options the session uses. Every stage here is a tiny fake command or function: no build,
no benchmark at a real size. The real ``--dry-run`` end to end is CI's step (.ci/run), not a test here."""
import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest

from benchmarks.gpu_session import model as M
from benchmarks.gpu_session import parse as P
from benchmarks.gpu_session import runner as R
from benchmarks.gpu_session import stages as S
from benchmarks.gpu_session.summary import headline, render, stage_table_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for a parent that is gone counts as not running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _cmd_stage(name, code, fraction=0.1, min_s=0.1, **kw):
    """A stage that runs ``python -c code``."""
    return R.Stage(name, fraction, min_s, lambda ctx: {"note": "ran"} if ctx.run([PY, "-c", code]) else None, **kw)


def _session(tmp_path, stage_list, budget=30.0, reserve=0.0, **kw):
    return R.Session(stage_list, str(tmp_path / "out"), str(tmp_path / "work"), budget, root=str(tmp_path),
                     reserve_s=reserve, render_md=render, stream=io.StringIO(), **kw)


def _summary(tmp_path):
    with open(tmp_path / "out" / "summary.json") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ budgets
def test_stage_timeout_shares_minimums_and_skips():
    a, b, c = R.Stage("a", 0.2, 5, None), R.Stage("b", 0.3, 10, None), R.Stage("c", 0.5, 20, None)
    bg = R.Stage("bg", 0.4, 5, None, background=True)
    # its share of what is left among itself and the later foreground stages
    assert R.stage_timeout(100, a, [b, c], 100) == pytest.approx(20)
    assert R.stage_timeout(100, b, [c], 100) == pytest.approx(100 * 0.3 / 0.8)
    assert R.stage_timeout(100, c, [], 100) == pytest.approx(100)
    # a background stage neither takes from nor counts in the shares
    assert R.stage_timeout(100, a, [bg, b, c], 100) == pytest.approx(20)
    assert R.stage_timeout(50, bg, [b, c], 100) == pytest.approx(40)
    assert R.stage_timeout(30, bg, [b, c], 100) == pytest.approx(30)
    # at least its minimum...
    assert R.stage_timeout(12, b, [], 100) == pytest.approx(12)
    assert R.stage_timeout(40, R.Stage("m", 0.01, 15, None), [c], 100) == pytest.approx(15)
    # ...and above it, it leaves the later stages theirs: 35 left, share 22.5, later minimum 20 -> 15
    assert R.stage_timeout(35, R.Stage("x", 0.9, 1, None), [c], 100) == pytest.approx(15)
    assert R.stage_timeout(22, R.Stage("y", 0.9, 1, None), [c], 100) == pytest.approx(2)
    # its own minimum comes first: 10 left, later minimum 20 -> still its 5
    assert R.stage_timeout(10, a, [c], 100) == pytest.approx(5)
    # skipped when its minimum does not fit
    assert R.stage_timeout(9, b, [c], 100) is None
    assert R.stage_timeout(0, a, [], 100) is None


def test_the_session_stages_fill_the_budget_and_say_what_they_run():
    st = S.stages()
    assert [s.name for s in st] == ["environment", "check-triton", "build", "tests", "check", "bench", "lowres",
                                    "sanitizer", "model"]
    assert sum(s.fraction for s in st if not s.background) == pytest.approx(1.0)
    assert all(s.gpu and s.dry and s.min_s > 0 for s in st)
    bg = [s for s in st if s.background]
    assert [(s.name, s.join_before) for s in bg] == [("check-triton", "check")]
    # 540 s with nothing used early: the build gets well over the two minutes it may need on 16 cores
    usable = 530
    t_build = R.stage_timeout(usable - 5, st[2], st[3:], usable)
    assert t_build > 150


# ------------------------------------------------------------------------------------------ the runner
def test_a_stage_that_times_out_is_killed_with_its_group_and_later_stages_run(tmp_path):
    code = textwrap.dedent("""
        import subprocess, sys, time
        p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        print("CHILDPID=%d" % p.pid, flush=True)
        time.sleep(60)
    """)
    slow = _cmd_stage("slow", code, fraction=0.1, min_s=0.5)
    after = _cmd_stage("after", "print('after ran')", fraction=0.9)
    t0 = time.monotonic()
    rc = _session(tmp_path, [slow, after], budget=20).run()
    took = time.monotonic() - t0
    s = _summary(tmp_path)
    assert rc == 1
    assert s["stages"]["slow"]["status"] == "timeout"
    assert s["stages"]["slow"]["budget_s"] == 2  # 10% of 20 s
    assert s["stages"]["after"]["status"] == "ok"
    assert took < 15, took  # 2 s, then SIGTERM to the group: nobody waited for the 60 s sleeps
    log = (tmp_path / "work" / "logs" / "slow.log").read_text()
    assert re.search(r"CHILDPID=\d+", log) and "stopped after its time limit" in log  # the partial log is kept
    child = int(re.search(r"CHILDPID=(\d+)", log).group(1))
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the stage's grandchild survived its process group's kill"
    assert "after ran" in (tmp_path / "work" / "logs" / "after.log").read_text()
    # the timed-out stage's log tail is in the summary and in summary.md's failures
    assert "CHILDPID=" in "".join(s["stages"]["slow"]["log_tails"].values())
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "## Failures" in md and "### slow: timeout" in md


def test_a_failing_or_raising_stage_does_not_stop_the_next(tmp_path):
    def boom(ctx):
        raise RuntimeError("kaboom")

    st = [_cmd_stage("fails", "import sys; print('bad'); sys.exit(3)"), R.Stage("raises", 0.1, 0.1, boom),
          _cmd_stage("fine", "print('fine')"),
          R.Stage("says", 0.1, 0.1, lambda ctx: {"status": "failed", "note": "by its own account"})]
    rc = _session(tmp_path, st).run()
    s = _summary(tmp_path)["stages"]
    assert rc == 1
    assert [s[n]["status"] for n in ("fails", "raises", "fine", "says")] == ["failed", "failed", "ok", "failed"]
    assert "RuntimeError: kaboom" in s["raises"]["note"]
    assert "Traceback" in (tmp_path / "work" / "logs" / "raises.log").read_text()
    assert "exit status 3" in (tmp_path / "work" / "logs" / "fails.log").read_text()


def test_a_stage_that_would_start_with_too_little_time_is_skipped(tmp_path):
    # first: its minimum (4 s) outranks greedy's reservation; after its 1.5 s, greedy's 9 s no longer fit
    st = [_cmd_stage("first", "import time; time.sleep(1.5)", fraction=0.5, min_s=4),
          _cmd_stage("greedy", "print('never')", fraction=0.25, min_s=9),
          _cmd_stage("small", "print('small')", fraction=0.25, min_s=0.5)]
    rc = _session(tmp_path, st, budget=10).run()
    s = _summary(tmp_path)["stages"]
    assert rc == 0  # skipped is not a failure
    assert s["first"]["status"] == "ok"
    assert s["greedy"]["status"] == "skipped"
    assert "needs at least 9 s" in s["greedy"]["note"]
    assert s["small"]["status"] == "ok"
    assert not os.path.exists(tmp_path / "work" / "logs" / "greedy.log")


def test_summary_and_logs_are_written_after_every_stage(tmp_path):
    seen = {}

    def look(ctx):  # the second stage reads what the first one left in the output folder
        s = json.load(open(os.path.join(ctx.out, "summary.json")))
        seen["first"] = s["stages"]["first"]["status"]
        seen["me"] = s["stages"]["second"]["status"]
        seen["md"] = open(os.path.join(ctx.out, "summary.md")).read()
        with tarfile.open(os.path.join(ctx.out, "logs.tar.gz")) as t:
            seen["tar"] = {m.name: t.extractfile(m).read().decode() for m in t.getmembers() if m.isfile()}
        return {"status": "ok", "note": "looked"}

    _session(tmp_path, [_cmd_stage("first", "print('hello from first')"), R.Stage("second", 0.1, 0.1, look)]).run()
    assert seen["first"] == "ok" and seen["me"] == "running"
    assert "| first | ok |" in seen["md"] and "| second | running |" in seen["md"]
    assert "hello from first" in seen["tar"]["session/logs/first.log"]
    s = _summary(tmp_path)
    assert s["session"]["finished"] and s["stages"]["second"]["note"] == "looked"
    assert sorted(os.listdir(tmp_path / "out")) == ["logs.tar.gz", "summary.json", "summary.md"]


def test_a_background_stage_runs_beside_the_next_ones_and_is_joined(tmp_path):
    order = []

    def bg(ctx):
        ctx.run([PY, "-c", "import time; time.sleep(1.5)"])
        order.append("bg done")
        return {"status": "ok", "note": "bg"}

    def fg(ctx):
        order.append("fg")
        return {"status": "ok", "note": "fg"}

    def joiner(ctx):
        order.append("joiner")
        return {"status": "ok", "note": "j"}

    st = [R.Stage("bg", 0.5, 0.1, bg, background=True, join_before="joiner"), R.Stage("fg", 0.1, 0.1, fg),
          R.Stage("joiner", 0.1, 0.1, joiner)]
    assert _session(tmp_path, st).run() == 0
    assert order == ["fg", "bg done", "joiner"]
    s = _summary(tmp_path)["stages"]
    assert s["bg"]["status"] == "ok" and s["bg"]["budget_s"] == 15  # 50% of the 30 s budget


def test_a_session_stopped_from_outside_still_leaves_its_summary(tmp_path):
    script = tmp_path / "sess.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {ROOT!r})
        from benchmarks.gpu_session import runner as R
        from benchmarks.gpu_session.summary import render
        code = "import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); print('CHILDPID=%d' % p.pid, flush=True); time.sleep(60)"
        st = [R.Stage("quick", 0.1, 0.1, lambda ctx: ctx.run([sys.executable, "-c", "print(1)"]) and None),
              R.Stage("long", 0.5, 0.1, lambda ctx: ctx.run([sys.executable, "-c", code]) and None),
              R.Stage("never", 0.4, 0.1, lambda ctx: ctx.run([sys.executable, "-c", "print(2)"]) and None)]
        s = R.Session(st, {str(tmp_path / 'out')!r}, {str(tmp_path / 'work')!r}, 100, reserve_s=0, render_md=render)
        sys.exit(s.run())
    """))
    p = subprocess.Popen([PY, str(script)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "work" / "logs" / "long.log"
    deadline = time.monotonic() + 30
    while not (log.exists() and re.search(r"CHILDPID=\d+", log.read_text())) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert log.exists(), p.communicate(timeout=10)[0]
    child = int(re.search(r"CHILDPID=(\d+)", log.read_text()).group(1))
    p.send_signal(signal.SIGTERM)
    out, _ = p.communicate(timeout=20)
    assert p.returncode == 1, out
    s = _summary(tmp_path)["stages"]
    assert s["quick"]["status"] == "ok"
    assert s["long"]["status"] == "timeout" and "stopped from outside" in s["long"]["note"]
    assert s["never"]["status"] == "skipped"
    time.sleep(0.5)
    assert not _alive(child)
    with tarfile.open(tmp_path / "out" / "logs.tar.gz") as t:
        assert "session/logs/long.log" in t.getnames()


# ------------------------------------------------------------------------------------------ the output folder
def _write(path, data=b"x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)


def test_out_limits_found_and_enforced(tmp_path, monkeypatch):
    out, over = tmp_path / "out", tmp_path / "work" / "overflow"
    for name in ["summary.json", "summary.md", "logs.tar.gz", "bench.json"] + [f"extra{i}.txt" for i in range(6)]:
        _write(str(out / name))
    _write(str(out / "a" / "b" / "ok.txt"))           # two folders down: comes back
    _write(str(out / "a" / "b" / "c" / "deep.txt"))   # three: does not
    _write(str(out / "bad name.txt"))
    monkeypatch.setattr(R, "MAX_FILE_BYTES", 100)
    _write(str(out / "big.bin"), b"y" * 101)
    os.symlink(str(out / "extra0.txt"), str(out / "link.txt"))
    problems = dict(R.out_problems(str(out), R.PRIORITY + ("bench.json",)))
    assert problems["a/b/c/deep.txt"].startswith("more than 2 folders")
    assert "characters" in problems["bad name.txt"]
    assert "over" in problems["big.bin"]
    assert problems["link.txt"] == "a link"
    too_many = [r for r, why in problems.items() if why == "more than 8 files"]
    # 11 plain files fit the rules; the priority ones and then the first by name stay
    assert len(too_many) == 3 and not {"summary.json", "summary.md", "logs.tar.gz", "bench.json"} & set(too_many)
    moved = R.enforce_out_limits(str(out), str(over), R.PRIORITY + ("bench.json",))
    assert len(moved) == len(problems)
    assert R.out_problems(str(out)) == []
    left = [os.path.relpath(os.path.join(d, f), out) for d, _, fs in os.walk(out) for f in fs]
    assert len(left) == 8 and "summary.json" in left and "bench.json" in left
    assert (over / "a" / "b" / "c" / "deep.txt").exists() and (over / "big.bin").exists()
    assert not (out / "a" / "b" / "c").exists()  # the emptied folder went too


def test_the_session_moves_stray_files_into_the_logs_tarball(tmp_path):
    def litter(ctx):
        for i in range(9):
            _write(os.path.join(ctx.out, f"stray{i}.txt"), b"stray")
        _write(os.path.join(ctx.out, "x", "y", "z", "deep.txt"), b"deep")
        return {"status": "ok", "note": "littered"}

    _session(tmp_path, [R.Stage("litter", 1.0, 0.1, litter)]).run()
    out = tmp_path / "out"
    assert R.out_problems(str(out)) == []
    files = [f for _, _, fs in os.walk(out) for f in fs]
    assert len(files) == 8 and {"summary.json", "summary.md", "logs.tar.gz"} <= set(files)
    with tarfile.open(out / "logs.tar.gz") as t:
        names = t.getnames()
    assert "session/overflow/x/y/z/deep.txt" in names
    assert sum(n.startswith("session/overflow/stray") for n in names) == 4  # 3 + 5 kept = 8
    assert len(_summary(tmp_path)["session"]["moved_into_logs"]) == 5


def test_pack_keeps_the_head_and_tail_of_a_huge_log(tmp_path):
    src = tmp_path / "w"
    _write(str(src / "logs" / "big.log"), b"HEAD" + b"." * 5000 + b"TAIL")
    _write(str(src / "logs" / "small.log"), b"small")
    R.pack_folder(str(src), str(tmp_path / "l.tar.gz"), keep_bytes=1000)
    with tarfile.open(tmp_path / "l.tar.gz") as t:
        big = t.extractfile("session/logs/big.log").read()
        assert t.extractfile("session/logs/small.log").read() == b"small"
    assert big.startswith(b"HEAD") and big.endswith(b"TAIL") and b"cut by the GPU session" in big and len(big) < 1200


# ------------------------------------------------------------------------------------------ parsers
JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites name="pytest tests"><testsuite name="pytest" errors="1"
failures="1" skipped="2" tests="6" time="3.0"><testcase classname="tests.test_a" name="test_ok[cuda]" time="0.5" />
<testcase classname="tests.test_a" name="test_bad[cuda]" time="1.0"><failure message="assert 1 == 2">tb</failure>
</testcase><testcase classname="tests.test_b.TestThing" name="test_err" time="0.1"><error message="boom">tb</error>
</testcase><testcase classname="tests.test_b" name="test_s1" time="0"><skipped type="pytest.skip"
message="needs a CUDA GPU">x</skipped></testcase><testcase classname="tests.test_b" name="test_s2" time="0"><skipped
type="pytest.skip" message="needs a CUDA GPU">x</skipped></testcase><testcase classname="tests.test_c" name="test_ok2"
time="0.2" /></testsuite></testsuites>"""


def test_junit_counts(tmp_path):
    p = tmp_path / "j.xml"
    p.write_text(JUNIT)
    c = P.junit_counts(str(p))
    assert (c["tests"], c["passed"], c["failed"], c["errors"], c["skipped"]) == (6, 2, 1, 1, 2)
    assert c["failed_ids"] == ["tests/test_a.py::test_bad[cuda]"]
    assert c["error_ids"] == ["tests/test_b.py::TestThing::test_err"]
    assert c["skip_reasons"] == {"needs a CUDA GPU": 2}
    assert c["time_s"] == pytest.approx(1.8)
    assert P.junit_counts(str(p), max_ids=0)["failed_ids"] == ["... and 1 more"]
    (tmp_path / "cut.xml").write_text(JUNIT[:200])
    with pytest.raises(Exception):
        P.junit_counts(str(tmp_path / "cut.xml"))


def test_the_tests_stage_counts_a_real_pytest_run(tmp_path):
    """The harness of the tests stage on a tiny suite of its own: counts from the JUnit report, failing
    ids in the summary, status failed."""
    suite = tmp_path / "tests"
    suite.mkdir()
    (suite / "test_tiny.py").write_text(textwrap.dedent("""
        import pytest
        def test_good(): pass
        def test_bad(): assert 1 == 2
        @pytest.mark.skip(reason="not here")
        def test_skipped(): pass
    """))
    sess = _session(tmp_path, [R.Stage("tests", 1.0, 1, S.stage_tests)], budget=120)
    sess.dry_run = True  # -k 'gpu or ...' selects nothing in this suite: patch the selection
    old = S.DRY_TESTS_K
    S.DRY_TESTS_K = "good or bad or skipped"
    try:
        assert sess.run() == 1
    finally:
        S.DRY_TESTS_K = old
    rec = _summary(tmp_path)["stages"]["tests"]
    assert rec["status"] == "failed"
    assert rec["counts"]["passed"] == 1 and rec["counts"]["failed"] == 1 and rec["counts"]["skipped"] == 1
    assert rec["failed_ids"] == ["tests/test_tiny.py::test_bad"]
    assert rec["note"].startswith("1 passed, 1 failed, 0 errors, 1 skipped of 3")


CHECK_OUT = """hss_kernels self-check on cuda (NVIDIA H200), torch 2.11.0, backends: reference, triton, native
| op                        | backend   | tree       | check                   | max rel err | result |
|---------------------------|-----------|------------|-------------------------|-------------|--------|
| hierarchical_softmax_loss | native    | cityscapes | value+grad float32 mean | 4.9e-08     | ok     |
| tree_min_loss             | native    | vistas     | value+grad float32 none | 3.0e-02     | FAIL   |
| decode                    | triton    | -          | not run: no GPU         |             | n/a    |
| hierarchical_softmax_loss | reference | flat       | == F.cross_entropy      | 0.0e+00     | ok     |
2 passed, 1 failed
"""


def test_check_table():
    t = P.check_table(CHECK_OUT)
    assert (t["ok"], t["failed"], t["not_run"]) == (2, 1, 1)
    assert t["failed_rows"] == ["tree_min_loss | native | vistas | value+grad float32 none | 3.0e-02 | FAIL"]
    assert t["final_line"] == "2 passed, 1 failed"
    assert t["header"].startswith("hss_kernels self-check on cuda")
    assert P.check_table("all 25 checks hold\n")["final_line"] == "all 25 checks hold"


def test_check_without_the_extension_really_goes_without_it():
    """check-triton runs hss-check in a process that never loads hss_kernels._C (the build rewrites it)."""
    p = subprocess.run([PY, "-c", S.NO_EXTENSION + "\n", "--device", "cpu", "--backend", "native", "--quick"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    t = P.check_table(p.stdout)
    # native asked for and never run: not a pass (hss-check exits 1 and says so)
    assert p.returncode == 1 and "nothing ran for --backend native on cpu" in p.stdout, p.stderr[-2000:]
    assert t["not_run"] == 4 and all("not run: the C++ extension" in r for r in t["not_run_rows"])
    assert t["final_line"] == "1 passed, 0 failed, 4 not run"


SANITIZER_OUT = """========= COMPUTE-SANITIZER
CALL native hierarchical_softmax vistas 2x3x5 float32 mean
DONE native hierarchical_softmax vistas 2x3x5 float32 mean
CALL native tree_min vistas 2x3x5 float32 mean gamma=2
========= Invalid __global__ read of size 4 bytes
=========     at tree_min_fwd_kernel+0x1a0
========= Invalid __global__ read of size 4 bytes
=========     at tree_min_fwd_kernel+0x1a0
DONE native tree_min vistas 2x3x5 float32 mean gamma=2
CALL native decode vistas 2x3x5 float32 sigmoid sum
RAISED native decode vistas 2x3x5 float32 sigmoid sum
UNAVAILABLE triton on cuda: no
sancalls: 2 calls ran, 1 raised
========= ERROR SUMMARY: 2 errors
"""


def test_sanitizer_log():
    s = P.sanitizer_log(SANITIZER_OUT)
    assert s["errors"] == 2 and s["error_kinds"] == {"Invalid __global__ read of size 4 bytes": 2}
    assert (s["calls"], s["done"]) == (3, 2)
    assert s["raised"] == ["native decode vistas 2x3x5 float32 sigmoid sum"]
    assert s["last_call"] == "native decode vistas 2x3x5 float32 sigmoid sum"
    assert s["unavailable"] == ["triton on cuda: no"]
    assert P.sanitizer_log("CALL a\nDONE a\n")["errors"] is None


# ------------------------------------------------------------------------------------------ the model
def _bench_doc():
    def row(config, loss, backend, p, ms, status="ok"):
        return {"config": config, "loss": loss, "backend": backend, "label": backend, "pass": p, "status": status,
                "median_ms": ms, "bytes": 4e9, "check": 0.0, "timer": "cuda-events",
                **({"reason": "time limit reached"} if status != "ok" else {})}
    return {"meta": {"device_name": "NVIDIA H200", "command": "python -m benchmarks ..."},
            "copy_bandwidth": {"GBps": 4000.0},
            "configs": [
                {"name": "vistas", "dtype": "float32", "batch": 8, "height": 1024, "width": 1024, "rows": [
                    row("vistas", "hierarchical_softmax", "native", "forward", 1.0),
                    row("vistas", "hierarchical_softmax", "native", "backward", 2.0),
                    row("vistas", "hierarchical_softmax", "native", "forward+backward", 3.5),
                    row("vistas", "hierarchical_softmax", "triton", "forward+backward", 4.0),
                    row("vistas", "hierarchical_softmax", "flat", "forward+backward", 2.5),
                    row("vistas", "tree_min", "native", "forward", 9.0)]},   # vistas has no tree_min model
                {"name": "vistas2", "dtype": "float32", "batch": 8, "height": 1024, "width": 1024, "rows": [
                    row("vistas2", "tree_min", "native", "forward+backward", 6.0),
                    row("vistas2", "tree_bce", "triton", "forward", 2.0),
                    row("vistas2", "decode", "native", "forward", 0.5),
                    row("vistas2", "decode", "triton", "forward", 0.7, status="skipped")]}]}


def _model_doc():
    def k(op, backend, p, issue, floor, layout="nchw", dtype="float32", **extra):
        return {"op": op, "backend": backend, "dtype": dtype, "pass": p, "layout": layout, "registers": 64,
                "issue_ms": issue, "floor_ms": floor, **extra}
    return {"assumptions": {"copy_GBps": 4300, "batch": 8}, "kernels": [
        k("hierarchical_softmax", "cuda", "forward", 0.8, 0.6),
        k("hierarchical_softmax", "cuda", "backward", 1.5, 1.1),
        k("hierarchical_softmax", "cuda", "forward", 9.0, 9.0, layout="channels_last"),  # not NCHW: ignored
        k("hierarchical_softmax", "cuda", "forward", 9.0, 9.0, dtype="bfloat16"),       # other dtype: ignored
        k("hierarchical_softmax", "cuda", "forward", 9.0, 9.0, upsample=4),  # low-resolution logits: ignored
        k("hierarchical_softmax", "cuda", "backward", 0.1, 0.05, upsample=1),  # at the labels' size: summed
        k("hierarchical_softmax", "triton", "forward", 1.0, 0.6),
        k("hierarchical_softmax", "triton", "backward", 2.0, 1.1),
        k("tree_min", "cuda", "forward", 2.0, 1.5), k("tree_min", "cuda", "backward", 3.0, 2.5),
        k("tree_min", "triton", "forward", 1.0, 1.0),
        k("decode", "cuda", "forward", 0.4, 0.25),
        k("tree_bce", "cuda", "forward", 1.0, 1.0)]}                      # no triton tree_bce: unmatched


def test_model_comparison_against_a_fake_model():
    cmp = M.compare(_bench_doc(), _model_doc(), "benchmarks/results/sm90-test.json")
    got = {(r["config"], r["loss"], r["backend"], r["pass"]): r for r in cmp["rows"]}
    assert set(got) == {("vistas", "hierarchical_softmax", "native", "forward"),
                        ("vistas", "hierarchical_softmax", "native", "backward"),
                        ("vistas", "hierarchical_softmax", "native", "forward+backward"),
                        ("vistas", "hierarchical_softmax", "triton", "forward+backward"),
                        ("vistas2", "tree_min", "native", "forward+backward"),
                        ("vistas2", "decode", "native", "forward")}
    r = got[("vistas", "hierarchical_softmax", "native", "backward")]
    assert r["model_backend"] == "cuda" and r["model_kernels"] == 2
    assert r["model_issue_ms"] == pytest.approx(1.6) and r["model_floor_ms"] == pytest.approx(1.15)
    r = got[("vistas", "hierarchical_softmax", "native", "forward+backward")]  # forward + both backward kernels
    assert r["model_issue_ms"] == pytest.approx(2.4) and r["model_floor_ms"] == pytest.approx(1.75)
    assert r["measured_over_floor"] == pytest.approx(3.5 / 1.75)
    r = got[("vistas", "hierarchical_softmax", "triton", "forward+backward")]
    assert r["model_backend"] == "triton" and r["model_floor_ms"] == pytest.approx(1.7)
    assert got[("vistas2", "tree_min", "native", "forward+backward")]["model_floor_ms"] == pytest.approx(4.0)
    assert got[("vistas2", "decode", "native", "forward")]["measured_over_issue"] == pytest.approx(0.5 / 0.4)
    # the model has no Triton tree_bce: listed, not guessed
    assert [(u["loss"], u["backend"], u["missing_model_passes"]) for u in cmp["unmatched"]] == [
        ("tree_bce", "triton", ["forward"])]
    assert cmp["assumptions"] == {"copy_GBps": 4300, "batch": 8}


def test_newest_model_json(tmp_path):
    assert M.newest_model_json(str(tmp_path)) is None
    for name in ["sm90-2026-12-01.json", "sm90-2026-12-01-2.json", "sm90-2026-11-30-3.json", "sm90-2026-12-01.md"]:
        _write(str(tmp_path / name), b"{}")
    assert os.path.basename(M.newest_model_json(str(tmp_path))) == "sm90-2026-12-01-2.json"
    _write(str(tmp_path / "sm90-2026-12-10.json"), b"{}")
    assert os.path.basename(M.newest_model_json(str(tmp_path))) == "sm90-2026-12-10.json"


def test_the_model_stage_puts_the_estimates_beside_the_headline(tmp_path):
    model_path = tmp_path / "sm90-2026-12-01.json"
    model_path.write_text(json.dumps(_model_doc()))
    bench = _bench_doc()

    def fake_bench(ctx):
        ctx.shared["bench_doc"] = bench
        ctx.session.set_top("bench", dict(headline(bench), files=["NVIDIA-H200-2026-12-01.json"]))
        return {"status": "ok", "note": "fake"}

    sess = _session(tmp_path, [R.Stage("bench", 0.5, 0.1, fake_bench), R.Stage("model", 0.5, 0.1, S.stage_model)])
    sess.shared["sm90"] = str(model_path)
    assert sess.run() == 0
    s = _summary(tmp_path)
    assert s["stages"]["model"]["status"] == "ok"
    assert s["stages"]["model"]["note"].startswith("6 benchmark rows beside")
    rows = {(h["config"], h["loss"], h["pass"]): h for h in s["bench"]["rows"]}
    h = rows[("vistas", "hierarchical_softmax", "forward+backward")]
    assert h["native_ms"] == 3.5 and h["triton_ms"] == 4.0 and h["flat_ms"] == 2.5
    assert h["copy_bound_ms"] == pytest.approx(4e9 / 4000e9 * 1e3)
    assert h["model"]["cuda"]["floor_ms"] == pytest.approx(1.75) and h["model"]["triton"]["issue_ms"] == pytest.approx(3.0)
    assert "not_run" in rows[("vistas2", "decode", "forward")]
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "| vistas | hierarchical_softmax | forward+backward | 4.000 | 3.500 | 2.500 | 1.000 | 3.000 / 1.700 | 2.400 / 1.750 |" in md
    assert json.load(open(tmp_path / "work" / "model.json"))["rows"]


def test_the_model_stage_is_skipped_without_a_model_or_a_benchmark(tmp_path):
    sess = _session(tmp_path, [R.Stage("model", 1.0, 0.1, S.stage_model)])
    os.makedirs(tmp_path / "benchmarks" / "results")
    assert sess.run() == 0
    assert "no benchmarks/results/sm90*.json" in _summary(tmp_path)["stages"]["model"]["note"]
    _write(str(tmp_path / "benchmarks" / "results" / "sm90-2026-12-01.json"), json.dumps(_model_doc()).encode())
    sess = _session(tmp_path / "again", [R.Stage("model", 1.0, 0.1, S.stage_model)])
    sess.root = str(tmp_path)
    sess.run()
    assert _summary(tmp_path / "again")["stages"]["model"]["note"] == "no benchmark JSON from this session"


# ------------------------------------------------------------------------------------------ summary.md, CLI
def test_summary_markdown_and_stage_table():
    summary = {"session": {"command": "python -m benchmarks.gpu_session --out /x", "budget_s": 540, "elapsed_s": 431.0,
                           "finished": True, "started_utc": "2026-12-01T10:00:00Z", "out": "/x",
                           "files": ["summary.json", "summary.md", "logs.tar.gz"]},
               "device": {"name": "NVIDIA H200", "cuda_available": True, "sm_count": 132, "memory_gib": 139.8,
                          "nvidia_smi": {"gpus": [{"name": "NVIDIA H200", "driver_version": "580.1"}]}},
               "versions": {"torch": "2.11.0+cu130", "git_commit": "abcdef1234567", "source_hash": "f00"},
               "stages": {"build": {"status": "ok", "seconds": 84.2, "budget_s": 170, "note": "built"},
                          "tests": {"status": "failed", "seconds": 150, "budget_s": 180, "note": "1 failed",
                                    "failed_ids": ["tests/test_a.py::test_bad[cuda]"],
                                    "log_tails": {"session/logs/tests.log": "E   assert 1 == 2"}},
                          "sanitizer": {"status": "skipped", "seconds": 0, "budget_s": 0, "note": "not found"}},
               "bench": dict(headline(_bench_doc()), files=["NVIDIA-H200-2026-12-01.json"])}
    md = render(summary)
    assert md.index("## Stages") < md.index("## Failures") < md.index("## Benchmark") < md.index("## Environment")
    assert "| tests | **FAILED** | 150 | 180 | 1 failed |" in md
    assert "`tests/test_a.py::test_bad[cuda]`" in md and "E   assert 1 == 2" in md
    assert "copy bandwidth 4000 GB/s" in md and "cuda-events" in md
    assert "git abcdef123456" in md
    text = stage_table_text(summary)
    assert text.splitlines()[0].split() == ["stage", "status", "s", "budget", "note"]
    assert "tests" in text and "failed" in text and "431.0 s of a 540 s budget" in text


def test_help_and_bad_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        S.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for st in S.stages():
        assert f"  {st.name} (" in text
    assert "--dry-run" in text and "at most 8" in text
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "f").write_text("x")
    for argv, msg in ((["--out", str(tmp_path / "full")], "new or empty"),
                      (["--out", str(tmp_path / "o"), "--budget-s", "10"], "at least 60"),
                      (["--out", str(tmp_path / "o"), "--work", str(tmp_path / "o" / "w")], "inside --out"),
                      (["--out", str(tmp_path / "o"), "--sm90", str(tmp_path / "none.json")], "no such file")):
        with pytest.raises(SystemExit) as e:
            S.main(argv)
        assert e.value.code == 2 and msg in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ the benchmark's options
def test_bench_per_config_losses_parse():
    from benchmarks.run import parse_args
    a = parse_args(["--config", "vistas:hierarchical_softmax,vistas2:tree_min+decode", "--config", "small"])
    assert a.configs == ["vistas", "vistas2", "small"]
    assert a.config_losses == {"vistas": ["hierarchical_softmax"], "vistas2": ["tree_min", "decode"]}
    assert a.time_limit is None and a.check_size is None
    a = parse_args(["--config", "small:all", "--time-limit", "2.5", "--check-size", "4x6"])
    assert a.config_losses["small"] == ["hierarchical_softmax", "tree_min", "decode", "tree_bce"]
    assert a.time_limit == 2.5 and a.check_size == (4, 6)
    for argv in (["--config", "vistas:dice"], ["--time-limit", "0"], ["--time-limit", "x"], ["--check-size", "4"]):
        with pytest.raises(SystemExit):
            parse_args(argv)


def _bench(tmp_path, *extra):
    from benchmarks.run import main
    argv = ["--device", "cpu", "--threads", "1", "--size", "6x5", "--reps", "1", "--warmup", "0", "--memory", "off",
            "--copy-mib", "1", "--backend", "reference,native", "--out", str(tmp_path), *extra]
    assert main(argv) == 0
    (j,) = [f for f in os.listdir(tmp_path) if f.endswith(".json")]
    return json.load(open(tmp_path / j))


def test_bench_runs_only_the_named_losses_per_config_and_checks_on_a_crop(tmp_path, capsys):
    import torch
    threads = torch.get_num_threads()
    try:
        doc = _bench(tmp_path, "--config", "small:decode", "--check-size", "2x3")
    finally:
        torch.set_num_threads(threads)
    (cfg,) = doc["configs"]
    assert {r["loss"] for r in cfg["rows"]} == {"decode"}
    assert cfg["check_size"] == [2, 3]
    ok = [r for r in cfg["rows"] if r["status"] == "ok"]
    assert {r["backend"] for r in ok} == {"reference", "native", "flat"}
    assert all(r["check"] == 0.0 and "2x3 crop" in r["check_kind"] for r in ok if r["backend"] != "flat")
    assert "2×3 crop of the first image" in capsys.readouterr().out


def test_bench_time_limit_skips_rows_and_still_writes_its_files(tmp_path):
    import torch
    threads = torch.get_num_threads()
    try:
        doc = _bench(tmp_path, "--config", "small:hierarchical_softmax,medium:decode", "--time-limit", "0.001")
    finally:
        torch.set_num_threads(threads)
    rows = [r for c in doc["configs"] for r in c["rows"]]
    assert rows and all(r["status"] == "skipped" and "time limit" in r["reason"] for r in rows)
    assert {(r["config"], r["loss"]) for r in rows} == {("small", "hierarchical_softmax"), ("medium", "decode")}
    assert doc["time_limit_s"] == 0.001 and doc["copy_bandwidth"]["GBps"] > 0
    assert sorted(os.path.splitext(f)[1] for f in os.listdir(tmp_path)) == [".json", ".md", ".png"]
