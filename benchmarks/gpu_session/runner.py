"""The stage runner: budgets, subprocesses with timeouts, the summary files and the output folder's limits.

Nothing here knows what a stage does (see :mod:`benchmarks.gpu_session.stages`). Every stage runs its
commands as subprocesses in their own process group, with output to a log file; a command that outlives
its time is interrupted (SIGINT, so that pytest still writes its report), then terminated, then killed,
group and all. A stage that fails, times out or raises never stops the next one. ``summary.json`` and
``summary.md`` are rewritten and the logs re-packed into ``logs.tar.gz`` after every stage and every
``tick_s`` seconds, so a run stopped from outside still leaves what it did.
"""
from __future__ import annotations

import datetime
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

STATUSES = ("ok", "failed", "skipped", "timeout")

# What comes back from the GPU machine's output folder (/work/.library/device/README.md, "Limits").
MAX_FILES = 8
MAX_FOLDERS_DEEP = 2          # $OUT/a/b/file comes back, $OUT/a/b/c/file does not
MAX_FILE_BYTES = 16 << 20
MAX_TOTAL_BYTES = 64 << 20
NAME_OK = re.compile(r"^[A-Za-z0-9._-]+$")
PRIORITY = ("summary.json", "summary.md", "logs.tar.gz")
LOGS_TAR = "logs.tar.gz"
LOG_KEEP_BYTES = 4 << 20      # a larger log goes into the tarball as its first and last 2 MiB
TAR_MAX_BYTES = 15 << 20


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Interrupted(Exception):
    """The session got SIGTERM/SIGINT/SIGHUP from outside."""


@dataclass
class Stage:
    """One stage: ``fn(ctx)`` runs it and returns the fields of its summary entry (``status`` and
    ``note`` at least; without ``status`` the commands it ran decide). ``fraction`` of the budget and at
    least ``min_s`` seconds (see :func:`stage_timeout`). A ``background`` stage runs in a thread beside
    the stages after it, until the stage named ``join_before`` (or the end) waits for it."""
    name: str
    fraction: float
    min_s: float
    fn: Callable[["StageContext"], Optional[dict]]
    gpu: str = ""          # what it runs on a GPU machine (for --help and the README)
    dry: str = ""          # what it runs in --dry-run
    background: bool = False
    join_before: Optional[str] = None


@dataclass
class CmdResult:
    cmd: List[str]
    log: str
    rc: Optional[int]
    seconds: float
    timed_out: bool
    interrupted: bool = False   # stopped because the session was stopped from outside

    @property
    def status(self) -> str:
        if self.timed_out or self.interrupted:
            return "timeout"
        return "ok" if self.rc == 0 else "failed"


def worst_status(statuses: Sequence[str]) -> str:
    """timeout > failed > ok > skipped; ``ok`` for none."""
    for s in ("timeout", "failed", "ok", "skipped"):
        if s in statuses:
            return s
    return "ok"


def stage_timeout(remaining: float, stage: Stage, later: Sequence[Stage], usable: float) -> Optional[float]:
    """Seconds for ``stage`` when ``remaining`` seconds of the session are left (``usable`` in all), or
    None when it must be skipped.

    A foreground stage gets its share of what is left, ``remaining * fraction / (its fraction + the
    later foreground stages' fractions)`` (so time a stage did not use flows to the later ones), at least
    its ``min_s``; above its minimum it leaves the later foreground stages their minimums. A background
    stage gets ``fraction * usable``. Nothing gets more than ``remaining``; a stage whose minimum does not
    fit in ``remaining`` is skipped.
    """
    if remaining < stage.min_s or remaining <= 0:
        return None
    if stage.background:
        return max(stage.min_s, min(stage.fraction * usable, remaining))
    fg = [s for s in later if not s.background]
    pool = stage.fraction + sum(s.fraction for s in fg)
    share = remaining * stage.fraction / pool if pool > 0 else remaining
    t = min(max(share, stage.min_s), remaining - sum(s.min_s for s in fg))
    return min(max(t, stage.min_s), remaining)


# ------------------------------------------------------------------------------------------ processes
def _signal_group(pgid: int, sig: int) -> bool:
    try:
        os.killpg(pgid, sig)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def _stop_group(p: subprocess.Popen, interrupt_first: bool) -> None:
    """Stop ``p`` and everything in its process group: SIGINT (when ``interrupt_first``: pytest then still
    writes its report) and 10 s, SIGTERM and 3 s, then SIGKILL."""
    steps = ([(signal.SIGINT, 10.0)] if interrupt_first else []) + [(signal.SIGTERM, 3.0), (signal.SIGKILL, 5.0)]
    for sig, grace in steps:
        if p.poll() is not None:
            break
        _signal_group(p.pid, sig)
        try:
            p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    _signal_group(p.pid, signal.SIGKILL)  # whatever the leader left behind in its group


class ProcessRegistry:
    """The process groups running now, so that a signal to the session can stop them all."""

    def __init__(self):
        self._lock = threading.Lock()
        self._procs: set = set()
        self.stopping = False

    def add(self, p):
        with self._lock:
            self._procs.add(p)

    def discard(self, p):
        with self._lock:
            self._procs.discard(p)

    def stop_all(self):
        self.stopping = True
        with self._lock:
            procs = list(self._procs)
        for p in procs:
            _signal_group(p.pid, signal.SIGTERM)
        time.sleep(0.5)
        for p in procs:
            _signal_group(p.pid, signal.SIGKILL)


def run_commands(jobs: Sequence[dict], timeout: float, registry: Optional[ProcessRegistry] = None,
                 base_env: Optional[Dict[str, str]] = None) -> List[CmdResult]:
    """Run ``jobs`` (dicts: ``cmd``, ``log``, optional ``env``, ``cwd``, ``interrupt_first``) at the same
    time, each in its own process group with stdout and stderr appended to its log, and wait at most
    ``timeout`` seconds for all of them; the ones still running then are stopped with their groups."""
    registry = registry or ProcessRegistry()
    started = []
    t0 = time.monotonic()
    deadline = t0 + max(0.0, timeout)
    for job in jobs:
        env = dict(os.environ if base_env is None else base_env)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(job.get("env") or {})
        log = open(job["log"], "ab", buffering=0)
        extra = " ".join(f"{k}={v}" for k, v in (job.get("env") or {}).items())
        log.write(f"$ {extra + ' ' if extra else ''}{shlex.join(job['cmd'])}\n# cwd {job.get('cwd') or os.getcwd()}; "
                  f"time limit {timeout:.0f} s; started {utc_now()}\n".encode())
        try:
            p = subprocess.Popen(job["cmd"], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 cwd=job.get("cwd"), env=env, start_new_session=True)
        except OSError as exc:
            log.write(f"# could not start: {type(exc).__name__}: {exc}\n".encode())
            log.close()
            started.append((job, None, None, time.monotonic()))
            continue
        registry.add(p)
        started.append((job, p, log, time.monotonic()))
    results = []
    for job, p, log, t_start in started:
        if p is None:
            results.append(CmdResult(list(job["cmd"]), job["log"], None, 0.0, False))
            continue
        timed_out = False
        try:
            p.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
            _stop_group(p, job.get("interrupt_first", False))
        else:
            _signal_group(p.pid, signal.SIGKILL)  # leftovers of a finished command
        registry.discard(p)
        secs = time.monotonic() - t_start
        interrupted = registry.stopping and not timed_out and p.returncode != 0
        how = (f"stopped after its time limit of {timeout:.0f} s" if timed_out else
               "stopped: the session was stopped from outside" if interrupted else f"exit status {p.returncode}")
        log.write(f"\n# {how} ({secs:.1f} s)\n".encode())
        log.close()
        results.append(CmdResult(list(job["cmd"]), job["log"], p.returncode, secs, timed_out, interrupted))
    return results


# ------------------------------------------------------------------------------------------ the output folder
def out_problems(out_dir: str, priority: Sequence[str] = PRIORITY) -> List[tuple]:
    """What in ``out_dir`` would not come back from the GPU machine: (relative path, reason) for each
    link or special file, each name with characters other than letters, digits, '.', '_' and '-', each
    file more than two folders down or over 16 MiB, and the files past the 8th (``priority`` first, then
    by name) or past 64 MiB in all."""
    problems, files = [], []
    for dirpath, dirnames, filenames in os.walk(out_dir):
        rel_dir = os.path.relpath(dirpath, out_dir)
        parts = [] if rel_dir == "." else rel_dir.split(os.sep)
        for name in sorted(dirnames + filenames):
            rel = os.path.join(*parts, name)
            path = os.path.join(dirpath, name)
            if os.path.islink(path):
                problems.append((rel, "a link"))
                continue
            if name in dirnames:
                if not NAME_OK.match(name):
                    problems.append((rel, "a folder name with characters other than letters, digits, . _ -"))
                continue
            if not os.path.isfile(path):
                problems.append((rel, "not a plain file"))
            elif not all(NAME_OK.match(x) for x in parts + [name]):
                problems.append((rel, "a name with characters other than letters, digits, . _ -"))
            elif len(parts) > MAX_FOLDERS_DEEP:
                problems.append((rel, f"more than {MAX_FOLDERS_DEEP} folders down"))
            elif os.path.getsize(path) > MAX_FILE_BYTES:
                problems.append((rel, f"over {MAX_FILE_BYTES >> 20} MiB"))
            else:
                files.append(rel)
        dirnames[:] = [d for d in dirnames if not os.path.islink(os.path.join(dirpath, d))]
    rank = {n: i for i, n in enumerate(priority)}
    files.sort(key=lambda r: (rank.get(r, len(rank)), r))
    total = 0
    for i, rel in enumerate(files):
        size = os.path.getsize(os.path.join(out_dir, rel))
        if i >= MAX_FILES:
            problems.append((rel, f"more than {MAX_FILES} files"))
        elif total + size > MAX_TOTAL_BYTES:
            problems.append((rel, f"over {MAX_TOTAL_BYTES >> 20} MiB in all"))
        else:
            total += size
    return problems


def enforce_out_limits(out_dir: str, overflow_dir: str, priority: Sequence[str] = PRIORITY) -> List[tuple]:
    """Move everything :func:`out_problems` finds out of ``out_dir`` into ``overflow_dir`` (which goes
    into the logs tarball); returns what moved, with why. Empty folders left behind are removed."""
    problems = out_problems(out_dir, priority)
    moved = []
    for rel, why in problems:
        src = os.path.join(out_dir, rel)
        if not os.path.lexists(src):
            continue  # inside a folder already moved
        dst = os.path.join(overflow_dir, rel)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        if os.path.isdir(src) and not os.path.islink(src):
            shutil.move(src, dst)
        elif os.path.isfile(src) or os.path.islink(src):
            shutil.move(src, dst)
        else:
            os.remove(src)
        moved.append((rel, why))
    for dirpath, dirnames, filenames in sorted(os.walk(out_dir, topdown=False), key=lambda t: -len(t[0])):
        if dirpath != out_dir and not os.listdir(dirpath):
            os.rmdir(dirpath)
    return moved


def pack_folder(src_dir: str, tar_path: str, arc_root: str = "session", keep_bytes: int = LOG_KEEP_BYTES) -> str:
    """Write every file under ``src_dir`` into the gzip tarball ``tar_path`` (atomically: a ``.part``
    file renamed), files over ``keep_bytes`` as their head and tail; halves ``keep_bytes`` until the
    tarball is under 15 MiB."""
    while True:
        part = tar_path + ".part"
        with tarfile.open(part, "w:gz", compresslevel=6) as tar:
            for dirpath, dirnames, filenames in os.walk(src_dir):
                dirnames.sort()
                for name in sorted(filenames):
                    path = os.path.join(dirpath, name)
                    if not os.path.isfile(path) or os.path.islink(path):
                        continue
                    arc = os.path.join(arc_root, os.path.relpath(path, src_dir))
                    size = os.path.getsize(path)
                    if size <= keep_bytes:
                        try:
                            tar.add(path, arcname=arc, recursive=False)
                        except OSError:
                            pass
                        continue
                    half = keep_bytes // 2
                    with open(path, "rb") as f:
                        head = f.read(half)
                        f.seek(max(half, size - half))
                        tail = f.read(half)
                    data = head + (f"\n\n[... {size - len(head) - len(tail)} bytes cut by the GPU session's "
                                   f"packer ...]\n\n").encode() + tail
                    info = tarfile.TarInfo(arc)
                    info.size, info.mtime = len(data), int(time.time())
                    tar.addfile(info, io.BytesIO(data))
        if os.path.getsize(part) <= TAR_MAX_BYTES or keep_bytes <= 64 << 10:
            os.replace(part, tar_path)
            return tar_path
        keep_bytes //= 2


def log_tail(path: str, lines: int = 30, max_chars: int = 4000) -> str:
    """The last ``lines`` lines of a log (at most ``max_chars``)."""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 128 * 1024))
        text = f.read().decode("utf-8", "replace")
    return "\n".join(text.splitlines()[-lines:])[-max_chars:]


def write_atomic(path: str, text: str) -> None:
    tmp = path + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------ the session
class StageContext:
    """What a stage function gets: its time limit, its log, a way to run commands, the session."""

    def __init__(self, session: "Session", stage: Stage, timeout: float):
        self.session = session
        self.stage = stage
        self.timeout = timeout
        self.started = time.monotonic()
        self.deadline = self.started + timeout
        self.results: List[CmdResult] = []
        self.dry_run = session.dry_run
        self.root = session.root
        self.work = session.work
        self.out = session.out
        self.shared = session.shared

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def log(self, suffix: str = "") -> str:
        name = self.stage.name + (f"-{suffix}" if suffix else "") + ".log"
        return os.path.join(self.session.logs, name)

    def say(self, text: str, suffix: str = "") -> None:
        """Append a line of the session's own to the stage's log."""
        with open(self.log(suffix), "a", encoding="utf-8") as f:
            f.write(f"# {text}\n")

    def path(self, name: str) -> str:
        """A file in the session's work folder (it goes into logs.tar.gz)."""
        return os.path.join(self.work, name)

    def run(self, cmd: Sequence[str], *, suffix: str = "", timeout: Optional[float] = None, env=None, cwd=None,
            interrupt_first: bool = False) -> CmdResult:
        return self.run_parallel([dict(cmd=list(cmd), suffix=suffix, env=env, cwd=cwd,
                                       interrupt_first=interrupt_first)], timeout)[0]

    def run_parallel(self, jobs: Sequence[dict], timeout: Optional[float] = None) -> List[CmdResult]:
        """Run ``jobs`` (``cmd``, optional ``suffix`` of the log name, ``env``, ``cwd``, ``interrupt_first``)
        at once; at most ``timeout`` seconds (default: what is left of the stage's time)."""
        t = self.left() if timeout is None else min(timeout, self.left())
        full = [dict(job, log=self.log(job.get("suffix", "")), cwd=job.get("cwd") or self.root) for job in jobs]
        if self.session.registry.stopping:
            raise Interrupted()
        res = run_commands(full, max(t, 0.0), self.session.registry)
        self.results += res
        return res


class Session:
    """Run ``stages`` in order within ``budget_s`` seconds, writing ``summary.json``, ``summary.md`` and
    ``logs.tar.gz`` under ``out`` as it goes. ``render_md(summary) -> str`` makes summary.md."""

    def __init__(self, stages: Sequence[Stage], out: str, work: str, budget_s: float, *, dry_run: bool = False,
                 root: Optional[str] = None, command: str = "", reserve_s: float = 10.0, tick_s: float = 20.0,
                 render_md: Optional[Callable[[dict], str]] = None, stream=None, extra_out_priority=()):
        self.stages = list(stages)
        self.out = os.path.abspath(out)
        self.work = os.path.abspath(work)
        self.logs = os.path.join(self.work, "logs")
        self.budget_s = float(budget_s)
        self.reserve_s = float(reserve_s)
        self.dry_run = dry_run
        self.root = os.path.abspath(root or os.getcwd())
        self.render_md = render_md
        self.stream = stream or sys.stdout
        self.tick_s = tick_s
        self.registry = ProcessRegistry()
        self.shared: dict = {"out_priority": list(extra_out_priority)}
        self._lock = threading.RLock()
        self._threads: Dict[str, threading.Thread] = {}
        self._t0 = None
        os.makedirs(self.out, exist_ok=True)
        os.makedirs(self.logs, exist_ok=True)
        self.summary: dict = {
            "session": {"command": command, "dry_run": dry_run, "budget_s": self.budget_s, "root": self.root,
                        "out": self.out, "work": self.work, "started_utc": utc_now(), "updated_utc": None,
                        "elapsed_s": 0.0, "finished": False},
            "stages": {s.name: {"status": "pending", "seconds": None, "budget_s": None, "note": ""}
                       for s in self.stages},
            "device": None,
            "versions": None,
        }

    # ---- shared state
    def elapsed(self) -> float:
        return 0.0 if self._t0 is None else time.monotonic() - self._t0

    def set_top(self, key: str, value) -> None:
        with self._lock:
            self.summary[key] = value

    def print(self, text: str) -> None:
        with self._lock:
            print(text, file=self.stream, flush=True)

    # ---- files
    def priority(self) -> List[str]:
        return list(PRIORITY) + list(self.shared.get("out_priority", []))

    def save(self) -> None:
        """Rewrite summary.json and summary.md, re-pack the logs, enforce the output folder's limits."""
        with self._lock:
            s = self.summary["session"]
            s["updated_utc"] = utc_now()
            s["elapsed_s"] = round(self.elapsed(), 1)
            for name, rec in self.summary["stages"].items():
                if rec["status"] == "running" and rec.get("_t") is not None:
                    rec["seconds"] = round(time.monotonic() - rec["_t"], 1)
            moved = enforce_out_limits(self.out, os.path.join(self.work, "overflow"), self.priority())
            if moved:
                s.setdefault("moved_into_logs", []).extend(f"{rel}: {why}" for rel, why in moved)
            try:
                pack_folder(self.work, os.path.join(self.out, LOGS_TAR))
            except OSError as exc:
                s["pack_error"] = f"{type(exc).__name__}: {exc}"
            s["files"] = sorted(os.path.relpath(os.path.join(d, f), self.out)
                                for d, _, fs in os.walk(self.out) for f in fs if not f.endswith(".part"))
            for extra in ("summary.json", "summary.md"):
                if extra not in s["files"]:
                    s["files"].append(extra)
            clean = json.loads(json.dumps(self.summary, default=str))
            for rec in clean["stages"].values():
                rec.pop("_t", None)
            write_atomic(os.path.join(self.out, "summary.json"), json.dumps(clean, indent=1) + "\n")
            if self.render_md is not None:
                try:
                    md = self.render_md(clean)
                except Exception:  # never lose summary.json to a rendering bug
                    md = "# GPU session\n\nsummary.md could not be rendered:\n\n```\n" + traceback.format_exc() + "```\n"
                write_atomic(os.path.join(self.out, "summary.md"), md)

    # ---- stages
    def _usable(self) -> float:
        return max(0.0, self.budget_s - self.reserve_s)

    def _run_stage(self, i: int, timeout: float) -> None:
        st = self.stages[i]
        rec = self.summary["stages"][st.name]
        with self._lock:
            rec.update(status="running", budget_s=round(timeout), started_at_s=round(self.elapsed(), 1),
                       log=f"session/logs/{st.name}.log (in {LOGS_TAR})", _t=time.monotonic())
        self.print(f"[{self.elapsed():6.1f} s] {st.name}: started, {timeout:.0f} s"
                   + (" (in the background)" if st.background else ""))
        self.save()
        ctx = StageContext(self, st, timeout)
        try:
            fields = dict(st.fn(ctx) or {})
        except Interrupted:
            fields = {"status": "timeout", "note": "stopped from outside"}
        except Exception as exc:
            with open(ctx.log(), "a", encoding="utf-8") as f:
                f.write("\n# the stage raised:\n" + traceback.format_exc())
            fields = {"status": "failed", "note": f"the stage raised {type(exc).__name__}: {exc}"[:300]}
        if "status" not in fields:
            fields["status"] = worst_status([r.status for r in ctx.results]) if ctx.results else "ok"
        if self.registry.stopping and fields["status"] != "skipped":
            fields["status"] = "timeout"
            fields["note"] = ("stopped from outside; " + fields.get("note", "")).strip("; ")
        if fields["status"] not in STATUSES:
            fields = dict(fields, status="failed", note=f"unknown status {fields['status']!r}")
        if fields["status"] in ("failed", "timeout") and "log_tails" not in fields:
            logs = list(dict.fromkeys([r.log for r in ctx.results if r.status != "ok"] + [ctx.log()]))
            fields["log_tails"] = {f"session/logs/{os.path.basename(p)}": log_tail(p, 30)
                                   for p in logs[:3] if os.path.exists(p)}
        with self._lock:
            t = rec.pop("_t", None)
            rec.update(fields)
            rec["seconds"] = round(time.monotonic() - (ctx.started if t is None else t), 1)
            rec.setdefault("note", "")
        self.print(f"[{self.elapsed():6.1f} s] {st.name}: {rec['status']} ({rec['seconds']:.0f} s) {rec['note']}")
        self.save()

    def _skip(self, st: Stage, why: str) -> None:
        with self._lock:
            self.summary["stages"][st.name].update(status="skipped", seconds=0.0, budget_s=0, note=why)
        self.print(f"[{self.elapsed():6.1f} s] {st.name}: skipped: {why}")
        self.save()

    def _join(self, name: str) -> None:
        th = self._threads.pop(name, None)
        if th is not None:
            while th.is_alive():
                th.join(0.5)

    def _ticker(self, stop: threading.Event) -> None:
        while not stop.wait(self.tick_s):
            try:
                self.save()
            except Exception:
                pass

    def _on_signal(self, signum, frame):
        if self.registry.stopping:  # a second signal: the first one is being handled
            return
        self.shared["signal"] = signum
        self.registry.stop_all()
        raise Interrupted(signum)

    def run(self) -> int:
        """Run every stage; returns 0 when none failed or timed out, else 1."""
        self._t0 = time.monotonic()
        old_handlers = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                old_handlers[sig] = signal.signal(sig, self._on_signal)
        stop = threading.Event()
        ticker = threading.Thread(target=self._ticker, args=(stop,), daemon=True)
        ticker.start()
        self.save()
        try:
            for i, st in enumerate(self.stages):
                if self.registry.stopping:
                    raise Interrupted(self.shared.get("signal"))
                for other in self.stages[:i]:
                    if other.background and other.join_before == st.name:
                        self._join(other.name)
                remaining = self._usable() - self.elapsed()
                t = stage_timeout(remaining, st, self.stages[i + 1:], self._usable())
                if t is None:
                    self._skip(st, f"{max(remaining, 0):.0f} s of the budget left, the stage needs at least "
                                   f"{st.min_s:.0f} s")
                    continue
                if st.background:
                    th = threading.Thread(target=self._run_stage, args=(i, t), name=st.name, daemon=True)
                    self._threads[st.name] = th
                    th.start()
                else:
                    self._run_stage(i, t)
            for name in list(self._threads):
                self._join(name)
        except Interrupted as exc:
            with self._lock:
                for rec in self.summary["stages"].values():
                    if rec["status"] in ("running", "pending"):
                        t = rec.pop("_t", None)
                        rec.update(status="timeout" if rec["status"] == "running" else "skipped",
                                   seconds=None if t is None else round(time.monotonic() - t, 1),
                                   note=f"stopped from outside (signal {exc.args[0] if exc.args else '?'})")
        finally:
            stop.set()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            with self._lock:
                self.summary["session"]["finished"] = True
                self.summary["session"]["finished_utc"] = utc_now()
            self.save()
        bad = [n for n, r in self.summary["stages"].items() if r["status"] in ("failed", "timeout")]
        return 1 if bad else 0
