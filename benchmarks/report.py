"""Turn a benchmark document into a Markdown table, a JSON file and a chart."""
from __future__ import annotations

import json
import math
import os
from typing import List, Optional

from .measure import device_slug

__all__ = ["markdown", "save", "plot", "output_stem"]


def _f(v, fmt: str, none: str = "n/a") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return none
    return format(v, fmt)


def _mib(v) -> str:
    return "n/a" if v is None else f"{v / 2**20:.1f}"


def _mb(v) -> str:
    return f"{v / 1e6:.3g}" if v is not None else "n/a"


def markdown(doc: dict) -> str:
    """The whole report as Markdown: a header with the machine and the copy bandwidth, then one table
    per configuration, the rows that did not run, and the sweep when there is one."""
    m = doc["meta"]
    copy = doc["copy_bandwidth"]
    lines = [f"# hss_kernels benchmarks: {m['device_name']}", ""]
    lines.append(f"- date {m['date_utc']}, torch {m['torch']}, triton {m.get('triton')}, CUDA {m.get('cuda')}, "
                 f"Python {m['python']}, hss_kernels {m.get('hss_kernels')} (git {m.get('git_commit')})")
    if m["device_type"] == "cpu":
        lines.append(f"- CPU: {m['cpu_count']} logical cores; torch threads: {m['torch_threads']}")
    else:
        lines.append(f"- GPU: {m.get('sm_count')} SMs, {m.get('gpu_memory_bytes', 0) / 2**30:.0f} GiB, "
                     f"L2 {m.get('l2_bytes', 0) / 2**20:.0f} MiB, compute capability {m.get('capability')}")
    if "load_average_start" in m:
        end = m.get("load_average_end")
        lines.append(f"- load average (1/5/15 min) at start {', '.join(f'{x:.2f}' for x in m['load_average_start'])}"
                     + (f", at end {', '.join(f'{x:.2f}' for x in end)}" if end else ""))
    drift = (f"; {copy['GBps_start']:.1f} at the start, {copy['GBps_end']:.1f} at the end"
             if "GBps_end" in copy else "")
    lines.append(f"- **copy bandwidth measured in this run: {copy['GBps']:.1f} GB/s** ({copy['method']}{drift}; "
                 f"fastest copy {copy['GBps_best']:.1f} GB/s)")
    lines.append(f"- command: `{m.get('command', '')}`")
    for w in m.get("warnings", []):
        lines.append(f"- **warning: {w}**")
    if doc.get("time_limit_s") is not None:
        lines.append(f"- time limit {doc['time_limit_s']:g} s: rows not started in time are listed under "
                     f"\"Not run\"")
    lines.append("")
    lines.append("Times are medians with the 25th–75th percentiles; MB = bytes the call must move by docs/MATH.md §5.6 "
                 "(1e6); % copy = achieved GB/s over the copy bandwidth above; × ref and × flat = speed-up over "
                 "the reference and over the flat PyTorch baseline in the same pass; peak = extra memory at peak "
                 "(MiB); check = difference from the reference (relative, or the fraction of decoded labels).")
    for cfg in doc["configs"]:
        lines += ["", f"## {cfg['name']}: tree {cfg['tree']} ({cfg['leaves']} leaves / {cfg['nodes']} nodes, "
                      f"depth {cfg['depth']}), B={cfg['batch']}, {cfg['height']}×{cfg['width']}, {cfg['dtype']}"
                      + ("" if cfg.get("weights", "none") == "none" else f", weights: {cfg['weights']}"), ""]
        if cfg.get("check_size"):
            h, w = cfg["check_size"]
            lines += [f"The check column compares on the top-left {h}×{w} crop of the first image.", ""]
        lines.append("| loss | backend | pass | median ms | p25–p75 ms | MB moved | GB/s | % copy | × ref | × flat | "
                     "peak MiB | check |")
        lines.append("|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        skipped = []
        for r in cfg["rows"]:
            if r.get("status") != "ok":
                skipped.append(r)
                continue
            lines.append(
                f"| {r['loss']} | {r['label']} | {r['pass']} | {r['median_ms']:.3f} | "
                f"{r['p25_ms']:.3f}–{r['p75_ms']:.3f} | {_mb(r['bytes'])} | {r['GBps']:.2f} | "
                f"{_f(None if r.get('copy_share') is None else 100 * r['copy_share'], '.1f')} | "
                f"{_f(r.get('speedup_vs_reference'), '.2f')} | {_f(r.get('speedup_vs_flat'), '.2f')} | "
                f"{_mib(r.get('peak_extra_bytes'))} | {_f(r.get('check'), '.1e', '—')} |")
        grouped = {}  # (label, status, reason) → losses, so that one missing backend is one line
        for r in skipped:
            losses = grouped.setdefault((r["label"], r.get("status"), r.get("reason")), [])
            if r["loss"] not in losses:
                losses.append(r["loss"])
        notes = [f"- {label} ({', '.join(losses)}): {status}: {reason}"
                 for (label, status, reason), losses in grouped.items()]
        if notes:
            lines += ["", "Not run:"] + notes
        if any(r.get("interpreter") for r in cfg["rows"] if r.get("status") == "ok"):
            lines += ["", "Rows marked **(interpreter)** ran Triton's CPU interpreter: they time Python, not a kernel."]
    sweep = doc.get("sweep")
    if sweep:
        lines += ["", f"## Sweep (batch 1): resolution on tree {sweep['base_tree']}; classes on random depth-3 "
                      f"trees at {sweep['class_sweep_size']}²", "",
                  "Linear cost in pixels × channels shows as a flat ns/(pixel·channel) column.", "",
                  "| sweep | loss | backend | pass | H×W | channels | median ms | ns/(pixel·channel) |",
                  "|---|---|---|---|---:|---:|---:|---:|"]
        for p in sweep["points"]:
            if p.get("status") != "ok":
                lines.append(f"| {p['sweep']} | {p['loss']} | {p.get('label', '')} | {p.get('pass', '')} | "
                             f"{p['height']}×{p['width']} | {p.get('channels', '')} | {p.get('status')}: "
                             f"{p.get('reason')} | |")
                continue
            lines.append(f"| {p['sweep']} | {p['loss']} | {p['label']} | {p['pass']} | {p['height']}×{p['width']} | "
                         f"{p['channels']} | {p['median_ms']:.3f} | {p['ns_per_pixel_channel']:.3f} |")
    return "\n".join(lines) + "\n"


def output_stem(doc: dict, out_dir: str) -> str:
    """``<out_dir>/<device>-<date>``, with ``-2``, ``-3``... when a run of that day is already there."""
    date = doc["meta"]["date_utc"][:10]
    base = os.path.join(out_dir, f"{device_slug(doc['meta'])}-{date}")
    stem, k = base, 1
    while any(os.path.exists(stem + ext) for ext in (".md", ".json", ".png")):
        k += 1
        stem = f"{base}-{k}"
    return stem


def save(doc: dict, text: str, out_dir: str) -> List[str]:
    """Write ``.md``, ``.json`` and ``.png`` under ``out_dir`` (created if missing); returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    stem = output_stem(doc, out_dir)
    with open(stem + ".md", "w", encoding="utf-8") as f:
        f.write(text)
    with open(stem + ".json", "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    plot(doc, stem + ".png")
    return [stem + ext for ext in (".md", ".json", ".png")]


_COLORS = {"reference": "#7f7f7f", "reference+compile": "#bcbd22", "triton": "#1f77b4", "native": "#d62728",
           "flat": "#2ca02c"}
_LEGEND = {"flat": "flat PyTorch loss (F.cross_entropy / BCE / argmax)"}


def plot(doc: dict, path: str) -> Optional[str]:
    """The chart: per configuration, achieved GB/s of every row against the copy bandwidth measured in
    the same run; with a sweep, time against pixels and against channels (log-log)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    copy = doc["copy_bandwidth"]["GBps"]
    cfgs = doc["configs"]
    sweep = doc.get("sweep")
    n_sweep = 2 if sweep else 0
    heights = [max(2.0, 0.22 * sum(r.get("status") == "ok" for r in c["rows"]) + 1.0) for c in cfgs]
    heights += [4.0] * n_sweep
    fig, axes = plt.subplots(len(heights), 1, figsize=(10, sum(heights) + 0.5),
                             gridspec_kw={"height_ratios": heights}, squeeze=False)
    axes = axes[:, 0]
    for ax, cfg in zip(axes, cfgs):
        rows = [r for r in cfg["rows"] if r.get("status") == "ok"]
        labels = [f"{r['loss']} · {r['label']} · {r['pass']}" for r in rows]
        vals = [r["GBps"] for r in rows]
        ax.barh(range(len(rows)), vals, color=[_COLORS.get(r["backend"], "#9467bd") for r in rows])
        ax.axvline(copy, color="black", linestyle="--", linewidth=1,
                   label=f"copy bandwidth measured in this run: {copy:.1f} GB/s")
        from matplotlib.patches import Patch
        seen = list(dict.fromkeys(r["backend"] for r in rows))  # one legend entry per backend shown
        handles = [Patch(color=_COLORS.get(b, "#9467bd"), label=_LEGEND.get(b, b)) for b in seen]
        ax.legend(handles=handles + ax.get_legend_handles_labels()[0], fontsize=7, loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(labels, fontsize=7)
        ax.invert_yaxis()
        # A log axis: the reference's bars are 100x below the fused kernels' and would vanish on a linear one.
        ax.set_xscale("log")
        # Plain numbers on the decades and, when the axis spans less than two of them, at 2 and 5 times them;
        # matplotlib's own minor labels (3×10⁰, 4×10⁰, ...) overlap on a narrow range.
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
        lo, hi = min(v for v in vals + [copy] if v > 0) / 2, max(vals + [copy]) * 2
        subs = (1.0, 2.0, 5.0) if hi / lo < 100 else (1.0,)
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("achieved GB/s, log scale (docs/MATH.md §5.6 bytes / median time)")
        busy = doc["meta"].get("busy")
        weights = cfg.get("weights", "none")
        ax.set_title(f"{cfg['name']}: {cfg['tree']}, B={cfg['batch']}, {cfg['height']}×{cfg['width']}, "
                     f"{cfg['dtype']}" + ("" if weights == "none" else f", weights: {weights}")
                     + f" — {doc['meta']['device_name']}" + (" — BUSY MACHINE" if busy else ""),
                     fontsize=9)
        low = min(v for v in vals + [copy] if v > 0) if any(v > 0 for v in vals) else copy / 100
        ax.set_xlim(low / 2, max(vals + [copy]) * 2)
    if sweep:
        for ax, kind, xkey, xlabel in ((axes[len(cfgs)], "resolution", "pixels", "pixels (batch 1)"),
                                       (axes[len(cfgs) + 1], "classes", "channels", "channels (random trees)")):
            pts = [p for p in sweep["points"] if p["sweep"] == kind and p.get("status") == "ok"]
            series = {}
            for p in pts:
                series.setdefault((p["loss"], p["label"], p["backend"]), []).append((p[xkey], p["median_ms"]))
            for (loss, label, backend), xy in sorted(series.items()):
                xy.sort()
                ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", markersize=3,
                        color=_COLORS.get(backend, "#9467bd"),
                        linestyle={"hierarchical_softmax": "-", "tree_min": "--", "decode": ":"}.get(loss, "-."),
                        label=f"{loss} · {label}")
            if pts:
                xs = sorted({p[xkey] for p in pts})
                t0 = min(p["median_ms"] for p in pts if p[xkey] == xs[0])
                ax.plot(xs, [t0 * x / xs[0] for x in xs], color="black", linewidth=0.8, alpha=0.5,
                        label="linear (slope 1)")
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.legend(fontsize=6, ncol=2)
            ax.set_xlabel(xlabel)
            ax.set_ylabel("median ms")
            ax.set_title(f"sweep: time against {xkey}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # long row labels are never cut at the left edge
    plt.close(fig)
    return path
