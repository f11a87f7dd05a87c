"""summary.md from summary.json, and the benchmark's headline rows."""
from __future__ import annotations

import math
from typing import Dict, List, Optional

STATUS_MARK = {"ok": "ok", "failed": "**FAILED**", "timeout": "**TIMEOUT**", "skipped": "skipped",
               "running": "running", "pending": "pending"}


def _f(v, fmt: str = ".3f", none: str = "—") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, fmt)


def headline(bench: dict) -> dict:
    """The benchmark in one table: per configuration, loss and pass, the median ms of triton, native and
    the flat baseline, the time the bytes would take at the copy bandwidth measured in the same run, and
    the check values."""
    copy = (bench.get("copy_bandwidth") or {}).get("GBps")
    rows: List[dict] = []
    index: Dict[tuple, dict] = {}
    skipped = 0
    for cfg in bench.get("configs", []):
        for r in cfg.get("rows", []):
            key = (cfg["name"], r["loss"], r["pass"])
            if key not in index:
                index[key] = {"config": cfg["name"], "loss": r["loss"], "pass": r["pass"], "dtype": cfg.get("dtype"),
                              "size": f"{cfg.get('batch')}x{cfg.get('height')}x{cfg.get('width')}"}
                rows.append(index[key])
            h = index[key]
            if r.get("status") != "ok":
                skipped += 1
                h.setdefault("not_run", []).append(f"{r.get('label', r['backend'])}: {r.get('status')}: "
                                                   f"{r.get('reason')}")
                continue
            b = r["backend"]
            h[f"{b}_ms"] = r.get("median_ms")
            if b != "flat":
                h[f"{b}_check"] = r.get("check")
                h["bytes"] = r.get("bytes")
                if copy and r.get("bytes"):
                    h["copy_bound_ms"] = r["bytes"] / (copy * 1e9) * 1e3
            else:
                h["flat_label"] = r.get("label")
    meta = bench.get("meta", {})
    timers = sorted({r.get("timer") for c in bench.get("configs", []) for r in c.get("rows", []) if r.get("timer")})
    return {"device": meta.get("device_name"), "copy_GBps": copy, "rows": rows, "rows_not_run": skipped,
            "command": meta.get("command"), "timer": ", ".join(timers) or None}


def _stage_table(stages: dict) -> List[str]:
    lines = ["| stage | status | seconds | budget s | note |", "|---|---|---:|---:|---|"]
    for name, r in stages.items():
        note = (r.get("note") or "").replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {STATUS_MARK.get(r.get('status'), r.get('status'))} | "
                     f"{_f(r.get('seconds'), '.0f')} | {_f(r.get('budget_s'), '.0f')} | {note} |")
    return lines


def stage_table_text(summary: dict) -> str:
    """The stage table as plain text for the end of stdout."""
    stages = summary.get("stages", {})
    w = max([len(n) for n in stages] + [5])
    out = [f"{'stage':<{w}}  {'status':<8} {'s':>5} {'budget':>6}  note"]
    for name, r in stages.items():
        note = (r.get("note") or "").replace("\n", " ")
        out.append(f"{name:<{w}}  {r.get('status', ''):<8} {_f(r.get('seconds'), '.0f', '-'):>5} "
                   f"{_f(r.get('budget_s'), '.0f', '-'):>6}  {note[:160]}")
    s = summary.get("session", {})
    out.append(f"elapsed {s.get('elapsed_s')} s of a {s.get('budget_s'):.0f} s budget; files in {s.get('out')}: "
               f"{', '.join(s.get('files') or [])}")
    return "\n".join(out)


def _model_cell(m: Optional[dict]) -> str:
    if not m:
        return "—"
    return f"{_f(m.get('issue_ms'))} / {_f(m.get('floor_ms'))}"


def render(summary: dict) -> str:
    s = summary.get("session", {})
    dev = summary.get("device") or {}
    ver = summary.get("versions") or {}
    title_dev = dev.get("name") or ("CPU (dry run)" if s.get("dry_run") else "no GPU seen")
    lines = [f"# GPU session: {title_dev}, {s.get('started_utc', '')}", ""]
    if s.get("dry_run"):
        lines += ["**Dry run**: every stage ran on the CPU at tiny sizes (Triton under its interpreter, no "
                  "compute-sanitizer). It shows that the command works, not how fast or right the kernels are on "
                  "a GPU.", ""]
    git = ver.get("git_commit")
    lines.append(f"`{s.get('command', '')}` · budget {s.get('budget_s', 0):.0f} s · {s.get('elapsed_s')} s elapsed"
                 f" · {'finished' if s.get('finished') else 'still running (or stopped from outside)'}"
                 f" · git {git[:12] if git else 'n/a'}{' (modified)' if ver.get('git_dirty') else ''}"
                 f" · sources {ver.get('source_hash', 'n/a')}")
    lines += ["", "## Stages", ""] + _stage_table(summary.get("stages", {}))

    bad = [(n, r) for n, r in summary.get("stages", {}).items() if r.get("status") in ("failed", "timeout")]
    if bad:
        lines += ["", "## Failures"]
        for name, r in bad:
            lines += ["", f"### {name}: {r.get('status')}", "", r.get("note") or ""]
            for key, label in (("failed_ids", "failed tests"), ("error_ids", "tests with errors"),
                               ("failed_rows", "failing checks"), ("missing", "ops without a kernel"),
                               ("sanitizer_errors", "memcheck")):
                vals = r.get(key)
                if vals:
                    lines += ["", f"{label}:", ""] + [f"- `{v}`" for v in (vals if isinstance(vals, list) else [vals])[:20]]
            for log, text in (r.get("log_tails") or {}).items():
                lines += ["", f"Last lines of `{log}`:", "", "```", text, "```"]

    b = summary.get("bench")
    if b and b.get("rows"):
        lines += ["", f"## Benchmark: {b.get('device')}, copy bandwidth {_f(b.get('copy_GBps'), '.0f')} GB/s "
                      f"measured in the same run", ""]
        lines.append(f"Median ms per call ({b.get('timer') or 'no timed row'}); copy-bound = the bytes the call must move (docs/MATH.md §5.6) at "
                     "that copy bandwidth; model = the static sm_90 model's issue / floor ms "
                     f"({(summary.get('model') or {}).get('source') or 'no model file'}), forward+backward = "
                     "forward + backward.")
        lines += ["", "| config | loss | pass | triton | native | flat | copy-bound | model triton | model cuda |",
                  "|---|---|---|---:|---:|---:|---:|---:|---:|"]
        for h in b["rows"]:
            m = h.get("model") or {}
            lines.append(f"| {h['config']} | {h['loss']} | {h['pass']} | {_f(h.get('triton_ms'))} | "
                         f"{_f(h.get('native_ms'))} | {_f(h.get('flat_ms'))} | {_f(h.get('copy_bound_ms'))} | "
                         f"{_model_cell(m.get('triton'))} | {_model_cell(m.get('cuda'))} |")
        not_run = [x for h in b["rows"] for x in h.get("not_run", [])]
        if not_run:
            lines += ["", f"Rows not run ({len(not_run)}): " + "; ".join(sorted(set(not_run)))[:1500]]
        checks = [(h, k) for h in b["rows"] for k in ("triton_check", "native_check")
                  if h.get(k) is not None and h[k] > (0.0 if h["loss"] == "decode" else 1e-3)]
        if checks:
            lines += ["", "Rows whose check against the reference is large: " + "; ".join(
                f"{h['config']} {h['loss']} {k.split('_')[0]} {h[k]:.1e}" for h, k in checks)]
        if b.get("files"):
            lines += ["", "The benchmark's own files: " + ", ".join(f"`{f}`" for f in b["files"])]
    model = summary.get("model")
    if model and model.get("unmatched"):
        lines += ["", f"Benchmark rows without a model estimate: {len(model['unmatched'])}"]

    lines += ["", "## Environment", ""]
    smi = (dev.get("nvidia_smi") or {}).get("gpus") or []
    if smi:
        g = smi[0]
        lines.append("- GPU: " + ", ".join(f"{k} {v}" for k, v in g.items()))
    elif dev.get("note"):
        lines.append(f"- GPU: {dev['note']}")
    if dev.get("sm_count"):
        lines.append(f"- torch sees: {dev.get('name')}, {dev.get('sm_count')} SMs, {dev.get('memory_gib')} GiB, "
                     f"L2 {dev.get('l2_mib')} MiB, capability {dev.get('capability')}")
    if ver:
        keys = ("torch", "torch_cuda", "triton", "nvcc", "python", "cpu_count", "pytest", "xdist", "pytest-timeout",
                "compute_sanitizer", "cuda_home", "git_branch", "date_utc", "platform")
        lines.append("- versions: " + "; ".join(f"{k} {ver.get(k)}" for k in keys if k in ver))
    lines += ["", "## Files", "",
              "- `summary.json`: everything above, per stage (status, seconds, budget, note, counts, failing ids)",
              "- `summary.md`: this page",
              "- `logs.tar.gz`: `session/logs/<stage>[-part].log` (every command's full output), the JUnit XML, "
              "the check tables, the environment and ops JSON, the model comparison"]
    for f in (b or {}).get("files", []):
        lines.append(f"- `{f}`: the benchmark's own file (commit it under benchmarks/results/)")
    if s.get("moved_into_logs"):
        lines.append("- moved into logs.tar.gz to keep within the 8-file limit: " + ", ".join(s["moved_into_logs"]))
    return "\n".join(lines) + "\n"
