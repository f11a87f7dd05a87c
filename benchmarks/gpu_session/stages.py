"""The stages of the GPU session, on the GPU machine and in ``--dry-run``, and the command line."""
from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from typing import List, Optional

from . import model as M
from . import parse as P
from .envinfo import find_cuda_home, find_tool
from .runner import Session, Stage, worst_status
from .summary import headline, render, stage_table_text

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PY = sys.executable

# The benchmark: the configurations and losses the sm_90 model describes, in one call and one file set.
BENCH_CONFIGS = "vistas:hierarchical_softmax,vistas2:tree_min+tree_bce+decode"
# The dry run's test selection: every test marked gpu (skipped on the CPU, so the selection itself is
# exercised) plus two fast CPU tests (so that the JUnit parsing sees passes). -k matches names too: the
# session's own tests (test_gpu_session.py) are left out, and so are the CPU tests named for the GPU's tiles
# (gpu_tiles, gpu_blocks: Triton's interpreter at GPU shapes, two minutes on 2 cores that the suite itself
# has just run).
DRY_TESTS_K = ("(gpu and not gpu_session and not gpu_tiles and not gpu_blocks) or shipped_trees "
               "or small_tree_layout")
# hss-check in a process that never loads hss_kernels._C: check-triton runs while the build rewrites it.
NO_EXTENSION = ("import sys; sys.modules['hss_kernels._C'] = None; from hss_kernels.check import main; "
                "sys.exit(main(sys.argv[1:]))")


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _load_json(path: str) -> Optional[dict]:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _cpus() -> int:
    return os.cpu_count() or 1


def _why(r) -> str:
    """The last line a failed command printed (its error, usually), '' if none."""
    for line in reversed(P.tail(r.log, 15).splitlines()):
        if line.strip() and not line.startswith("#"):
            return line.strip()[:200]
    return ""


# ------------------------------------------------------------------------------------------ environment
def stage_environment(ctx) -> dict:
    path = ctx.path("environment.json")
    r = ctx.run([PY, "-m", "benchmarks.gpu_session.envinfo", "--json", path]
                + ([] if ctx.dry_run else ["--require-gpu"]))
    info = _load_json(path) or {}
    dev, ver = info.get("device") or {}, info.get("versions") or {}
    ctx.session.set_top("device", dev)
    ctx.session.set_top("versions", ver)
    g = ((dev.get("nvidia_smi") or {}).get("gpus") or [{}])[0]
    if dev.get("cuda_available"):
        gpu = (f"{dev.get('name')} ({dev.get('memory_gib')} GiB, {dev.get('sm_count')} SMs), driver {g.get('driver_version')}, "
               f"clocks SM {g.get('clocks.sm', '?')}/{g.get('clocks.max.sm', '?')} MHz, memory "
               f"{g.get('clocks.mem', '?')}/{g.get('clocks.max.mem', '?')} MHz")
    else:
        gpu = "no GPU" + (" (dry run on the CPU)" if ctx.dry_run else ": torch sees no CUDA device")
    git = ver.get("git_commit")
    note = (f"{gpu}; torch {ver.get('torch')} (CUDA {ver.get('torch_cuda')}), triton {ver.get('triton')}, nvcc "
            f"{ver.get('nvcc')}, Python {ver.get('python')}, {ver.get('cpu_count')} CPUs, git "
            f"{git[:10] if git else 'n/a'}, sources {ver.get('source_hash')}")
    return {"status": r.status, "note": note}


# ------------------------------------------------------------------------------------------ build
def copy_sources(root: str, dst: str) -> None:
    """The tree's sources without build outputs: git's tracked and untracked-not-ignored files when there
    is a .git, else everything but .git, build/, *.so, caches and virtual environments."""
    if os.path.exists(os.path.join(root, ".git")) and shutil.which("git"):
        p = subprocess.run(["git", "-C", root, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           capture_output=True, timeout=60)
        if p.returncode == 0:
            for rel in p.stdout.decode().split("\0"):
                src = os.path.join(root, rel)
                if rel and os.path.isfile(src):
                    os.makedirs(os.path.dirname(os.path.join(dst, rel)), exist_ok=True)
                    shutil.copy2(src, os.path.join(dst, rel))
            return
    shutil.copytree(root, dst, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.so", "__pycache__", ".venv*", ".pytest_cache", "*.egg-info"))


def stage_build(ctx) -> dict:
    cmd = [PY, "setup.py", "build_ext", "--inplace"]
    fields = {}
    if ctx.dry_run:
        # Compiling the CPU extension again would add minutes of a 2-core CI machine and tell nothing new
        # (CI's install just built it, and .ci/cuda-build compiles the CUDA kernels): run the same command
        # line in a temporary copy without the extension, then check the extension already built here.
        tmp = tempfile.mkdtemp(prefix="hss-gpu-session-build-")
        try:
            copy_sources(ctx.root, tmp)
            r = ctx.run(cmd, env={"HSS_NO_EXTENSION": "1"}, cwd=tmp, timeout=ctx.left() - 20)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        key = "CPU"
        how = f"setup.py build_ext ran in a temporary copy with HSS_NO_EXTENSION=1 ({r.status}, {r.seconds:.0f} s)"
    else:
        env = {"TORCH_CUDA_ARCH_LIST": "9.0", "HSS_REQUIRE_CUDA": "1", "MAX_JOBS": str(_cpus())}
        home = os.environ.get("CUDA_HOME") or find_cuda_home()
        if home:
            env["CUDA_HOME"] = home
        r = ctx.run(cmd, env=env, timeout=ctx.left() - 20)
        key = "CUDA"
        how = (f"setup.py build_ext: {r.status} after {r.seconds:.0f} s (MAX_JOBS={env['MAX_JOBS']}, CUDA_HOME={home})"
               + (f": {_why(r)}" if r.status == "failed" else ""))
        fields["cuda_home"] = home
    ops_json = ctx.path("ops.json")
    r2 = ctx.run([PY, "-m", "benchmarks.gpu_session.opscheck", "--key", key, "--json", ops_json], suffix="ops")
    ops = _load_json(ops_json) or {}
    fields.update(ops=ops.get("ops"), missing=ops.get("missing"), library=ops.get("library"))
    if ops.get("ok"):
        what = f"{key} kernels registered for all {len(ops['ops'])} ops: {', '.join(o.split('::')[1] for o in ops['ops'])}"
    else:
        what = f"op check: {ops.get('error') or r2.status}"
    if ctx.dry_run:
        what = "the existing CPU extension: " + what
    return dict(fields, status=worst_status([r.status, r2.status]), note=f"{how}; {what}")


# ------------------------------------------------------------------------------------------ tests
def stage_tests(ctx) -> dict:
    junit = ctx.path("tests-junit.xml")
    cmd = [PY, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider", f"--junitxml={junit}", "--durations=25"]
    cmd += ["-k", DRY_TESTS_K] if ctx.dry_run else ["-m", "gpu"]
    fields = {"selection": f"-k '{DRY_TESTS_K}'" if ctx.dry_run else "-m gpu"}
    extras = []
    if _has("xdist"):
        n = min(2, _cpus()) if ctx.dry_run else _cpus()
        cmd += ["-n", str(n)]
        fields["workers"] = n
        extras.append(f"-n {n}")
    else:
        extras.append("no pytest-xdist: one process")
    if _has("pytest_timeout"):
        per_test = int(max(30, min(300, 0.6 * ctx.left())))
        cmd.append(f"--timeout={per_test}")
        fields["per_test_timeout_s"] = per_test
        extras.append(f"{per_test} s per test")
    else:
        extras.append("no pytest-timeout")
    cmd.append("tests")
    r = ctx.run(cmd, interrupt_first=True, timeout=ctx.left() - 12)
    counts = None
    if os.path.exists(junit):
        try:
            counts = P.junit_counts(junit)
        except Exception as exc:  # a report cut short
            fields["junit_error"] = f"{type(exc).__name__}: {exc}"
    if counts:
        fields.update(counts=dict((k, counts[k]) for k in ("tests", "passed", "failed", "errors", "skipped", "time_s")),
                      failed_ids=counts["failed_ids"], error_ids=counts["error_ids"], skip_reasons=counts["skip_reasons"])
        text = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
                f"{counts['skipped']} skipped of {counts['tests']}")
    else:
        text = P.pytest_summary_line(P.read_text(r.log)) or f"no JUnit report: {_why(r)}"
    status = r.status
    if r.rc == 5 and not r.timed_out:
        text = "no test selected (pytest exit status 5)"
    elif r.timed_out:
        text = "stopped at the stage's time limit; " + ("partial report: " if counts else "") + text
    elif status == "ok" and counts and counts["passed"] == 0 and not ctx.dry_run:
        text += " (none passed: is the GPU visible?)"
        status = "failed"
    return dict(fields, status=status, note=f"{text} ({', '.join(extras)})")


# ------------------------------------------------------------------------------------------ hss-check
def _run_checks(ctx, runs: List[tuple], no_extension: bool) -> dict:
    """``runs``: (dtype, extra arguments) run at once, one log each; returns the stage's fields."""
    device = "cpu" if ctx.dry_run else "cuda"
    base = [PY, "-c", NO_EXTENSION] if no_extension else [PY, "-m", "hss_kernels.check"]
    jobs = [dict(cmd=base + ["--device", device, "--dtype", dt] + extra, suffix=dt) for dt, extra in runs]
    results = ctx.run_parallel(jobs)
    out, notes, failed_rows, statuses = [], [], [], []
    for (dt, extra), r in zip(runs, results):
        t = P.check_table(P.read_text(r.log))
        status = r.status
        if status == "ok" and (t["ok"] == 0 or t["not_run"]):
            status = "failed"  # no table, or a backend named here did not run: nothing was checked
        statuses.append(status)
        out.append(dict(dtype=dt, args=" ".join(extra), status=status, seconds=round(r.seconds, 1), ok=t["ok"],
                        failed=t["failed"], not_run=t["not_run"], final_line=t["final_line"],
                        failed_rows=t["failed_rows"], not_run_rows=t["not_run_rows"], header=t["header"]))
        failed_rows += [f"{dt}: {row}" for row in t["failed_rows"]]
        if r.timed_out:
            notes.append(f"{dt}: timeout after {r.seconds:.0f} s")
        else:
            notes.append(f"{dt}: {t['final_line'] or status + ': ' + _why(r)}"
                         + (f", {t['not_run']} not run" if t["not_run"] else "") + f" ({r.seconds:.0f} s)")
    return {"status": worst_status(statuses), "runs": out, "failed_rows": failed_rows, "note": "; ".join(notes)}


def stage_check(ctx) -> dict:
    if ctx.dry_run:
        runs = [("float32", ["--backend", "native", "--quick"]), ("bfloat16", ["--backend", "native", "--quick"])]
    else:
        runs = [(dt, ["--backend", "reference", "--backend", "native"]) for dt in ("float32", "bfloat16")]
    fields = _run_checks(ctx, runs, no_extension=False)
    fields["note"] = ("native, quick: " if ctx.dry_run else "reference and native: ") + fields["note"]
    return fields


def stage_check_triton(ctx) -> dict:
    dtypes = ("float32",) if ctx.dry_run else ("float32", "bfloat16")
    fields = _run_checks(ctx, [(dt, ["--backend", "triton", "--quick"]) for dt in dtypes], no_extension=True)
    fields["note"] = "triton, quick: " + fields["note"]
    return fields


# ------------------------------------------------------------------------------------------ benchmark
def stage_bench(ctx) -> dict:
    bench_dir = ctx.path("bench")
    os.makedirs(bench_dir, exist_ok=True)
    margin = min(40.0, max(10.0, 0.2 * ctx.left()))
    limit = max(5.0, ctx.left() - margin)
    cmd = [PY, "-m", "benchmarks", "--config", BENCH_CONFIGS, "--backend", "triton,native",
           "--time-limit", f"{limit:.0f}", "--out", bench_dir]
    if ctx.dry_run:
        cmd += ["--device", "cpu", "--batch", "1", "--size", "8x8", "--reps", "2", "--warmup", "1", "--memory", "off",
                "--copy-mib", "8", "--threads", "1", "--check-size", "4x4"]
    else:
        cmd += ["--device", "cuda", "--reps", "30", "--warmup", "3", "--memory", "on", "--check-size", "64x64"]
    r = ctx.run(cmd)
    files = sorted(glob.glob(os.path.join(bench_dir, "*.json")) + glob.glob(os.path.join(bench_dir, "*.md"))
                   + glob.glob(os.path.join(bench_dir, "*.png")))
    jpath = next((f for f in files if f.endswith(".json")), None)
    doc = _load_json(jpath) if jpath else None
    names = []
    for f in files:  # into the output folder (moved: the logs tarball need not carry them again)
        shutil.move(f, os.path.join(ctx.out, os.path.basename(f)))
        names.append(os.path.basename(f))
    ctx.shared["out_priority"] += names
    if doc is None:
        return {"status": "failed" if r.status == "ok" else r.status,
                "note": f"no benchmark JSON ({r.status} after {r.seconds:.0f} s: {_why(r)})", "files": names}
    ctx.shared["bench_doc"] = doc
    hl = headline(doc)
    hl["files"] = names
    ctx.session.set_top("bench", hl)
    rows = [row for c in doc["configs"] for row in c["rows"]]
    n = {s: sum(row.get("status") == s for row in rows) for s in ("ok", "error", "skipped")}
    timed = sum("time limit" in (row.get("reason") or "") for row in rows)
    status = r.status
    if status == "ok" and n["error"]:
        status = "failed"
    errors = sorted({f"{row['loss']} {row['label']}: {row.get('reason')}" for row in rows if row.get("status") == "error"})
    note = (f"{n['ok']} rows ok, {n['error']} raised, {n['skipped']} skipped ({timed} of them at the time limit, "
            f"{limit:.0f} s); copy bandwidth {hl['copy_GBps'] or 0:.0f} GB/s; files {', '.join(names)}")
    return {"status": status, "note": note, "files": names, "rows": n, "time_limit_s": round(limit),
            "failed_rows": errors[:20]}


# ------------------------------------------------------------------------------------------ low-resolution logits
LOWRES_CONFIGS = "vistas4,vistas2_4"
LOWRES_LOSSES = "hierarchical_softmax_loss,tree_min_loss"


def stage_lowres(ctx) -> dict:
    out = ctx.path("lowres")  # into the logs tarball
    os.makedirs(out, exist_ok=True)
    cmd = [PY, "-m", "benchmarks.lowres", "--out", out]
    if ctx.dry_run:
        cmd += ["--device", "cpu", "--config", "cpu", "--loss", "hierarchical_softmax_loss", "--reps", "1", "--no-memory"]
    else:
        cmd += ["--device", "cuda", "--config", LOWRES_CONFIGS, "--loss", LOWRES_LOSSES, "--reps", "10"]
    r = ctx.run(cmd)
    jpath = next(iter(sorted(glob.glob(os.path.join(out, "lowres-*.json")))), None)
    doc = _load_json(jpath) if jpath else None
    if doc is None:
        return {"status": "failed" if r.status == "ok" else r.status,
                "note": f"no lowres JSON ({r.status} after {r.seconds:.0f} s: {_why(r)})"}
    fused = {(x["config"], x["loss"]): x["ms"] for x in doc["rows"] if x["row"] == "fused"}
    parts = [f"{x['config']} {x['loss'].split('_loss')[0]} {x['row']}: {x['ms']:.1f} ms"
             + (f" ({x['ms'] / fused[(x['config'], x['loss'])]:.2f}x fused)" if x["row"] != "fused" else "")
             for x in doc["rows"]]
    return {"status": r.status, "note": "; ".join(parts) + f"; logs/lowres/{os.path.basename(jpath)}",
            "rows": doc["rows"]}


# ------------------------------------------------------------------------------------------ compute-sanitizer
def stage_sanitizer(ctx) -> dict:
    calls = [PY, "-m", "benchmarks.gpu_session.sancalls"]
    parts = [("native", ["--backend", "native"]), ("triton", ["--backend", "triton", "--quick"])]
    if ctx.dry_run:
        jobs = [dict(cmd=calls + ["--device", "cpu"] + a, suffix=name) for name, a in parts]
        tool = None
    else:
        tool = find_tool("compute-sanitizer")
        if tool is None:
            return {"status": "skipped", "note": "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)"}
        # Without the caching allocator every tensor is its own cudaMalloc: an access past its end is seen.
        jobs = [dict(cmd=[tool, "--tool", "memcheck", "--error-exitcode", "1", "--print-limit", "30"] + calls
                     + ["--device", "cuda"] + a, suffix=name, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
                for name, a in parts]
    results = ctx.run_parallel(jobs, timeout=ctx.left() - 5)
    runs, notes, statuses, errors = [], [], {}, []
    for (name, _), r in zip(parts, results):
        s = P.sanitizer_log(P.read_text(r.log))
        if r.timed_out:
            st = "timeout"
        elif r.rc == 3 and s["unavailable"]:
            st = "skipped"
        elif r.rc != 0 or (s["errors"] or 0) > 0 or s["raised"]:
            st = "failed"
        else:
            st = "ok"
        statuses[name] = st
        runs.append(dict(part=name, status=st, rc=r.rc, seconds=round(r.seconds, 1), **s))
        if s["errors"]:
            errors.append(f"{name}: {s['errors']} memcheck errors: {', '.join(s['error_kinds']) or 'see the log'}; "
                          f"last call started: {s['last_call']}")
        for c in s["raised"]:
            errors.append(f"{name}: raised: {c}")
        what = {"ok": f"{s['done']} calls" + (", memcheck clean" if tool else ""),
                "failed": f"{s['errors'] if s['errors'] is not None else '?'} memcheck errors, {len(s['raised'])} raised",
                "timeout": f"timeout after {r.seconds:.0f} s, {s['done']} of the calls done (last: {s['last_call']})",
                "skipped": "; ".join(s["unavailable"])[:200]}[st]
        notes.append(f"{name}: {what}")
    status = worst_status(list(statuses.values()))
    if statuses.get("triton") == "timeout" and statuses.get("native") == "ok":
        status = "ok"  # the Triton part is a bonus when time allows
    note = "; ".join(notes)
    if ctx.dry_run:
        note = "dry run, no GPU: the same calls ran on the CPU without compute-sanitizer; " + note
    return {"status": status, "note": note, "tool": tool, "runs": runs, "sanitizer_errors": errors}


# ------------------------------------------------------------------------------------------ model
def stage_model(ctx) -> dict:
    path = ctx.shared.get("sm90") or M.newest_model_json(os.path.join(ctx.root, "benchmarks", "results"))
    if not path:
        return {"status": "skipped", "note": "no benchmarks/results/sm90*.json committed yet "
                                             "(python -m benchmarks.sm90 writes one)"}
    bench = ctx.shared.get("bench_doc")
    if not bench:
        return {"status": "skipped", "note": "no benchmark JSON from this session"}
    name = os.path.relpath(path, ctx.root) if path.startswith(ctx.root + os.sep) else path
    cmp = M.compare(bench, M.load(path), name)
    with open(ctx.path("model.json"), "w", encoding="utf-8") as f:
        json.dump(cmp, f, indent=1)
    ctx.session.set_top("model", cmp)
    bench = ctx.session.summary.get("bench") or {}
    by_key = {(h["config"], h["loss"], h["pass"]): h for h in bench.get("rows", [])}
    for row in cmp["rows"]:
        h = by_key.get((row["config"], row["loss"], row["pass"]))
        if h is not None:
            h.setdefault("model", {})[row["model_backend"]] = {"issue_ms": row["model_issue_ms"],
                                                               "floor_ms": row["model_floor_ms"]}
    ratios = sorted(r["measured_over_floor"] for r in cmp["rows"] if r["measured_over_floor"])
    note = f"{len(cmp['rows'])} benchmark rows beside {name}, {len(cmp['unmatched'])} without an estimate"
    if ratios:
        note += f"; measured / model floor: median {ratios[len(ratios) // 2]:.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f})"
    if ctx.dry_run:
        note += " (dry run: tiny CPU sizes, the ratios mean nothing)"
    return {"status": "ok", "note": note}


# ------------------------------------------------------------------------------------------ the session
def stages() -> List[Stage]:
    """The stages in order, each with its share of the budget and its minimum (see
    :func:`benchmarks.gpu_session.runner.stage_timeout`)."""
    return [
        Stage("environment", 0.03, 15, stage_environment,
              gpu="nvidia-smi (name, driver, memory, clocks as found), torch/CUDA/triton/nvcc/Python versions, "
                  "CPU count, git commit and a hash of the sources, date",
              dry="the same; says that there is no GPU"),
        Stage("check-triton", 0.40, 30, stage_check_triton, background=True, join_before="check",
              gpu="hss-check --device cuda --backend triton --quick, float32 and bfloat16 at once, in a process that "
                  "does not load the extension; runs in the background beside build and tests",
              dry="the same on the CPU under Triton's interpreter, float32 only"),
        Stage("build", 0.30, 45, stage_build,
              gpu="python3 setup.py build_ext --inplace (TORCH_CUDA_ARCH_LIST=9.0 HSS_REQUIRE_CUDA=1 MAX_JOBS=<cores>), "
                  "then a fresh process checks that every hss_kernels:: op has a CUDA kernel",
              dry="the same command in a temporary copy with HSS_NO_EXTENSION=1, then the op check (CPU key) on "
                  "the extension already built"),
        Stage("tests", 0.29, 45, stage_tests,
              gpu="python -m pytest -m gpu -n <cores> --timeout=<s> -q -rfEs --junitxml (when xdist/timeout exist)",
              dry=f"the same harness with -k '{DRY_TESTS_K}' (the gpu tests skip on the CPU)"),
        Stage("check", 0.05, 20, stage_check,
              gpu="hss-check --device cuda --backend reference --backend native, float32 and bfloat16 at once",
              dry="hss-check --device cpu --backend native --quick, float32 and bfloat16"),
        Stage("bench", 0.17, 40, stage_bench,
              gpu=f"python -m benchmarks --config {BENCH_CONFIGS} --backend triton,native (+ the flat baseline) "
                  "--reps 30 --warmup 3 --check-size 64x64 --time-limit <stage time - margin>, copy bandwidth in "
                  "the same run",
              dry="the same at batch 1, 8x8, 2 reps, --memory off, Triton under the interpreter"),
        Stage("lowres", 0.04, 15, stage_lowres,
              gpu=f"python -m benchmarks.lowres --config {LOWRES_CONFIGS} --loss {LOWRES_LOSSES} --reps 10: the "
                  "loss on 1/4-scale logits, upsampling inside against F.interpolate first (and F.cross_entropy), "
                  "time and peak memory; JSON and table into the logs tarball",
              dry="the same at --config cpu, hierarchical softmax only, 1 rep, no memory probe"),
        Stage("sanitizer", 0.11, 45, stage_sanitizer,
              gpu="compute-sanitizer --tool memcheck on one small call of each op (forward, backward, decode): "
                  "native (all calls) and triton (--quick) at once",
              dry="the same calls on the CPU without compute-sanitizer"),
        Stage("model", 0.01, 2, stage_model,
              gpu="the newest committed benchmarks/results/sm90*.json beside the measured medians",
              dry="the same (skipped when no sm90 JSON is committed)"),
    ]


def _epilog() -> str:
    def wrap(text, indent):
        return textwrap.fill(text, 100, initial_indent=indent, subsequent_indent=" " * len(indent))

    lines = [wrap("Stages, in order. A failed stage never stops the later ones. A stage gets its share of the "
                  "time left (time an earlier stage did not use flows on), at least its minimum; a stage whose "
                  "minimum no longer fits is skipped. The background stage gets its fraction of the budget.", ""), ""]
    for st in stages():
        share = f"{st.fraction:.0%} of the budget, in the background" if st.background else f"{st.fraction:.0%} share"
        lines.append(f"  {st.name} ({share}, at least {st.min_s:.0f} s)")
        lines.append(wrap(st.gpu, "      GPU:     "))
        lines.append(wrap(st.dry, "      dry run: "))
    lines += ["", wrap("Files in --out (at most 8, no folders: what the GPU tool brings back): summary.json, "
                       "summary.md, logs.tar.gz (every log, the JUnit XML, the hss-check tables), and the "
                       "benchmark's <device>-<date>.json/.md/.png; rewritten after every stage. The stage table "
                       "is printed last. Exit status 1 when a stage failed or timed out.", ""),
              "", "How to run it and read what comes back: benchmarks/results/README.md, 'On a GPU machine'."]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.gpu_session",
        description="The one command for a GPU machine: environment, build, GPU tests, hss-check, benchmark, "
                    "compute-sanitizer and the sm_90 model's estimates, each stage a subprocess with its own time "
                    "limit, within one budget; writes a summary and packs the logs as it goes.",
        epilog=_epilog(), formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output folder (new or empty): the files that come back")
    p.add_argument("--dry-run", action="store_true",
                   help="every stage on the CPU at tiny sizes (what CI runs; ~1-2 minutes on 2 cores)")
    p.add_argument("--budget-s", type=float, default=540.0,
                   help="seconds for the whole session, packing included (default 540: under the GPU tool's 10 "
                        "minutes per command); at least 60")
    p.add_argument("--work", help="folder for logs and intermediate files, kept (default: a temporary folder, "
                                  "removed at the end: its files are in logs.tar.gz)")
    p.add_argument("--sm90", help="the model's JSON (default: the newest benchmarks/results/sm90*.json)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    if a.budget_s < 60:
        parser.error("--budget-s must be at least 60")
    out = os.path.abspath(a.out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        parser.error(f"--out {a.out}: must be a new or empty folder")
    if a.work and os.path.commonpath([os.path.abspath(a.work), out]) == out:
        parser.error("--work must not be inside --out")
    if a.sm90 and not os.path.isfile(a.sm90):
        parser.error(f"--sm90 {a.sm90}: no such file")
    work = os.path.abspath(a.work) if a.work else tempfile.mkdtemp(prefix="hss-gpu-session-")  # removed at the end
    os.makedirs(work, exist_ok=True)
    command = "python -m benchmarks.gpu_session " + " ".join(argv if argv is not None else sys.argv[1:])
    session = Session(stages(), out, work, a.budget_s, dry_run=a.dry_run, root=ROOT, command=command.strip(),
                      render_md=render)
    if a.sm90:
        session.shared["sm90"] = os.path.abspath(a.sm90)
    session.print(f"GPU session{' (dry run)' if a.dry_run else ''}: budget {a.budget_s:.0f} s, out {out}, work {work}")
    rc = session.run()
    summary = json.load(open(os.path.join(out, "summary.json"), encoding="utf-8"))
    for name, rec in summary["stages"].items():  # the failures' log tails, short, before the table
        for log, text in (rec.get("log_tails") or {}).items():
            session.print(f"\n--- {name}: {rec['status']}: last lines of {log}\n" + "\n".join(text.splitlines()[-12:]))
    session.print("\n" + stage_table_text(summary))
    if not a.work:  # everything in it is in logs.tar.gz
        shutil.rmtree(work, ignore_errors=True)
    return rc
