"""How the benchmarks measure: bytes to move, time, copy bandwidth, peak extra memory, the machine.

Nothing here knows about losses; :mod:`benchmarks.cases` builds the functions that get measured.
"""
from __future__ import annotations

import datetime
import gc
import math
import os
import platform
import subprocess
import time
from typing import Callable, List, Optional

import numpy as np
import torch

__all__ = [
    "PASSES",
    "bytes_moved",
    "Timing",
    "time_pass",
    "copy_bandwidth",
    "cuda_peak_extra",
    "rss_now",
    "reset_rss_peak",
    "rss_peak",
    "cache_bytes",
    "machine_info",
    "device_slug",
]

PASSES = ("forward", "backward", "forward+backward")


def bytes_moved(pass_name: str, pixels: int, channels: int, elem_bytes: int, label_bytes: int,
                out_bytes: int) -> int:
    """The fewest bytes one call must move through memory, by docs/MATH.md §5.6.

    With ``P = pixels``, ``C = channels`` (leaves or nodes), ``b = elem_bytes`` per logit and
    ``R = P·(C·b + label_bytes)`` (each input read once):

    * ``"forward"`` (nothing saved for a backward): ``R + out_bytes``;
    * ``"forward+backward"`` through autograd: ``2R + P·C·b`` (the inputs read twice, the gradient
      written once; the scalar loss is not counted);
    * ``"backward"`` alone: ``R + P·C·b`` (the inputs read once, the gradient written once).

    ``label_bytes`` is per pixel: 8 for int64 labels, ``C·b_target`` for a dense float target (what
    ``binary_cross_entropy_with_logits`` reads), 0 for decode/argmax. ``out_bytes`` is the whole output
    (4 for a float32 scalar loss, ``8·P`` for int64 labels out of decode).

    Raises ValueError for an unknown pass or a negative size.
    """
    if min(pixels, channels, elem_bytes, label_bytes, out_bytes) < 0:
        raise ValueError("bytes_moved: sizes must be >= 0")
    logits = pixels * channels * elem_bytes
    reads = logits + pixels * label_bytes
    if pass_name == "forward":
        return reads + out_bytes
    if pass_name == "forward+backward":
        return 2 * reads + logits
    if pass_name == "backward":
        return reads + logits
    raise ValueError(f"bytes_moved: unknown pass {pass_name!r}; choose one of {PASSES}")


class Timing:
    """Per-repetition times in milliseconds and their summary."""

    def __init__(self, times_ms: List[float], timer: str):
        if not times_ms:
            raise ValueError("Timing: no repetitions")
        self.times_ms = [float(t) for t in times_ms]
        self.timer = timer
        a = np.asarray(self.times_ms)
        self.median_ms = float(np.median(a))
        self.p25_ms, self.p75_ms = (float(v) for v in np.percentile(a, [25, 75]))
        self.min_ms = float(a.min())
        self.max_ms = float(a.max())

    def as_dict(self) -> dict:
        return {"median_ms": self.median_ms, "p25_ms": self.p25_ms, "p75_ms": self.p75_ms,
                "iqr_ms": self.p75_ms - self.p25_ms, "min_ms": self.min_ms, "max_ms": self.max_ms,
                "reps": len(self.times_ms), "timer": self.timer, "times_ms": self.times_ms}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_pass(setup: Callable[[int], object], run: Callable[[object], object], device: torch.device,
              n_sets: int = 1, reps: Optional[int] = None, warmup: Optional[int] = None,
              budget_s: Optional[float] = None) -> Timing:
    """Time ``run(setup(i))`` over repetitions; only ``run`` is inside the timed region.

    ``setup(i)`` prepares repetition ``i`` (input set ``i % n_sets``, or the forward pass that a
    timed backward needs) and is never timed. On CUDA each repetition sits between two CUDA events
    (read after one synchronize at the end); on the CPU between two ``time.perf_counter`` reads.
    After ``warmup`` untimed runs (default 2 on the CPU, 5 on CUDA; the first absorbs compilation),
    ``reps`` timed runs, or, when ``reps`` is None, as many as fit in ``budget_s`` seconds (CPU 1 s,
    between 5 and 50 runs; CUDA 0.5 s, between 20 and 200) judged from the warm-up's speed.
    """
    cuda = device.type == "cuda"
    warmup = (5 if cuda else 2) if warmup is None else max(0, int(warmup))
    out = None
    t0 = time.perf_counter()
    for i in range(warmup):
        state = setup(i)
        out = run(state)
        del state, out
    _sync(device)
    if reps is None:
        per = (time.perf_counter() - t0) / max(warmup, 1)
        budget = budget_s if budget_s is not None else (0.5 if cuda else 1.0)
        lo, hi = (20, 200) if cuda else (5, 50)
        reps = int(min(hi, max(lo, math.ceil(budget / max(per, 1e-6)))))
    reps = max(1, int(reps))
    times: List[float] = []
    if cuda:
        events = []
        for i in range(reps):
            state = setup(warmup + i)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = run(state)
            end.record()
            events.append((start, end))
            del state, out
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) for s, e in events]
        return Timing(times, "cuda-events")
    for i in range(reps):
        state = setup(warmup + i)
        t = time.perf_counter()
        out = run(state)
        times.append((time.perf_counter() - t) * 1e3)
        del state, out
    return Timing(times, "perf_counter")


def copy_bandwidth(device: torch.device, nbytes: Optional[int] = None, reps: int = 10) -> dict:
    """Measured copy bandwidth: ``dst.copy_(src)`` of a large random float32 buffer on ``device``.

    Bytes counted = read + written = ``2 * nbytes`` per copy. Default buffer: 1 GiB on CUDA (far above
    any L2), 256 MiB on the CPU (above any last-level cache). Returns GB/s (1e9) with its timing.
    """
    cuda = device.type == "cuda"
    if nbytes is None:
        nbytes = (1 << 30) if cuda else (256 << 20)
    n = nbytes // 4
    src = torch.randn(n, device=device)  # random, never zeros
    dst = torch.empty_like(src)
    timing = time_pass(lambda i: None, lambda _: dst.copy_(src), device, reps=reps, warmup=2)
    gbps = 2 * n * 4 / (timing.median_ms * 1e-3) / 1e9
    best = 2 * n * 4 / (timing.min_ms * 1e-3) / 1e9
    del src, dst
    return {"GBps": gbps, "GBps_best": best, "buffer_bytes": n * 4, "bytes_per_copy": 2 * n * 4,
            "timing": timing.as_dict(), "method": f"{device.type} tensor copy_ of {n * 4 / 2**20:.0f} MiB, "
            f"median of {timing.as_dict()['reps']}, counting read + write"}


def cuda_peak_extra(setup: Callable[[int], object], run: Callable[[object], object],
                    device: torch.device) -> int:
    """Bytes the CUDA caching allocator held at peak during ``run`` beyond what was allocated before it
    (inputs, and for a timed backward the forward's saved tensors, are already there)."""
    state = setup(0)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    out = run(state)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out, state
    return int(peak)


# ---- CPU resident-set figures (Linux /proc). See benchmarks/memprobe.py for why and how they are used.
def rss_now() -> Optional[int]:
    """Current resident set size in bytes (VmRSS), or None off Linux."""
    return _status_field("VmRSS")


def rss_peak() -> Optional[int]:
    """Resident high-water mark in bytes since the process started or the last :func:`reset_rss_peak`."""
    return _status_field("VmHWM")


def reset_rss_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_field(name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(name + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cache_bytes(device: torch.device) -> int:
    """The last-level cache an input could sit in: the GPU's L2, or the CPU's largest cache (Linux
    sysfs; 32 MiB if unknown). Inputs smaller than a few times this get rotated among several sets."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 50 << 20) or (50 << 20))
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    s = f.read().strip()
            except OSError:
                continue
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(s[-1:], 1)
            best = max(best, int(s.rstrip("KMG")) * mult)
    except (OSError, ValueError):
        pass
    return best or (32 << 20)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def _git_commit() -> Optional[str]:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device: torch.device) -> dict:
    """Device name, library versions, date and load: what a reader needs to judge the numbers."""
    info = {
        "device_type": device.type,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except Exception:  # not installed, or fails to initialise without a driver
        info["triton"] = None
    try:
        import hss_kernels
        info["hss_kernels"] = hss_kernels.__version__
    except Exception:
        info["hss_kernels"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["device_name"] = torch.cuda.get_device_name(device)
        info["gpu_memory_bytes"] = int(props.total_memory)
        info["sm_count"] = int(props.multi_processor_count)
        info["l2_bytes"] = int(getattr(props, "L2_cache_size", 0) or 0)
        info["capability"] = f"{props.major}.{props.minor}"
    else:
        info["device_name"] = info["cpu"]
    if hasattr(os, "getloadavg"):
        info["load_average_start"] = list(os.getloadavg())
    return info


BUSY_LOAD = 0.5  # a 1-minute load average above this share of the logical cores: a busy machine
WIDE_SPREAD = 0.25  # a row whose interquartile range passes this share of its median


def run_warnings(doc: dict) -> List[str]:
    """What makes a run's times doubtful, one sentence each: a busy machine (the 1-minute load average at
    the start or the end above half the logical cores; CPU timings then are not a quiet machine's) and
    rows whose repetitions spread widely (IQR above a quarter of the median)."""
    out = []
    m = doc.get("meta", {})
    cores = m.get("cpu_count") or 1
    loads = [v[0] for v in (m.get("load_average_start"), m.get("load_average_end")) if v]
    if loads and max(loads) > BUSY_LOAD * cores:
        out.append(f"busy machine: load average {', '.join(f'{v:.1f}' for v in loads)} (start, end) on {cores} "
                   f"logical cores; the times are not a quiet machine's, run again when it is idle")
    wide = [f"{r['config']} {r['loss']} {r['label']} {r['pass']}" for c in doc.get("configs", []) for r in c["rows"]
            if r.get("status") == "ok" and r.get("median_ms") and r.get("iqr_ms", 0) > WIDE_SPREAD * r["median_ms"]]
    if wide:
        out.append(f"{len(wide)} row(s) spread widely (interquartile range above {WIDE_SPREAD:.0%} of the median): "
                   + "; ".join(wide[:5]) + (" ..." if len(wide) > 5 else ""))
    return out


def device_slug(info: dict) -> str:
    """A file-name-safe device name: ``cpu-<model>`` or the GPU's name."""
    name = info.get("device_name") or info["device_type"]
    if info["device_type"] == "cpu":
        name = "cpu-" + name
    keep = "".join(ch if ch.isalnum() else "-" for ch in name)
    while "--" in keep:
        keep = keep.replace("--", "-")
    return keep.strip("-")[:60] or info["device_type"]


def collect() -> None:
    """Drop garbage and cached device blocks between measurements."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
