"""``python -m benchmarks`` (from the checkout): compare the loss implementations on this machine.

For each configuration, loss, backend (whichever of ``reference``, ``reference+compile``, ``triton``,
``native`` run here, plus the flat PyTorch baseline a user would otherwise run) and pass, it reports the
median time and its spread, the bytes docs/MATH.md §5.6 says the call must move, the achieved bandwidth and
its share of the copy bandwidth measured in the same run, speed-ups over the reference and over the
flat baseline, and the peak extra memory. Output: a Markdown table on stdout and, under ``--out``,
``<device>-<date>.md``, ``.json`` and ``.png``. See ``benchmarks/results/README.md``.

Examples::

    python -m benchmarks                          # GPU: cityscapes, vistas, vistas2, ppp; CPU: small
    python -m benchmarks --config small,medium --out benchmarks/results
    python -m benchmarks --config vistas --dtype bfloat16 --loss hierarchical_softmax --backend reference,triton
    python -m benchmarks --config small --sweep
    python -m benchmarks --config vistas:hierarchical_softmax,vistas2:tree_min+tree_bce+decode --backend triton,native \
        --time-limit 120 --check-size 64x64      # what python -m benchmarks.gpu_session runs
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

__all__ = ["main", "parse_args", "run"]

DTYPES = ("float32", "bfloat16", "float16")


def _csv(values: Optional[Sequence[str]]) -> List[str]:
    out: List[str] = []
    for v in values or []:
        out += [p.strip() for p in v.split(",") if p.strip()]
    return out


def _size(text: str):
    try:
        h, w = text.lower().replace("×", "x").split("x")
        h, w = int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--size must look like 512x1024, got {text!r}")
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f"--size must be positive, got {text!r}")
    return h, w


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def _positive_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return v


def build_parser() -> argparse.ArgumentParser:
    from .cases import CONFIGS, DEFAULT_LOSSES, HSS_BACKENDS, LOSSES
    from .measure import PASSES

    p = argparse.ArgumentParser(
        prog="python -m benchmarks", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Configurations: " + "; ".join(
            f"{c.name} = tree {c.tree}, B={c.batch}, {c.height}x{c.width}" for c in CONFIGS.values()))
    p.add_argument("--config", action="append",
                   help=f"comma-separated among {sorted(CONFIGS)} (default: the four real ones on a GPU, "
                        f"small on the CPU); NAME:LOSS+LOSS runs only those losses on that configuration "
                        f"(e.g. vistas:hierarchical_softmax,vistas2:tree_min+decode)")
    p.add_argument("--batch", type=_positive, help="override the configurations' batch size")
    p.add_argument("--size", type=_size, help="override the image size, HxW (e.g. 512x1024)")
    p.add_argument("--dtype", choices=DTYPES, default="float32", help="logits dtype (default float32)")
    p.add_argument("--weights", choices=("none", "class", "pixel", "class+pixel"), default="none",
                   help="weights every loss row passes (the flat baselines too): class_weight (one per leaf), a "
                        "pixel_weight map (4 bytes per pixel more to read), or both (default none; decode none)")
    p.add_argument("--loss", action="append",
                   help=f"comma-separated among {sorted(LOSSES)} or 'all' (default {','.join(DEFAULT_LOSSES)})")
    p.add_argument("--backend", action="append",
                   help=f"comma-separated among {HSS_BACKENDS} (default: every one available here; the flat "
                        f"baseline always runs). On the CPU Triton is timed only when named here, under "
                        f"its interpreter.")
    p.add_argument("--pass", dest="passes", action="append",
                   help=f"comma-separated among {list(PASSES)} (default all; decode is forward only)")
    p.add_argument("--device", help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--reps", type=_positive, help="timed repetitions per row (default: enough for ~1 s on the "
                                                  "CPU, 0.5 s on a GPU, within [5, 50] / [20, 200])")
    p.add_argument("--warmup", type=int, help="untimed warm-up runs per row (default 2 on the CPU, 5 on a GPU)")
    p.add_argument("--out", default=os.path.join("benchmarks", "results"),
                   help="folder for <device>-<date>.md/.json/.png (default benchmarks/results)")
    p.add_argument("--no-save", action="store_true", help="print the table only, write no files")
    p.add_argument("--memory", choices=("on", "off"), default="on",
                   help="measure peak extra memory (CPU: one extra subprocess per configuration)")
    p.add_argument("--sweep", action="store_true",
                   help="also time against resolution and against the number of classes (forward+backward; "
                        "decode forward). reference+compile recompiles at every point: it joins the sweep only "
                        "when named with --backend")
    p.add_argument("--sweep-sizes", help="comma-separated square sizes for --sweep (default 128..2048 on a GPU, "
                                         "32..256 on the CPU)")
    p.add_argument("--sweep-leaves", help="comma-separated leaf counts of the random trees for --sweep")
    p.add_argument("--copy-mib", type=_positive, help="buffer size of the copy-bandwidth measurement in MiB "
                                                       "(default 1024 on a GPU, 256 on the CPU)")
    p.add_argument("--threads", type=_positive,
                   help="CPU threads for torch (default: torch's own choice). On a machine shared with other "
                        "jobs, 1 avoids OpenMP threads spinning against each other")
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (default 0)")
    p.add_argument("--time-limit", type=_positive_float, metavar="SECONDS",
                   help="stop starting rows after this many seconds, shared out evenly among the configurations "
                        "still to run; rows not started are listed as skipped, and the files are still written "
                        "(default: no limit)")
    p.add_argument("--check-size", type=_size, metavar="HxW",
                   help="compute the check column on the top-left HxW crop of the first image instead of the "
                        "whole input (the reference at a real size is slow and needs many GB; default: whole)")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    from .cases import CONFIGS, DEFAULT_LOSSES, HSS_BACKENDS, LOSSES
    from .measure import PASSES

    parser = build_parser()
    args = parser.parse_args(argv)

    def check_losses(names: List[str], where: str) -> List[str]:
        if "all" in names:
            names = list(LOSSES)
        for name in names:
            if name not in LOSSES:
                parser.error(f"unknown {where} {name!r}; choose among {sorted(LOSSES)} or 'all'")
        return list(dict.fromkeys(names))

    args.configs, args.config_losses = [], {}
    for entry in _csv(args.config):
        c, _, only = entry.partition(":")
        if c not in CONFIGS:
            parser.error(f"unknown --config {c!r}; choose among {sorted(CONFIGS)}")
        if c not in args.configs:
            args.configs.append(c)
        if only:
            args.config_losses[c] = check_losses([x.strip() for x in only.split("+") if x.strip()],
                                                 f"loss in --config {entry}")
    args.losses = check_losses(_csv(args.loss) or list(DEFAULT_LOSSES), "--loss")
    args.backends_named = _csv(args.backend)
    for b in args.backends_named:
        if b not in HSS_BACKENDS:
            parser.error(f"unknown --backend {b!r}; choose among {HSS_BACKENDS}")
    args.pass_list = _csv(args.passes) or list(PASSES)
    for name in args.pass_list:
        if name not in PASSES:
            parser.error(f"unknown --pass {name!r}; choose among {list(PASSES)}")
    if args.warmup is not None and args.warmup < 0:
        parser.error("--warmup must be >= 0")
    for opt in ("sweep_sizes", "sweep_leaves"):
        raw = getattr(args, opt)
        try:
            vals = [int(v) for v in _csv([raw])] if raw else None
        except ValueError:
            parser.error(f"--{opt.replace('_', '-')} takes comma-separated integers, got {raw!r}")
        if vals is not None and (not vals or min(vals) < (2 if opt == "sweep_leaves" else 1)):
            parser.error(f"--{opt.replace('_', '-')} needs positive values (leaves >= 2)")
        setattr(args, opt, vals)
    return args


def _row_base(cfg_name, loss, backend, pass_name, label):
    return {"config": cfg_name, "loss": loss, "backend": backend, "label": label, "pass": pass_name}


def _time_up(deadline: Optional[float]) -> bool:
    return deadline is not None and time.monotonic() >= deadline


def _time_limit_reason(args) -> str:
    return f"time limit reached (--time-limit {args.time_limit:g} s)"


def _crop(s: dict, size) -> dict:
    """The top-left ``size`` = (h, w) crop of the first image of an input set, contiguous; ``s`` itself
    when ``size`` is None."""
    if size is None:
        return s
    h, w = size
    return {k: v[:1, ..., :h, :w].contiguous() for k, v in s.items()}


@dataclass
class _ConfigRun:
    """What the steps of one configuration's benchmark share."""
    cfg: object                      # cases.Config
    args: argparse.Namespace
    device: object                   # torch.device
    dtype: object                    # torch.dtype
    copy_gbps: float
    deadline: Optional[float]        # time.monotonic() after which no row starts
    tree: object                     # the configuration's Tree
    check_size: Optional[tuple]      # (h, w) crop of image 0 for the check column, or None: whole input
    cache: int                       # bytes of the last-level cache (how many input sets to rotate)
    elem: int                        # bytes per logit
    # Rows whose peak memory the CPU probe measures afterwards, with the (loss, backend, pass) it runs.
    mem_requests: List[tuple] = field(default_factory=list)

    @property
    def pixels(self) -> int:
        return self.cfg.batch * self.cfg.height * self.cfg.width


def bench_config(cfg, args, device, dtype, copy_gbps: float, deadline: Optional[float] = None) -> dict:
    """Every row of one configuration (a dict for the JSON: the configuration and its rows). Rows that
    would start after ``deadline`` (``time.monotonic()``) are listed as skipped.

    The steps, per loss: the input sets (:func:`_inputs`), the reference's output for the check column
    (:func:`_reference_output`), then the rows of every backend in order, the flat PyTorch baseline last
    (:func:`_row_order`, :func:`_backend_rows`: time, bytes, check, memory per pass); then the CPU's peak
    memory in a fresh process (:func:`_cpu_peak_memory`) and the speed-ups (:func:`_speedups`).
    """
    import torch

    from . import cases as C
    from . import measure as M

    tree = C.load_tree(cfg.tree)
    out = {"name": cfg.name, "tree": cfg.tree, "leaves": tree.num_leaves, "nodes": tree.num_nodes,
           "depth": tree.depth, "batch": cfg.batch, "height": cfg.height, "width": cfg.width,
           "pixels": cfg.batch * cfg.height * cfg.width, "dtype": args.dtype, "weights": args.weights,
           "note": cfg.note, "rows": []}
    check_size = getattr(args, "check_size", None)
    if check_size is not None:
        check_size = (min(check_size[0], cfg.height), min(check_size[1], cfg.width))
        out["check_size"] = list(check_size)
    run = _ConfigRun(cfg, args, device, dtype, copy_gbps, deadline, tree, check_size, M.cache_bytes(device),
                     torch.empty((), dtype=dtype).element_size())
    for loss in getattr(args, "config_losses", {}).get(cfg.name, args.losses):
        out["rows"] += _loss_rows(run, loss)
    if run.mem_requests:
        _cpu_peak_memory(run)
    _speedups(out["rows"])
    return out


def _row_order(status: Dict[str, Optional[str]]) -> List[str]:
    """The rows' backends: the library's (``status``: available, or why not) in the usual order, then
    ``flat``, the PyTorch baseline a user would otherwise run on the same logits (no check column)."""
    from . import cases as C

    return [b for b in C.HSS_BACKENDS if b in status] + ["flat"]


def _loss_rows(run: _ConfigRun, loss: str) -> List[dict]:
    """Every row of one loss: each backend's (and the flat baseline's) passes."""
    from . import cases as C
    from . import measure as M

    cfg, args, device = run.cfg, run.args, run.device
    spec = C.LOSSES[loss]
    status = C.hss_backends_for(spec, device, args.backends_named)
    passes = [p for p in args.pass_list if spec.has_backward or p == "forward"]
    if not passes:
        return []
    if _time_up(run.deadline):
        return [dict(_row_base(cfg.name, loss, b, p, C.row_label(spec, b, device)), status="skipped",
                     reason=status.get(b) or _time_limit_reason(args))  # a missing backend keeps its reason
                for b in _row_order(status) for p in passes]
    sets, n_sets, failed = _inputs(run, spec)
    if failed is not None:
        rows = [dict(_row_base(cfg.name, loss, b, p, b), status="error", reason=failed)
                for b in list(status) + ["flat"] for p in passes]
        M.collect()
        return rows
    ref_out, ref_error = None, None
    if any(why is None for why in status.values()):
        ref_out, ref_error = _reference_output(run, spec, sets)
    rows: List[dict] = []
    for backend in _row_order(status):
        rows += _backend_rows(run, spec, loss, backend, status.get(backend), passes, sets, n_sets, ref_out,
                              ref_error)
    del sets, ref_out
    M.collect()
    return rows


def _inputs(run: _ConfigRun, spec):
    """``(input sets, number of sets, None)``, as many sets as it takes to rotate them out of the
    last-level cache, or ``(None, n, reason)`` when they cannot be made (e.g. out of memory)."""
    import torch

    from . import cases as C

    cfg, tree = run.cfg, run.tree
    channels = tree.num_leaves if spec.channels == "leaves" else tree.num_nodes
    dense = "binary" in spec.baseline
    set_bytes = run.pixels * channels * run.elem * (2 if dense else 1) + run.pixels * 8
    n_sets = C.n_input_sets(set_bytes, run.cache)
    try:
        torch.manual_seed(run.args.seed)
        sets = C.make_inputs(spec, tree, cfg.batch, cfg.height, cfg.width, run.dtype, run.device, n_sets, dense,
                             run.args.weights)
    except Exception as exc:  # e.g. out of memory at a size too large for this device
        return None, n_sets, f"inputs: {type(exc).__name__}: {exc}".splitlines()[0]
    return sets, n_sets, None


def _reference_output(run: _ConfigRun, spec, sets):
    """The check column's yardstick: ``(the reference's output on the first set (or its crop), None)``
    once per loss, or ``(None, why it failed)``."""
    from . import cases as C
    from . import measure as M

    ref_out, ref_error = None, None
    try:
        ref_out = C.forward_output(spec, run.tree, "reference", _crop(sets[0], run.check_size),
                                   weights=run.args.weights)
    except Exception as exc:
        ref_error = f"reference failed: {type(exc).__name__}: {exc}".splitlines()[0]
    M.collect()
    return ref_out, ref_error


def _check(run: _ConfigRun, spec, backend: str, fn, sets, ref_out, ref_error):
    """``(check, note)``: the backend's difference from the reference on the same input (None for the flat
    baseline, or with a note when the reference failed)."""
    from . import cases as C

    if backend == "flat":
        return None, None
    got = C.forward_output(spec, run.tree, backend, _crop(sets[0], run.check_size), fn)
    if ref_out is None:
        return None, ref_error
    return C.check_value(spec, got, ref_out), None


def _check_fields(run: _ConfigRun, row: dict, loss: str, check, check_note) -> None:
    row["check"] = check
    if check_note:
        row["check_note"] = check_note
    row["check_kind"] = None if check is None else (
        "fraction of labels differing from the reference" if loss == "decode"
        else "relative difference of the loss from the reference") + (
        "" if run.check_size is None else f" on a {run.check_size[0]}x{run.check_size[1]} crop of image 0")


def _backend_rows(run: _ConfigRun, spec, loss: str, backend: str, why: Optional[str], passes: List[str], sets,
                  n_sets: int, ref_out, ref_error) -> List[dict]:
    """One backend's rows, one per pass: skipped (``why``), an error, or timed (time, bytes, check,
    memory)."""
    import torch

    from . import cases as C
    from . import measure as M

    cfg, device = run.cfg, run.device
    interp = device.type == "cpu" and backend == "triton"
    label = C.row_label(spec, backend, device)
    if why is not None:
        return [dict(_row_base(cfg.name, loss, backend, p, backend), status="skipped", reason=why) for p in passes]
    fn, check, check_note, failed = None, None, None, None
    try:
        if backend == "reference+compile":
            torch._dynamo.reset()  # fresh compile caches: no recompile limit across sizes
        fn = C._call(spec, run.tree, backend, run.args.weights)
        check, check_note = _check(run, spec, backend, fn, sets, ref_out, ref_error)
    except Exception as exc:
        failed = f"{type(exc).__name__}: {exc}".splitlines()[0]
    if failed is not None:
        fn = None
        M.collect()  # after the except block: its traceback no longer pins the tensors
        return [dict(_row_base(cfg.name, loss, backend, p, label), status="error", reason=failed) for p in passes]
    rows = []
    for p in passes:
        row = _row_base(cfg.name, loss, backend, p, label)
        if _time_up(run.deadline):
            rows.append(dict(row, status="skipped", reason=_time_limit_reason(run.args)))
            continue
        row["interpreter"] = interp
        try:
            case = C.build_case(spec, run.tree, backend, p, sets, fn, run.args.weights)
            timing = M.time_pass(case.setup, case.run, device, n_sets=n_sets, reps=run.args.reps,
                                 warmup=run.args.warmup)
            row.update(status="ok", **timing.as_dict())
            nbytes = M.bytes_moved(p, run.pixels, case.channels, run.elem, case.label_bytes, case.out_bytes)
            row.update(pixels=run.pixels, channels=case.channels, elem_bytes=run.elem,
                       label_bytes_per_pixel=case.label_bytes, out_bytes=case.out_bytes, bytes=nbytes,
                       n_input_sets=n_sets, GBps=nbytes / (timing.median_ms * 1e-3) / 1e9)
            row["copy_share"] = row["GBps"] / run.copy_gbps if run.copy_gbps else None
            _check_fields(run, row, loss, check, check_note)
            _memory(run, row, case, interp, [loss, backend, p])
        except Exception as exc:
            row.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
        if row.get("status") == "error":
            M.collect()
        rows.append(row)
        print(_progress(row), file=sys.stderr, flush=True)
    return rows


def _memory(run: _ConfigRun, row: dict, case, interp: bool, what: list) -> None:
    """Peak extra memory of a timed row: measured now on CUDA; on the CPU requested from the probe
    (:func:`_cpu_peak_memory`, a fresh process); not at all under ``--memory off`` or Triton's interpreter."""
    from . import measure as M

    if run.args.memory == "on" and run.device.type == "cuda":
        row["peak_extra_bytes"] = M.cuda_peak_extra(case.setup, case.run, run.device)
        row["memory_method"] = ("CUDA: max_memory_allocated after reset_peak_memory_stats, "
                                "minus memory_allocated before the call")
    elif run.args.memory == "on" and not interp:
        run.mem_requests.append((row, what))
    else:
        row["peak_extra_bytes"] = None
        row["memory_method"] = "not measured"


def _cpu_peak_memory(run: _ConfigRun) -> None:
    """Fill in the peak extra memory of the rows in ``run.mem_requests``, measured in a fresh process."""
    import torch

    from .memprobe import METHOD as CPU_MEM_METHOD
    from .memprobe import probe

    cfg = run.cfg
    req = {"tree": cfg.tree, "batch": cfg.batch, "height": cfg.height, "width": cfg.width,
           "dtype": run.args.dtype, "weights": run.args.weights, "threads": torch.get_num_threads(), "cases": [c for _, c in run.mem_requests]}
    print(f"[{cfg.name}] measuring peak memory in a fresh process ({len(run.mem_requests)} rows)",
          file=sys.stderr, flush=True)
    for (row, _), res in zip(run.mem_requests, probe(req)):
        row["peak_extra_bytes"] = res.get("peak_extra_bytes")
        row["memory_method"] = CPU_MEM_METHOD if "error" not in res else res["error"]


def _progress(row: dict) -> str:
    if row.get("status") != "ok":
        return f"  {row['loss']:<20} {row['label']:<34} {row['pass']:<17} {row.get('status')}: {row.get('reason')}"
    return (f"  {row['loss']:<20} {row['label']:<34} {row['pass']:<17} {row['median_ms']:10.3f} ms "
            f"{row['GBps']:8.2f} GB/s")


def _speedups(rows: List[dict]) -> None:
    """× reference and × flat baseline: the other row's median over this row's, same loss and pass."""
    ref: Dict[tuple, float] = {}
    flat: Dict[tuple, float] = {}
    for r in rows:
        if r.get("status") == "ok":
            key = (r["config"], r["loss"], r["pass"])
            if r["backend"] == "reference":
                ref[key] = r["median_ms"]
            elif r["backend"] == "flat":
                flat[key] = r["median_ms"]
    for r in rows:
        if r.get("status") != "ok":
            continue
        key = (r["config"], r["loss"], r["pass"])
        r["speedup_vs_reference"] = ref[key] / r["median_ms"] if key in ref else None
        r["speedup_vs_flat"] = flat[key] / r["median_ms"] if key in flat else None


def run_sweep(args, device, dtype, base_cfg, deadline: Optional[float] = None) -> dict:
    """Time against resolution (the base configuration's tree, batch 1) and against the number of
    classes (random depth-3 trees), one pass per loss: forward+backward (decode: forward)."""
    import torch

    from . import cases as C
    from . import measure as M

    cuda = device.type == "cuda"
    sizes = args.sweep_sizes or ([128, 256, 512, 1024, 2048] if cuda else [32, 64, 128, 256])
    leaves = args.sweep_leaves or [8, 16, 32, 64, 128, 256]
    class_size = 512 if cuda else 64
    elem = torch.empty((), dtype=dtype).element_size()
    cache = M.cache_bytes(device)
    points = []

    def one(kind, tree, tree_name, H, W):
        for loss in args.losses:
            if _time_up(deadline):
                points.append({"sweep": kind, "loss": loss, "status": "skipped", "height": H, "width": W,
                               "reason": _time_limit_reason(args)})
                continue
            spec = C.LOSSES[loss]
            status = C.hss_backends_for(spec, device, args.backends_named)
            if not args.backends_named:  # one compilation per point: only when asked for by name
                status["reference+compile"] = "not in the sweep unless named with --backend"
            p = "forward+backward" if spec.has_backward else "forward"
            channels = tree.num_leaves if spec.channels == "leaves" else tree.num_nodes
            dense = "binary" in spec.baseline
            n_sets = C.n_input_sets(H * W * (channels * elem * (2 if dense else 1) + 8), cache)
            try:
                torch.manual_seed(args.seed)
                sets = C.make_inputs(spec, tree, 1, H, W, dtype, device, n_sets, dense, args.weights)
            except Exception as exc:
                sets = f"{type(exc).__name__}: {exc}".splitlines()[0]
            if isinstance(sets, str):
                points.append({"sweep": kind, "loss": loss, "status": "error", "height": H, "width": W,
                               "reason": sets})
                M.collect()
                continue
            for backend in [b for b in C.HSS_BACKENDS if status.get(b, "x") is None] + ["flat"]:
                pt = {"sweep": kind, "tree": tree_name, "loss": loss, "backend": backend,
                      "label": C.row_label(spec, backend, device), "pass": p, "height": H,
                      "width": W, "pixels": H * W, "channels": channels}
                try:
                    if backend == "reference+compile":
                        torch._dynamo.reset()
                    case = C.build_case(spec, tree, backend, p, sets, weights=args.weights)
                    t = M.time_pass(case.setup, case.run, device, n_sets=n_sets, reps=args.reps,
                                    warmup=args.warmup, budget_s=0.3 if cuda else 0.5)
                    pt.update(status="ok", median_ms=t.median_ms, p25_ms=t.p25_ms, p75_ms=t.p75_ms,
                              reps=len(t.times_ms),
                              ns_per_pixel_channel=t.median_ms * 1e6 / (H * W * channels),
                              bytes=M.bytes_moved(p, H * W, channels, elem, case.label_bytes, case.out_bytes))
                except Exception as exc:
                    pt.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
                if pt["status"] == "error":
                    M.collect()
                points.append(pt)
                if pt.get("status") == "ok":
                    print(f"  sweep {kind:<10} {loss:<20} {pt['label']:<34} {H}x{W} C={channels:<4} "
                          f"{pt['median_ms']:10.3f} ms", file=sys.stderr, flush=True)
            del sets
            M.collect()

    base_tree = C.load_tree(base_cfg.tree)
    for s in sizes:
        one("resolution", base_tree, base_cfg.tree, s, s)
    for n in leaves:
        one("classes", C.random_tree(n, seed=args.seed), f"random({n} leaves)", class_size, class_size)
    return {"batch": 1, "sizes": sizes, "leaves": leaves, "class_sweep_size": class_size,
            "base_tree": base_cfg.tree, "points": points}


def run(args) -> dict:
    """Run the benchmarks that ``args`` (from :func:`parse_args`) select; returns the JSON document."""
    import torch

    from . import cases as C
    from . import measure as M

    # With --time-limit, counted from here, each configuration (and the sweep) may use an even share of
    # the time left when it starts.
    t_end = None if getattr(args, "time_limit", None) is None else time.monotonic() + args.time_limit
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks: --device cuda but torch sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    names = args.configs or (C.GPU_DEFAULT_CONFIGS if device.type == "cuda" else C.CPU_DEFAULT_CONFIGS)
    configs = []
    for n in names:
        cfg = C.CONFIGS[n]
        h, w = args.size or (cfg.height, cfg.width)
        configs.append(C.Config(cfg.name, cfg.tree, args.batch or cfg.batch, h, w, cfg.note))

    info = M.machine_info(device)
    info["command"] = " ".join(["python -m benchmarks", shlex.join(list(getattr(args, "argv", [])))]).strip()
    print(f"benchmarks on {info['device_name']}: measuring the copy bandwidth", file=sys.stderr, flush=True)
    copy = M.copy_bandwidth(device, None if args.copy_mib is None else args.copy_mib << 20)
    doc = {"meta": info, "copy_bandwidth": copy, "configs": [], "sweep": None,
           "columns": COLUMNS}
    parts = len(configs) + (1 if args.sweep else 0)

    def share(done: int) -> Optional[float]:
        if t_end is None:
            return None
        now = time.monotonic()
        return now + max(0.0, t_end - now) / (parts - done)

    for i, cfg in enumerate(configs):
        print(f"[{cfg.name}] tree {cfg.tree}, B={cfg.batch}, {cfg.height}x{cfg.width}, {args.dtype}",
              file=sys.stderr, flush=True)
        doc["configs"].append(bench_config(cfg, args, device, dtype, copy["GBps"], share(i)))
    if args.sweep:
        doc["sweep"] = run_sweep(args, device, dtype, configs[0], share(len(configs)))
    if t_end is not None:
        doc["time_limit_s"] = args.time_limit
    # Measured again at the end: on a shared machine the bandwidth drifts; the roofline is the better one.
    end = M.copy_bandwidth(device, None if args.copy_mib is None else args.copy_mib << 20)
    copy["GBps_start"], copy["GBps_end"] = copy["GBps"], end["GBps"]
    copy["GBps"] = max(copy["GBps_start"], end["GBps"])
    copy["GBps_best"] = max(copy["GBps_best"], end["GBps_best"])
    copy["method"] += "; measured before and after the rows, the larger median is the roofline"
    for cfg in doc["configs"]:
        for r in cfg["rows"]:
            if r.get("status") == "ok":
                r["copy_share"] = r["GBps"] / copy["GBps"]
    if hasattr(os, "getloadavg"):
        info["load_average_end"] = list(os.getloadavg())
    info["warnings"] = M.run_warnings(doc)
    info["busy"] = any(w.startswith("busy") for w in info["warnings"])
    for w in info["warnings"]:
        print(f"warning: {w}", file=sys.stderr)
    return doc


# Every per-row figure of the JSON, with its meaning (the README and the tests read this).
COLUMNS = {
    "config": "configuration name", "loss": "loss (or decode)", "backend": "registry backend, "
    "reference+compile, or flat (the PyTorch baseline)", "label": "row label as printed",
    "pass": "forward (no grad), backward (alone, after an untimed forward), forward+backward",
    "status": "ok, skipped or error", "median_ms": "median time per call", "p25_ms": "25th percentile",
    "p75_ms": "75th percentile", "iqr_ms": "p75 - p25", "min_ms": "fastest", "max_ms": "slowest",
    "reps": "timed repetitions", "timer": "cuda-events or perf_counter", "bytes": "bytes the call must move "
    "(docs/MATH.md §5.6, benchmarks.measure.bytes_moved)", "GBps": "bytes / median time, 1e9 B/s",
    "copy_share": "GBps / copy bandwidth measured in the same run", "speedup_vs_reference": "reference median / "
    "this median", "speedup_vs_flat": "flat baseline median / this median", "peak_extra_bytes": "peak memory "
    "beyond what was allocated before the call (see memory_method)", "check": "difference from the reference "
    "(see check_kind)",
}


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``python -m benchmarks``. Returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    from .report import markdown, save

    doc = run(args)
    text = markdown(doc)
    print(text)
    if not args.no_save:
        paths = save(doc, text, args.out)
        print("\n".join(f"wrote {p}" for p in paths), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
