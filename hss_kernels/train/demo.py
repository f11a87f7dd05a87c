"""``hss-train --demo``: flat cross-entropy against the hierarchical losses on synthetic data.

Every loss of ``--demo-losses`` trains the same model on the same data for the same steps, for
``--demo-seeds`` seeds, each run in its own ``python -m hss_kernels.train`` process; the demo prints the
seeds' mean validation mIoU per depth against steps and the steps each loss needs to reach flat
cross-entropy's final mIoU at every depth.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

from .cli import build_parser, check_args
from .loop import build_tree
from .models import LOSSES

__all__ = ["demo", "DEMO_DEFAULTS"]


def _first_reach(log: List[dict], depth: str, target: float) -> Optional[int]:
    for r in log:
        if r["metrics"][depth]["miou"] >= target:
            return r["step"]
    return None


# Where the demo writes its runs and comparison.png without --out (relative to the working directory).
DEMO_OUT = "hss-train-demo"

# Options the demo sets for its runs unless the command line gives them.
DEMO_DEFAULTS = {"--steps": "300", "--eval-every": "30", "--size": "32", "--val-size": "64", "--device": "cpu",
                 "--imbalance": "1.5"}
_DEMO_ONLY = {"--demo": 0, "--demo-losses": 1, "--demo-seeds": 1, "--demo-target": 1, "--demo-jobs": 1,
              "--seed": 1, "--out": 1, "--loss": 1,
              "--quiet": 0, "--threads": 1}


def _demo_argv(argv: List[str]) -> List[str]:
    """The command line of one demo run: the user's options minus the demo's own, over the defaults."""
    out, i = [], 0
    while i < len(argv):
        key = argv[i].split("=", 1)[0]
        if key in _DEMO_ONLY:
            i += 1 + (_DEMO_ONLY[key] if "=" not in argv[i] else 0)
            continue
        out.append(argv[i])
        i += 1
    given = {a.split("=", 1)[0] for a in out}
    for key, value in DEMO_DEFAULTS.items():
        if key not in given:
            out += [key, value]
    return out + ["--data", "synthetic"]


def _mean_log(logs: List[List[dict]]) -> List[dict]:
    """Per-evaluation mean over runs of the per-depth mIoU (the runs evaluate at the same steps)."""
    n = min(len(log) for log in logs)
    out = []
    for i in range(n):
        depths = logs[0][i]["metrics"]
        out.append({"step": logs[0][i]["step"], "metrics": {
            d: {"miou": sum(log[i]["metrics"][d]["miou"] for log in logs) / len(logs)} for d in depths}})
    return out


def _save_comparison(path, runs: Dict[str, List[List[dict]]], depths: List[str], title: str) -> None:
    """``comparison.png``: validation mIoU per depth against steps, one panel per depth, each loss's mean
    over the seeds as a line and their range (min to max) as a band."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(depths), figsize=(4.5 * len(depths), 3.8), squeeze=False)
    for ax, d in zip(axes[0], depths):
        for n, logs in runs.items():
            k = min(len(log) for log in logs)
            steps = [logs[0][i]["step"] for i in range(k)]
            vals = [[log[i]["metrics"][d]["miou"] for log in logs] for i in range(k)]
            line, = ax.plot(steps, [sum(v) / len(v) for v in vals], "o-", ms=3,
                            label=f"{n} (mean of {len(logs)} seed{'s' if len(logs) > 1 else ''})")
            if len(logs) > 1:
                ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals], color=line.get_color(),
                                alpha=0.2, lw=0)
        ax.set_title(f"depth {d}" + (" (coarsest)" if d == depths[0] else " (leaves)" if d == depths[-1] else ""))
        ax.set_xlabel("step"); ax.set_ylabel("validation mIoU"); ax.grid(alpha=0.3); ax.legend(fontsize=8)
    fig.suptitle(title + "; bands: range over the seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _run_all(todo: List[tuple], run_argv: List[str], root: Path, jobs: int, threads: int):
    """Run ``python -m hss_kernels.train`` once per ``(loss, seed)`` of ``todo`` with ``run_argv``, ``jobs``
    at a time, each writing under ``root/<loss>-seed<seed>`` (its output in ``root/<loss>-seed<seed>.txt``).
    Returns the runs' logs and wall times by ``(loss, seed)``; a failed run stops the demo (SystemExit with
    the end of its output)."""
    import subprocess

    todo = list(todo)
    env = dict(os.environ)
    # The children must import this very package (a checkout run without installing included).
    pkg_parent = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", str(threads))
    logs, times, running = {}, {}, {}
    try:
        while todo or running:
            while todo and len(running) < jobs:
                name, sd = todo.pop(0)
                tag = f"{name}-seed{sd}"
                cmd = [sys.executable, "-m", "hss_kernels.train"] + run_argv + [
                    "--loss", name, "--seed", str(sd), "--out", str(root / tag), "--quiet", "--threads", str(threads)]
                logf = open(root / f"{tag}.txt", "w")
                running[(name, sd)] = (subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env), logf,
                                       time.perf_counter())
            time.sleep(0.2)
            for (name, sd), (proc, logf, t0) in list(running.items()):
                if proc.poll() is None:
                    continue
                logf.close()
                del running[(name, sd)]
                tag = f"{name}-seed{sd}"
                times[(name, sd)] = time.perf_counter() - t0
                if proc.returncode != 0:
                    tail = (root / f"{tag}.txt").read_text()[-3000:]
                    raise SystemExit(f"hss-train --demo: the {tag} run failed (exit {proc.returncode}):\n{tail}")
                logs[(name, sd)] = [r for r in json.loads((root / tag / "log.json").read_text()) if "metrics" in r]
                print(f"[demo] {tag}: done in {times[(name, sd)]:.0f} s", flush=True)
    finally:
        for proc, logf, _ in running.values():
            proc.kill()
            logf.close()
    return logs, times


def _report(args, base, losses: List[str], seeds: List[int], logs: dict, times: dict, wall: float, jobs: int,
            root: Path) -> dict:
    """Print the comparison (mean curves, steps to reach flat cross-entropy's final mIoU, per seed), write
    ``comparison.png`` in the output folder, and return the figures."""
    runs = {n: _mean_log([logs[(n, sd)] for sd in seeds]) for n in losses}
    depths = sorted(runs[losses[0]][0]["metrics"], key=int)
    tree = build_tree(base)
    print(f"\nSynthetic data on tree {tree!r} (leaf frequencies Zipf^{base.imbalance:g}, noise {base.noise:g}); "
          f"same U-Net, {base.steps} steps of batch {base.batch_size} at {base.size[0]}px, seeds {seeds}.\n"
          f"Validation mIoU per depth, mean over the seeds ({base.val_size} images; d1 = coarsest, "
          f"d{depths[-1]} = leaves):")
    w = 7 * len(depths)
    print("step  " + "".join(f"| {n:<{w}}" for n in losses))
    print("      " + "".join("| " + "".join(f"d{d:<6}" for d in depths) for _ in losses))
    for i, r in enumerate(runs[losses[0]]):
        row = f"{r['step']:<6}"
        for n in losses:
            rec = runs[n][i] if i < len(runs[n]) else None
            row += "| " + "".join(f"{rec['metrics'][d]['miou']:<7.3f}" if rec else " " * 7 for d in depths)
        print(row)

    ref = "ce" if "ce" in losses else None

    def reach_table(curves: Dict[str, List[dict]]):
        # The target at each depth: flat cross-entropy's final mIoU there (times --demo-target), i.e. how
        # many steps each loss needs to match what the flat loss reaches at the end of the run. Without
        # ce, the worst loss's final mIoU.
        targets = {d: args.demo_target * (curves[ref][-1]["metrics"][d]["miou"] if ref else
                                          min(curves[n][-1]["metrics"][d]["miou"] for n in losses)) for d in depths}
        reach = {n: {d: _first_reach(curves[n], d, targets[d]) for d in depths} for n in losses}
        every = {n: (None if None in reach[n].values() else max(reach[n].values())) for n in losses}
        return targets, reach, every

    def fmt(v):
        return "-" if v is None else str(v)

    targets, reach, every = reach_table(runs)
    what = "flat cross-entropy's" if ref else "the worst loss's"
    scale = "" if args.demo_target == 1 else f"{args.demo_target:g} x "
    print(f"\nSteps to reach {scale}{what} final mean mIoU at each depth ('-': not reached in {base.steps} steps):")
    cols = [f"d{d} ({targets[d]:.3f})  " for d in depths]
    print("loss          " + "".join(cols) + "every depth")
    for n in losses:
        print(f"{n:<14}" + "".join(f"{fmt(reach[n][d]):<{len(c)}}" for d, c in zip(depths, cols)) + fmt(every[n]))
    print("\nFinal mIoU per depth (mean over seeds): " + "; ".join(
        f"{n}: " + " ".join(f"d{d} {runs[n][-1]['metrics'][d]['miou']:.3f}" for d in depths) for n in losses))
    per_seed = {sd: reach_table({n: logs[(n, sd)] for n in losses})[2] for sd in seeds}
    if len(seeds) > 1:
        print("The same, seed by seed (steps to reach every depth's target): " + "; ".join(
            f"seed {sd}: " + ", ".join(f"{n} {fmt(per_seed[sd][n])}" for n in losses) for sd in seeds))
    if ref:
        flat = every[ref]
        for n in losses:
            if n == ref:
                continue
            mine = every[n]
            if mine is None:
                verdict = "did NOT reach"
            else:
                verdict = (f"reached it in {mine} steps, " + ("fewer than" if mine < flat else "as many as"
                           if mine == flat else "MORE than") + f" flat cross-entropy's {flat}")
            wins = sum(per_seed[sd][n] is not None and per_seed[sd][n] <= per_seed[sd][ref] for sd in seeds)
            print(f"{n} {verdict} (on the mean curves); seed by seed it matched flat cross-entropy's final mIoU at "
                  f"every depth as fast or faster on {wins} of {len(seeds)} seed(s).")
    print(f"Wall time: {wall:.0f} s for {len(logs)} runs ({jobs} at a time).")
    _save_comparison(root / "comparison.png", {n: [logs[(n, sd)] for sd in seeds] for n in losses}, depths,
                     f"{tree!r}, seeds {seeds}")
    print(f"Plot: {root / 'comparison.png'}")
    return {"runs": runs, "logs": logs, "targets": targets, "reach": reach, "every": every, "times": times}


def demo(args, argv: Optional[List[str]] = None) -> dict:
    """Train every loss of ``--demo-losses`` with the same model, data and steps, for ``--demo-seeds``
    seeds (one process per run, ``--demo-jobs`` at a time, CPU threads shared out); print the seeds'
    mean validation mIoU per depth against steps, and the steps each loss needs to reach a target mIoU
    at every depth (on the mean curves, and per seed)."""
    losses = [s.strip() for s in args.demo_losses.split(",") if s.strip()]
    for name in losses:
        if name not in LOSSES:
            raise SystemExit(f"hss-train: --demo-losses: unknown loss {name!r}; choose from {LOSSES}")
    if args.demo_seeds < 1:
        raise SystemExit("hss-train: --demo-seeds must be >= 1")
    run_argv = _demo_argv(list(sys.argv[1:] if argv is None else argv))
    base = build_parser().parse_args(run_argv)
    check_args(base)
    seeds = [args.seed + i for i in range(args.demo_seeds)]
    todo = [(n, sd) for sd in seeds for n in losses]
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    jobs = max(1, min(len(todo), args.demo_jobs or cpus))
    threads = args.threads or max(1, cpus // jobs)
    root = Path(args.out or DEMO_OUT)
    root.mkdir(parents=True, exist_ok=True)
    print(f"[demo] {', '.join(losses)} x seeds {', '.join(map(str, seeds))}: {base.steps} steps each, {jobs} "
          f"run(s) at a time, {threads} thread(s) each; outputs in {root.resolve()}", flush=True)
    t_start = time.perf_counter()
    logs, times = _run_all(todo, run_argv, root, jobs, threads)
    wall = time.perf_counter() - t_start
    return _report(args, base, losses, seeds, logs, times, wall, jobs, root)
