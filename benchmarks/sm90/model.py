"""Rows of the static model: one per op × backend × dtype × pass × layout × upsampling factor."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from . import elf, sass, source, tools
from .sass import SassError

__all__ = ["ASSUMPTIONS", "OPS", "BACKENDS", "DTYPES", "PASSES", "LAYOUTS", "UPSAMPLE", "SHAPE", "Row", "Context",
           "NotFused", "floor_bytes", "floor_formula", "selection"]

# An H100 SXM: what issue_ms and floor_ms assume.
ASSUMPTIONS = {
    "gpu": "H100 SXM (sm_90)",
    "clock_ghz": 1.755,
    "sms": 132,
    "warp_instructions_per_clock_per_sm": 4,
    # The special-function unit (MUFU: ex2, lg2, rcp, rsq, sin, cos): 16 results per clock per SM.
    "mufu_warp_instructions_per_clock_per_sm": 0.5,
    "bandwidth_tb_s": 3.0,
}
SHAPE = (8, 1024, 1024)  # B, H, W: the labels; the logits too at upsampling factor 1
# Upsampling factors: 1, logits at the labels' size; s > 1, logits (B, C, H / s, W / s) and
# upsample="bilinear" (align_corners=False), the rows of the kernels that fuse it.
UPSAMPLE = (1, 4, 8)
OPS = {  # op -> (tree, channels: "leaves" | "nodes")
    "hierarchical_softmax": ("vistas", "leaves"),
    "tree_min": ("vistas_v2", "nodes"),
    "tree_bce": ("vistas_v2", "nodes"),
    "decode": ("vistas_v2", "nodes"),
}
BACKENDS = ("triton", "cuda")
DTYPES = {"float32": 4, "bfloat16": 2}
PASSES = ("forward", "backward")
LAYOUTS = ("nchw", "channels_last")
GAMMA = {"tree_min": 2.0, "tree_bce": 0.0}  # the public API's defaults
LABEL_BYTES = 8  # int64 labels
WEIGHTS = ("none", "class", "pixel", "class+pixel")  # --weights: what the loss rows pass (Triton rows only)
PIXEL_WEIGHT_BYTES = 4  # a float32 pixel_weight, read once per pixel by each pass

FLOOR_FORMULAS = {
    ("hierarchical_softmax", "forward"): "P·C·b (logits) + 8·P (labels) + 4·(D+1)·P (saved statistics, written)",
    ("hierarchical_softmax", "backward"): "P·C·b (logits) + 8·P (labels) + 4·(D+1)·P (statistics) + P·C·b "
                                          "(gradient, written)",
    ("tree_min", "forward"): "P·C·b (logits) + 8·P (labels)",
    ("tree_min", "backward"): "P·C·b (logits) + 8·P (labels) + P·C·b (gradient, written)",
    ("tree_bce", "forward"): "P·C·b (logits) + 8·P (labels)",
    ("tree_bce", "backward"): "P·C·b (logits) + 8·P (labels) + P·C·b (gradient, written)",
    ("decode", "forward"): "P·C·b (logits) + 8·P (int64 labels, written)",
}

# With fused upsampling (docs/MATH.md §6.5): the logits and their gradient at the low resolution, p = P / s²
# pixels; the labels, the statistics and decode's output at the labels' P pixels.
UP_FLOOR_FORMULAS = {
    ("hierarchical_softmax", "forward"): "p·C·b (low-resolution logits) + 8·P (labels) + 4·(D+1)·P (saved statistics, "
                                         "written)",
    ("hierarchical_softmax", "backward"): "p·C·b (low-resolution logits) + 8·P (labels) + 4·(D+1)·P (statistics) + "
                                          "p·C·b (low-resolution gradient, written)",
    ("tree_min", "forward"): "p·C·b (low-resolution logits) + 8·P (labels)",
    ("tree_min", "backward"): "p·C·b (low-resolution logits) + 8·P (labels) + p·C·b (low-resolution gradient, "
                              "written)",
    ("tree_bce", "forward"): "p·C·b (low-resolution logits) + 8·P (labels)",
    ("tree_bce", "backward"): "p·C·b (low-resolution logits) + 8·P (labels) + p·C·b (low-resolution gradient, "
                              "written)",
    ("decode", "forward"): "p·C·b (low-resolution logits) + 8·P (int64 labels, written)",
}


class NotFused(ValueError):
    """An upsampled row (factor > 1) of a backend's op and pass that does not fuse the upsampling."""


def floor_formula(op: str, pass_: str, up: int = 1, weights: str = "none") -> str:
    formula = (UP_FLOOR_FORMULAS if up > 1 else FLOOR_FORMULAS)[(op, pass_)]
    if "pixel" in weights and op != "decode":
        formula += " + 4·P (float32 pixel weights)"
    return formula


def floor_bytes(op: str, pass_: str, P: int, C: int, b: int, D: int, up: int = 1, weights: str = "none") -> int:
    """The bytes a pass must move (docs/MATH.md §5.6, §6.5, §6.6) for P pixels of labels and logits at 1/up
    of their size in each axis (P / up² pixels), and a float32 pixel weight per pixel when ``weights`` has
    one; the loss partials and the class weights' table are negligible and not counted."""
    logits = P // (up * up) * C * b
    if op == "decode":
        return logits + LABEL_BYTES * P
    moved = logits + LABEL_BYTES * P
    if "pixel" in weights:
        moved += PIXEL_WEIGHT_BYTES * P
    if op == "hierarchical_softmax":
        moved += 4 * (D + 1) * P
    if pass_ == "backward":
        moved += logits
    return moved


def target_ratio(op: str) -> float:
    """Issue 13's bound on issue ms / floor ms: 0.8, and 1.0 for the focal tree-min, which needs a few
    special-function operations per element (its MUFU ms must stay within the floor too, as every row's)."""
    return 1.0 if op == "tree_min" else 0.8


def issue_ms(warp_instructions: float) -> float:
    a = ASSUMPTIONS
    return warp_instructions / (a["warp_instructions_per_clock_per_sm"] * a["sms"] * a["clock_ghz"] * 1e9) * 1e3


def mufu_ms(warp_instructions: float) -> float:
    """The time the special-function unit alone needs for ``warp_instructions`` MUFU instructions: a
    second compute bound beside :func:`issue_ms` (a kernel may issue few instructions in all yet queue
    on the 16-lane unit)."""
    a = ASSUMPTIONS
    return warp_instructions / (a["mufu_warp_instructions_per_clock_per_sm"] * a["sms"] * a["clock_ghz"] * 1e9) * 1e3


def floor_ms(nbytes: float) -> float:
    return nbytes / (ASSUMPTIONS["bandwidth_tb_s"] * 1e12) * 1e3


@dataclass
class Kernel:
    """One launch of a pass, as counted."""
    name: str
    instructions: float  # per thread
    threads: int
    warps: int
    analysis: sass.Analysis
    resources: Dict[str, int]
    dynamic_shared: int
    launch: Dict[str, object] = field(default_factory=dict)

    @property
    def mufu(self) -> float:
        """MUFU instructions per thread (from the analysis' per-instruction executions)."""
        return self.analysis.mufu


@dataclass
class Row:
    op: str
    backend: str
    dtype: str
    pass_: str
    layout: str
    kernels: List[Kernel]
    P: int
    C: int
    floor_bytes: int
    formula: str
    names: Callable = None
    up: int = 1
    weights: str = "none"

    def as_dict(self) -> dict:
        main = self.kernels[0]
        res = main.resources
        warp_instructions = sum(k.instructions * k.warps for k in self.kernels)
        thread_slots = sum(k.instructions * k.threads for k in self.kernels)
        iss, flo = issue_ms(warp_instructions), floor_ms(self.floor_bytes)
        mufu = mufu_ms(sum(k.mufu * k.warps for k in self.kernels))
        spill = res.get("STACK", 0) + res.get("LOCAL", 0)
        name = self.names or (lambda loc: f"{loc[0]}:{loc[1]}")
        out = {
            "op": self.op, "backend": self.backend, "dtype": self.dtype, "pass": self.pass_, "layout": self.layout,
            "upsample": self.up,
            **({"weights": self.weights} if self.weights != "none" else {}),
            "registers": res.get("REG"),
            "spill_bytes": spill,
            "shared_bytes": res.get("SHARED", 0) + main.dynamic_shared,
            "global_load_bits": main.analysis.load_bits,
            "sass_per_element": thread_slots / (self.P * self.C),  # per label pixel × channel
            "issue_ms": iss,
            "floor_ms": flo,
            "mufu_ms": mufu,
            # extras
            "ratio": iss / flo,
            "issue_bound": iss > flo,
            "meets_targets": (iss <= target_ratio(self.op) * flo and mufu <= flo and spill == 0
                              and main.analysis.load_bits == 128),
            "kernel": main.name,
            "warp_instructions": warp_instructions,
            "instructions_per_thread": main.instructions,
            "threads": main.threads,
            "floor_bytes": self.floor_bytes,
            "floor_formula": self.formula,
            "loops": [{"line": name(l.source) if l.source else None,
                       "inlined_at": [name(c) for c in l.inlined_at],
                       "sass": f"{l.header_addr:04x}-{l.end_addr:04x}",
                       "trips": l.trips, "source_trips": l.source_trips, "unroll": l.unroll, "depth": l.depth,
                       "body": round(l.body, 1), "per_thread": round(l.total, 1)} for l in main.analysis.loops],
            "cold": [{**c, "line": name(c["line"])} for c in main.analysis.cold],
            "slow_paths_not_counted": main.analysis.calls,
            "logits_load_widths": main.analysis.load_widths,
            "warnings": [w for k in self.kernels for w in k.analysis.warnings],
            "kernels": [{"kernel": k.name, "instructions_per_thread": k.instructions, "threads": k.threads,
                         "warps": k.warps, "registers": k.resources.get("REG"),
                         "spill_bytes": k.resources.get("STACK", 0) + k.resources.get("LOCAL", 0),
                         "static_shared_bytes": k.resources.get("SHARED", 0), "dynamic_shared_bytes": k.dynamic_shared,
                         "static_instructions": k.analysis.static_instructions,
                         "reachable_instructions": k.analysis.reached_instructions,
                         "launch": k.launch} for k in self.kernels],
        }
        return out


class Context:
    """What the rows share: annotations, trees, caches of compiled and parsed code."""

    def __init__(self, cache: Path, force: bool = False, unannotated: str = "error", jobs: int = 2,
                 log: Callable[[str], None] = print, listing_dir: Optional[Path] = None, weights: str = "none"):
        self.cache, self.force, self.unannotated, self.jobs, self.log = cache, force, unannotated, jobs, log
        self.weights = weights  # the loss rows' class_weight / pixel_weight (WEIGHTS; Triton rows only)
        self.listing_dir = listing_dir
        self.annotations = source.Annotations()
        self._cuda: Optional[Dict[str, tuple]] = None
        self._trees: Dict[str, object] = {}
        self.seconds: Dict[str, float] = {"triton_compile": 0.0, "cuda_compile": 0.0, "analysis": 0.0}
        self.repairs: Dict[str, Tuple[int, int]] = {}

    def tree(self, name: str):
        if name not in self._trees:
            from hss_kernels import trees
            self._trees[name] = trees.load(name)
        return self._trees[name]

    def _repair(self, fn: sass.Function, valid) -> None:
        fixed, unresolved = sass.repair_lines(fn, valid, self.annotations.relpath) if valid else (0, 0)
        self.repairs[fn.name] = (fixed, unresolved)

    def analyze(self, fn: sass.Function, variables: Dict[str, float], cbank=None, tag: str = "") -> sass.Analysis:
        t0 = time.time()
        A = self.annotations
        an = sass.analyze(fn, A, lambda expr, loc: source.evaluate(expr, variables, A.name(loc)), cbank,
                          self.unannotated)
        if self.listing_dir is not None:
            self.listing_dir.mkdir(parents=True, exist_ok=True)
            (self.listing_dir / f"{tag}.sass.txt").write_text(sass.listing(fn, an, A.name))
        self.seconds["analysis"] += time.time() - t0
        return an

    # ------------------------------------------------------------------------------- Triton
    def triton_row(self, op: str, dtype: str, pass_: str, layout: str, up: int = 1) -> Row:
        import torch

        from . import triton_side

        tree_name, _ = OPS[op]
        tree = self.tree(tree_name)
        C = tree.num_leaves if OPS[op][1] == "leaves" else tree.num_nodes
        B, H, W = SHAPE
        x = torch.empty((B, C, H // up, W // up), dtype=getattr(torch, dtype), device="meta")
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        t = torch.empty((B, H, W), dtype=torch.int64, device="meta")
        kernels = []
        weights = self.weights if op != "decode" else "none"
        for i, launch in enumerate(triton_side.record(op, pass_, x, t, tree, upsample=up > 1, weights=weights)):
            t0 = time.time()
            comp = triton_side.compile_launch(launch, self.cache / "triton", self.force)
            self.seconds["triton_compile"] += time.time() - t0
            fns = sass.parse(tools.disassemble(comp.cubin))
            if comp.name not in fns:
                raise SassError(f"{comp.name} is not in its own cubin's disassembly")
            self._repair(fns[comp.name], sass.ptx_lines(comp.ptx).get(comp.name, set()))
            variables = dict(source.tree_variables(tree))
            variables.update({"H": H, "W": W, "h": H // up, "w": W // up})
            variables.update({k: v for k, v in launch.constexprs.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)})
            variables["C"] = C
            an = self.analyze(fns[comp.name], variables, None, _tag("triton", op, dtype, pass_, layout, up, i))
            res = tools.resources(comp.cubin).get(comp.name, {})
            threads = comp.num_warps * 32 * launch.programs
            kernels.append(Kernel(comp.name, an.instructions, threads, threads // 32, an, res, comp.shared,
                                  {"grid": list(launch.grid), "num_warps": comp.num_warps, **launch.describe()}))
        return self._row(op, "triton", dtype, pass_, layout, kernels, tree, C, up, weights)

    # --------------------------------------------------------------------------------- CUDA
    def _cuda_code(self) -> Dict[str, "CudaObject"]:
        if self._cuda is None:
            from . import cuda_side
            t0 = time.time()
            cubins = cuda_side.build(self.cache, self.force, self.jobs, log=self.log)
            self.seconds["cuda_compile"] += time.time() - t0
            self._cuda = {stem: CudaObject(cub, ptx, self._repair) for stem, (cub, ptx) in cubins.items()}
        return self._cuda

    def _cuda_launches(self, op: str, dtype: str, pass_: str, layout: str, up: int):
        from . import cuda_side

        tree = self.tree(OPS[op][0])
        C = tree.num_leaves if OPS[op][1] == "leaves" else tree.num_nodes
        B, H, W = SHAPE
        if up > 1 and not cuda_side.fuses_upsample(op, pass_):  # before compiling anything
            raise NotFused(f"the CUDA {op} {pass_} does not fuse the upsampling")
        return tree, C, cuda_side.launches(op, pass_, dtype, layout, (B, C, H, W), tree, GAMMA.get(op, 0.0), up)

    def prefetch_cuda(self, rows: Sequence[Tuple[str, str, str, str, str, int]]) -> None:
        """Disassembles the kernels of every CUDA row of ``rows`` (selection()'s tuples) with one nvdisasm
        run per cubin; a row whose launches cannot be worked out is left to :meth:`cuda_row` to report."""
        wanted: Dict[str, set] = {}
        for op, backend, dtype, pass_, layout, up in rows:
            if backend != "cuda":
                continue
            try:
                _, _, launches = self._cuda_launches(op, dtype, pass_, layout, up)
            except (NotFused, SassError):
                continue
            for launch in launches:
                wanted.setdefault(launch.source, set()).add(launch.pattern)
        if not wanted:
            return
        code = self._cuda_code()
        for stem, patterns in wanted.items():
            if stem in code:
                code[stem].functions([n for pat in patterns for n in code[stem].matching(pat)])

    def cuda_row(self, op: str, dtype: str, pass_: str, layout: str, up: int = 1) -> Row:
        from . import cuda_side

        tree, C, launches = self._cuda_launches(op, dtype, pass_, layout, up)
        code = self._cuda_code()
        kernels = []
        for i, launch in enumerate(launches):
            obj = code[launch.source]
            names = obj.matching(launch.pattern)
            if len(names) != 1:
                raise SassError(f"{launch.source}.cu: {len(names)} kernels match {launch.pattern!r}: {names}")
            name = names[0]
            fns, res, kp = obj.functions([name]), obj.resources, obj.kparams
            variables = dict(source.tree_variables(tree))
            variables.update(launch.scalars)
            variables.update({"threads": launch.threads, "C": C})
            an = self.analyze(fns[name], variables, cuda_side.cbank(launch, kp.get(name, [])),
                              _tag("cuda", op, dtype, pass_, layout, up, i))
            threads = launch.blocks * launch.threads
            kernels.append(Kernel(name, an.instructions, threads, threads // 32, an, res.get(name, {}),
                                  launch.dynamic_smem, {"grid": [launch.blocks], "block": [launch.threads],
                                                        "dynamic_shared": launch.dynamic_smem,
                                                        "scalars": launch.scalars,
                                                        **({"launches": launch.launches}
                                                           if launch.launches > 1 else {})}))
        return self._row(op, "cuda", dtype, pass_, layout, kernels, tree, C, up)

    def _row(self, op, backend, dtype, pass_, layout, kernels, tree, C, up=1, weights="none") -> Row:
        B, H, W = SHAPE
        P = B * H * W
        nbytes = floor_bytes(op, pass_, P, C, DTYPES[dtype], tree.depth, up, weights)
        return Row(op, backend, dtype, pass_, layout, kernels, P, C, nbytes, floor_formula(op, pass_, up, weights),
                   self.annotations.name, up, weights)


class CudaObject:
    """One ``csrc/cuda/*.cu`` compiled: its kernels' names, parameter layouts (the ELF) and resources
    (``cuobjdump --dump-resource-usage``) up front, their SASS on demand: ``nvdisasm -fun`` on the kernels
    asked for, so that a row reads the few it launches out of a cubin of hundreds of instantiations."""

    def __init__(self, cubin: bytes, ptx: str, repair: Callable[[sass.Function, set], None]):
        self.cubin, self._ptx, self._repair = cubin, ptx, repair
        self.symbols = elf.functions(cubin)
        self.kparams = elf.kparams(cubin)  # only kernels have parameters
        self.resources = tools.resources(cubin, cuda=True)
        self._fns: Dict[str, sass.Function] = {}
        self._lines: Optional[Dict[str, set]] = None

    def matching(self, pattern: str) -> List[str]:
        """The functions (kernels) whose mangled names contain ``pattern``."""
        return [n for n in self.symbols if pattern in n]

    def functions(self, names: Sequence[str]) -> Dict[str, sass.Function]:
        """{name: parsed function} for ``names``, disassembling (one nvdisasm run) those not seen yet."""
        todo = sorted({n for n in names if n not in self._fns})
        if todo:
            missing = [n for n in todo if n not in self.symbols]
            if missing:
                raise SassError(f"no symbol for {missing} in the cubin")
            fns = sass.parse(tools.disassemble(self.cubin, cuda=True, functions=[self.symbols[n] for n in todo]))
            if self._lines is None:
                self._lines = sass.ptx_lines(self._ptx)
            for n in todo:
                if n not in fns:
                    raise SassError(f"{n} is not in its disassembly")
                self._repair(fns[n], self._lines.get(n, set()))
                self._fns[n] = fns[n]
        return {n: self._fns[n] for n in names}


def _tag(backend, op, dtype, pass_, layout, up, i) -> str:
    """The --listing file stem of a kernel."""
    return f"{backend}-{op}-{dtype}-{pass_}-{layout}" + (f"-up{up}" if up > 1 else "") + f"-{i}"


def selection(ops: Sequence[str], backends: Sequence[str], dtypes: Sequence[str], passes: Sequence[str],
              layouts: Sequence[str], ups: Sequence[int] = (1,)) -> List[Tuple[str, str, str, str, str, int]]:
    """(op, backend, dtype, pass, layout, upsampling factor) of every row asked for, those whose kernels do
    not fuse an upsampling included (:class:`NotFused` tells them apart when they are modelled)."""
    out = []
    for up in ups:
        for op in ops:
            for backend in backends:
                for dtype in dtypes:
                    for pass_ in passes:
                        if op == "decode" and pass_ != "forward":
                            continue
                        for layout in layouts:
                            out.append((op, backend, dtype, pass_, layout, up))
    return out
