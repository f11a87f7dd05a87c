"""The CUDA kernels (``csrc/cuda/*.cu``) compiled for sm_90 as ``setup.py`` builds them, and their launches.

Compile: ``nvcc -cubin -arch=sm_90`` on each ``.cu`` with torch's nvcc flags (``COMMON_NVCC_FLAGS`` of
the cu130 venv's ``torch.utils.cpp_extension``, read as text), the defines ``BuildExtension`` adds,
``setup.py``'s ``NVCC_FLAGS`` (read with ``ast``), ``-std=c++17`` and ``-lineinfo`` (line tables only).
The cubins are cached under ``<cache>/cuda/<key>/``, the key hashing every ``csrc`` source, the flags,
the nvcc version and the venv's torch version.

Launches: the host code cannot run here, so :func:`launches` restates what the host functions in the
``.cu`` files pass (grid, block, dynamic shared memory, scalar arguments) for the calls the public API
makes (``reduction="mean"``, default options), with the logits at the labels' size or, with ``up`` > 1,
at 1/up of it (``upsample="bilinear"``, ``align_corners=False``: the fused kernels, kUp forwards and the banded
backwards' rows kernels and ``up_gather_kernel``, their launches per band merged into one each as
triton_side.coalesce merges Triton's). Parameter sizes are checked against the cubin's EIATTR_KPARAM_INFO, so a changed
kernel signature is an error here rather than a silently wrong model.
"""
from __future__ import annotations

import ast
import hashlib
import os
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

from . import tools
from .model import NotFused
from .sass import SassError
from .source import ROOT

__all__ = ["build", "CudaLaunch", "launches", "fuses_upsample", "NotFused", "PARAM_BASE", "cbank",
           "upsample_geom", "setup_nvcc_flags", "nvcc_command"]

PARAM_BASE = 0x210  # first kernel parameter in constant bank 0 on sm_90
THREADS = 256  # kThreads in csrc/cuda/common.cuh
DEFAULT_SMEM = 48 * 1024  # csrc/cuda/tree_min.cuh kDefaultSmem


def min_bwd_group_smem_bytes(V: int, D: int, threads: int, G: int) -> int:
    """csrc/cuda/tree_min.cuh min_bwd_group_smem_bytes for A = float and G lanes per thread: the node table
    (16 B per node), D + 1 depth slots of G floats and tree_bit_words(V) words of G uint32 per thread."""
    return 16 * V + 4 * G * (D + 1) * threads + 4 * G * (-(-V // 16)) * threads


def group_smem_bytes(L: int) -> int:
    """csrc/cuda/hierarchical_softmax.cu group_smem_bytes: the leaf-major group table, kMaxDepth = 8
    int32 per leaf."""
    return L * 8 * 4


def setup_nvcc_flags(root: Path = ROOT) -> List[str]:
    """``NVCC_FLAGS`` of setup.py, read without running it."""
    tree = ast.parse((root / "setup.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "NVCC_FLAGS" for t in node.targets):
            return [str(x) for x in ast.literal_eval(node.value)]
    raise SassError("setup.py has no module-level NVCC_FLAGS list")


def _site_packages(venv: Path) -> Path:
    found = sorted(venv.glob("lib/python3*/site-packages/torch"))
    if not found:
        raise tools.ToolMissing(f"no torch in {venv}")
    return found[-1].parent


def torch_nvcc_flags(venv: Path) -> List[str]:
    """``COMMON_NVCC_FLAGS`` of the venv's torch.utils.cpp_extension (a literal list, read as text)."""
    src = (_site_packages(venv) / "torch" / "utils" / "cpp_extension.py").read_text(encoding="utf-8")
    for node in ast.parse(src).body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "COMMON_NVCC_FLAGS"
                                                for t in node.targets):
            return [str(x) for x in ast.literal_eval(node.value)]
    raise SassError("torch.utils.cpp_extension has no COMMON_NVCC_FLAGS")


def torch_version(venv: Path) -> str:
    for d in _site_packages(venv).glob("torch-*.dist-info"):
        return d.name[len("torch-"):-len(".dist-info")]
    return "?"


def flags(venv: Path, root: Path = ROOT) -> List[str]:
    """Every nvcc flag but the include folders, the output and the source."""
    return (["-cubin", "-arch=sm_90"] + torch_nvcc_flags(venv)
            + ["-DHSS_WITH_CUDA=1", "-DTORCH_API_INCLUDE_EXTENSION_H", "-DTORCH_EXTENSION_NAME=_C"]
            + setup_nvcc_flags(root) + ["-std=c++17", "-lineinfo"])


def nvcc_command(source: Path, out: Path, venv: Path, root: Path = ROOT) -> List[str]:
    inc = _site_packages(venv) / "torch" / "include"
    includes = [inc, inc / "torch" / "csrc" / "api" / "include", tools.cuda_home() / "include",
                root / "csrc" / "include"]
    return [tools.nvcc()] + flags(venv, root) + ["-I" + str(i) for i in includes] + ["-o", str(out), str(source)]


def _sources(root: Path) -> List[Path]:
    return sorted((root / "csrc" / "cuda").glob("*.cu"))


def build(cache: Path, force: bool = False, jobs: int = 2, root: Path = ROOT,
          log=lambda msg: None) -> Dict[str, Tuple[bytes, str]]:
    """{source stem: (cubin, ptx)} for every ``csrc/cuda/*.cu``, from the cache when its key matches (the
    PTX, kept from the same nvcc run with ``-keep``, carries the correct line information)."""
    venv = tools.cuda_venv()
    sources = _sources(root)
    h = hashlib.sha256()
    for p in sorted((root / "csrc").rglob("*")):
        if p.suffix in (".h", ".cuh", ".cu", ".cpp") and p.is_file():
            h.update(p.relative_to(root).as_posix().encode())
            h.update(p.read_bytes())
    h.update(repr(flags(venv, root)).encode())
    h.update(tools.versions()["nvcc"].encode())
    h.update(torch_version(venv).encode())
    folder = cache / "cuda" / h.hexdigest()[:24]
    out: Dict[str, Tuple[bytes, str]] = {}
    todo = [s for s in sources if force or not (folder / f"{s.stem}.ptx").is_file()]
    if todo:
        folder.mkdir(parents=True, exist_ok=True)
        log(f"nvcc: compiling {', '.join(s.name for s in todo)} for sm_90 ({jobs} at a time)")

        def one(src: Path):
            with tempfile.TemporaryDirectory(prefix="hss-sm90-nvcc-") as tmp:
                cub = Path(tmp) / f"{src.stem}.cubin"
                cmd = nvcc_command(src.relative_to(root), cub, venv, root)
                cmd[1:1] = ["-keep", "-keep-dir", tmp]  # the PTX of the same compilation
                proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"nvcc failed on {src.name}:\n{proc.stderr[-4000:]}")
                for ext in ("cubin", "ptx"):  # the PTX last: it marks a complete entry
                    part = folder / f".{src.stem}.{os.getpid()}.{ext}"
                    part.write_bytes((Path(tmp) / f"{src.stem}.{ext}").read_bytes())
                    part.replace(folder / f"{src.stem}.{ext}")

        with ThreadPoolExecutor(max_workers=max(1, jobs)) as ex:
            list(ex.map(one, todo))
    for s in sources:
        out[s.stem] = ((folder / f"{s.stem}.cubin").read_bytes(), (folder / f"{s.stem}.ptx").read_text())
    return out


# ------------------------------------------------------------------------------------------ launches
@dataclass
class CudaLaunch:
    source: str  # stem of the .cu
    kernel: str  # unmangled name
    template: str  # mangled template arguments, e.g. "ff" or "N3c108BFloat16Ef"
    blocks: int
    threads: int
    params: List[object]  # per parameter: None (unknown: pointers), int, float (A = float), bool, tuple,
    #                       bytes (a struct packed by the model)
    scalars: Dict[str, float] = field(default_factory=dict)  # named values for trip expressions
    dynamic_smem: int = 0
    launches: int = 1  # launches of this kernel merged into this one (blocks: all of theirs), as triton_side.coalesce
    block_y: int = 1  # blockDim.y (threads: all of the block's, blockDim.x = threads / block_y)

    @property
    def pattern(self) -> str:
        return f"{self.kernel}I{self.template}E"


_DT = {"float32": ("f", 4), "bfloat16": ("N3c108BFloat16E", 2)}


def _geom(shape, strides):
    """PixelGeom {H, W, sN, sH, sW} of an (N, C, H, W) or (N, H, W) tensor (csrc/include/checks.h geom)."""
    if len(shape) == 4:
        return (shape[2], shape[3], strides[0], strides[2], strides[3])
    return (shape[1], shape[2], strides[0], strides[1], strides[2])


def _strides(shape, layout):
    N, C, H, W = shape
    if layout == "channels_last":
        return (H * W * C, 1, W * C, C)
    return (C * H * W, H * W, W, 1)


# The (op, pass) pairs whose CUDA kernels fuse the bilinear upsampling (launches(..., up > 1)).
FUSED_UPSAMPLE = {("hierarchical_softmax", "forward"), ("hierarchical_softmax", "backward"),
                  ("tree_min", "forward"), ("tree_min", "backward"), ("tree_bce", "forward"), ("tree_bce", "backward"),
                  ("decode", "forward")}


def fuses_upsample(op: str, pass_: str) -> bool:
    return (op, pass_) in FUSED_UPSAMPLE


def _axis(n_in: int, n_out: int, align_corners: bool) -> bytes:
    """csrc/include/common.h BilinearAxis<float> {int64 in; float scale; bool align_corners} (16 bytes)."""
    if align_corners:
        scale = (n_in - 1) / (n_out - 1) if n_out > 1 else 0.0
    else:
        scale = n_in / n_out
    return struct.pack("<qf?3x", n_in, scale, align_corners)


# csrc/include/common.h PixelWeights<float> {cw, pw, PixelGeom gw} without weights (checks.h pixel_weights of
# two absent tensors): null pointers and gw = {1, 1, 0, 0, 0}, as seven int64 (56 bytes).
NO_WEIGHTS = (0, 0, 1, 1, 0, 0, 0)
# The tree kernels with fused upsampling (tree_fwd_up_group_kernel, tree_up_rows_group_kernel and the backward's
# up_gather_kernel and the forward's finish_weighted_kernel they launch) are compiled from csrc/cuda/tree_min_up.cu,
# the others from tree_min.cu (op_source).
TREE_UP_SOURCE = "tree_min_up"
# The tree kernels' template flag kW (csrc/cuda/tree_min.cu, tree_min_up.cu with_weights): false for a call without weights, the
# instantiation with the weight code compiled out.
NO_KW = "Lb0E"


def upsample_geom(low_shape: Sequence[int], low_strides: Sequence[int], H: int, W: int,
                  align_corners: bool = False) -> bytes:
    """csrc/include/upsample_math.h UpsampleGeom<float>::make of (N, C, h, w) logits to (H, W): {h, w, H, W,
    sN, sh, sw} as int64, then the row and column BilinearAxis (88 bytes)."""
    _, _, h, w = low_shape
    return (struct.pack("<7q", h, w, H, W, low_strides[0], low_strides[2], low_strides[3])
            + _axis(h, H, align_corners) + _axis(w, W, align_corners))


UP_BWD_SCRATCH_BYTES = 32 << 20  # csrc/include/upsample_math.h kUpBwdScratchBytes
UP_SCRATCH_PAD = 8  # kUpScratchPad: the band scratch's rows padded to a multiple of it (up_scratch_width)
UP_GATHER_PIX, UP_GATHER_K = 32, 8  # csrc/cuda/upsample.cuh kUpGatherPix, kUpGatherK
UP_GATHER_CH_MAX = 10  # kUpGatherChMax
UP_GATHER_SMEM = 46 * 1024  # kUpGatherSmem


def up_gather_warps(C: int) -> int:
    """upsample.cuh up_gather_warps: the gather kernel's warps (blockDim.y), the fewest passes of at most
    UP_GATHER_CH_MAX warps of UP_GATHER_K channels over the C channels, then the fewest warps for them."""
    n = max(1, -(-C // UP_GATHER_K))
    passes = -(-n // UP_GATHER_CH_MAX)
    return -(-n // passes)


def up_gather_xw(w: int, W: int, acc_bytes: int = 4) -> int:
    """upsample.cuh up_gather_xw: the column table's width, the widest window of destination columns of a source
    column (0 if the table would pass UP_GATHER_SMEM)."""
    xw = max(hi - lo for lo, hi in (_up_window(w, W, j) for j in range(w)))
    return xw if xw * UP_GATHER_PIX * acc_bytes <= UP_GATHER_SMEM else 0


def _up_window(n_in: int, n_out: int, i: int) -> Tuple[int, int]:
    """UpsampleGeom::window (align_corners=False): the destination indices whose first source index is i - 1 or
    i (the model's float64 stand-in for the kernels' float32 axis)."""
    scale = n_in / n_out

    def first(o):
        return min(int(max(scale * (o + 0.5) - 0.5, 0.0)), n_in - 1)

    def first_after(t):
        lo, hi = 0, n_out
        while lo < hi:
            m = (lo + hi) // 2
            if first(m) > t:
                hi = m
            else:
                lo = m + 1
        return lo
    return first_after(i - 2), first_after(i)


def up_bands(N: int, C: int, h: int, H: int, W: int, acc_bytes: int, logit_bytes: int):
    """upsample_math.h up_band_rows and up_band_plan: (rows, [(Y0, Y1, I0, I1)], am) of the banded backward."""
    row = N * -(-W // UP_SCRATCH_PAD) * UP_SCRATCH_PAD * C * acc_bytes
    budget = min(UP_BWD_SCRATCH_BYTES, max(N * C * H * W * logit_bytes // 10, 1 << 20))
    rows = max(1, min(H, budget // row if row else H))
    win = [_up_window(h, H, i) for i in range(h)]

    def mine(r, Y0, Y1):
        lo, hi = win[r]
        if lo < hi:
            return lo < Y1 and hi > Y0
        return Y0 <= min(lo, H - 1) < Y1

    bands, am, i = [], 1, 0
    for Y0 in range(0, H, rows):
        Y1 = min(Y0 + rows, H)
        while i < h and not mine(i, Y0, Y1):
            i += 1
        e = i
        while e < h and mine(e, Y0, Y1):
            e += 1
        if e > i:
            bands.append((Y0, Y1, i, e))
            am = max(am, e - i)
    return rows, bands, am


def launches(op: str, pass_: str, dtype: str, layout: str, shape: Sequence[int], tree,
             gamma: float, up: int = 1) -> List[CudaLaunch]:
    """The kernel launches of one pass as the host code in ``csrc/cuda`` makes them. ``shape`` is
    (N, C, H, W) at the labels' size; ``up`` > 1: the logits are (N, C, H / up, W / up), fused bilinear
    upsampling (:class:`NotFused` for an op and pass whose kernels do not fuse it)."""
    N, C, H, W = shape
    if up > 1 and not fuses_upsample(op, pass_):
        raise NotFused(f"the CUDA {op} {pass_} does not fuse the upsampling")
    if up < 1 or H % up or W % up:
        raise ValueError(f"up = {up} must be a positive divisor of H = {H} and W = {W}")
    h, w = H // up, W // up
    P = N * H * W  # pixels of the labels (destination pixels)
    n = N * h * w  # pixels of the logits
    T, _ = _DT[dtype]
    A = "f"
    low = (N, C, h, w)
    xs = _strides(low, layout)
    gx, sC = _geom(low, xs), xs[1]
    gt = _geom((N, H, W), (H * W, W, 1))
    gg = (H, W, 0, 0, 0)  # grad_geom of the 0-dim grad_output of reduction="mean"
    nb = -(-P // THREADS)
    L, D, V = tree.num_leaves, tree.depth, tree.num_nodes
    eps, ignore = 0.0, 255
    # kUp: the UpsampleGeom argument is read (known constants); without it, passed but unread
    ug = upsample_geom(low, xs, H, W) if up > 1 else None
    kup = "Lb1E" if up > 1 else "Lb0E"
    sizes = {"H": H, "W": W, "h": h, "w": w, "n": n}

    def finish_weighted(blocks, source=None):  # common.cuh's: (part, cnt, wpart = null without class weights, nb,
        # loss_sum, count, weight_sum), one block, from the .cu of the launch before it (source; default the op's)
        return CudaLaunch(source or op_source(op), "finish_weighted_kernel", A, 1, THREADS,
                          [None, None, 0, blocks, None, None, None], {"nb": blocks})

    if op == "hierarchical_softmax":
        scalars = {"P": P, "L": L, "D": D, **sizes}

        _, size = _DT[dtype]
        lanes = 16 // size  # hierarchical_softmax.cu lanes_of<T>(): pixels per thread on the lanes path
        kw = "Lb0E"  # every kernel's kW: false, the instantiation of a call without weights
        if up == 1 and layout == "nchw" and D <= 4:  # vec_lanes(): contiguous planes, H*W % lanes == 0, aligned
            nbv = -(-(P // lanes) // THREADS)
            smem = 16 * L  # packed_smem_bytes: one int4 per leaf
            if pass_ == "forward":
                return [CudaLaunch("hierarchical_softmax", "hierarchical_softmax_fwd_lanes_kernel", T + A + kw, nbv,
                                   THREADS,
                                   [None, H * W, xs[0], sC, None, gt, P, L, D, None, None, eps, ignore, 0, None, None,
                                    None, NO_WEIGHTS, 0], {"P": P, "L": L, "D": D}, smem),
                        finish_weighted(nbv)]
            return [CudaLaunch("hierarchical_softmax", "hierarchical_softmax_bwd_lanes_kernel", T + A + kw, nbv,
                               THREADS,
                               [None, gg, None, None, H * W, xs[0], sC, None, gt, P, L, D, None, None, eps, ignore, None,
                                NO_WEIGHTS], {"P": P, "L": L, "D": D}, smem)]
        if up > 1 and D <= 4:
            # fused upsampling on the lanes: G = lanes destination pixels of a row per thread (gw groups per row),
            # each channel interpolated through UpLanes; the packed group table (any layout of the logits)
            gw = -(-W // lanes)
            if pass_ == "forward":
                ng = N * H * gw
                nbu = -(-ng // THREADS)
                return [CudaLaunch("hierarchical_softmax", "hierarchical_softmax_fwd_up_lanes_kernel", T + A + kw, nbu,
                                   THREADS,
                                   [None, sC, ug, None, gt, P, ng, gw, L, D, None, None, eps, ignore, 0, None, None,
                                    None, NO_WEIGHTS, 0], scalars, 16 * L), finish_weighted(nbu)]
            return up_bwd_launches(
                "hierarchical_softmax", "hierarchical_softmax_up_rows_lanes_kernel", T + A + kw, THREADS, 16 * L,
                low, xs, H, W, _DT[dtype][1],
                lambda rows, nq, ssn, ssc, ssy: [None, gg, None, sC, ug, 0, rows * gw, gw, nq, None, gt, P, L, D, None,
                                                 None, eps, ignore, None, None, ssn, ssc, ssy, NO_WEIGHTS], scalars, T,
                group=lanes)
        if pass_ == "forward":  # (with up > 1: trees deeper than 4, the one-pixel kUp kernel)
            return [CudaLaunch("hierarchical_softmax", "hierarchical_softmax_fwd_kernel", T + A + kup + kw, nb,
                               THREADS,
                               [None, gx, sC, None, gt, P, L, D, None, None, eps, ignore, 0, None, None, None, ug,
                                NO_WEIGHTS, 0], scalars, group_smem_bytes(L)), finish_weighted(nb)]
        if up > 1:  # banded (csrc/cuda/upsample.cuh): per band the one-pixel rows kernel (D > 4), then the gather
            return up_bwd_launches(
                "hierarchical_softmax", "hierarchical_softmax_up_rows_kernel", T + A + kw, THREADS,
                group_smem_bytes(L), low, xs, H, W, _DT[dtype][1],
                lambda rows, nq, ssn, ssc, ssy: [None, gg, None, sC, ug, 0, rows * W, nq, None, gt, P, L, D, None, None,
                                                 eps, ignore, None, None, ssn, ssc, ssy, NO_WEIGHTS], scalars, T)
        return [CudaLaunch("hierarchical_softmax", "hierarchical_softmax_bwd_kernel", T + A + kw, nb, THREADS,
                           [None, gg, None, None, gx, sC, None, gt, P, L, D, None, None, eps, ignore, None, NO_WEIGHTS],
                           scalars, group_smem_bytes(L))]
    if op in ("tree_min", "tree_bce"):
        extrema = op == "tree_min"
        scalars = {"P": P, "L": L, "D": D, "V": V, **sizes}
        if pass_ == "forward":
            if up > 1:
                # tree_fwd_up_group_kernel<T, A, kF, kExtrema, kW>: G = 16 / sizeof(T) destination pixels of a row
                # per thread (gw groups per row), each channel interpolated (UpLanes), the forward's shared memory
                G = 16 // _DT[dtype][1]
                kf = 2 if gamma == 2 else 1 if gamma == 0 else 0
                gw = -(-W // G)
                ng = N * H * gw
                nbu = -(-ng // THREADS)
                smem = 16 * V + ((D + 1) * THREADS * 4 * G if extrema else 0)
                return [CudaLaunch(TREE_UP_SOURCE, "tree_fwd_up_group_kernel",
                                   T + A + f"Li{kf}E" + ("Lb1E" if extrema else "Lb0E") + NO_KW, nbu, THREADS,
                                   [None, sC, ug, None, gt, ng, gw, None, V, L, D, None, gamma, eps, ignore, 0, None,
                                    None, NO_WEIGHTS, 0], scalars, smem), finish_weighted(nbu, TREE_UP_SOURCE)]
            # tree_fwd_group_kernel<T, A, kF, kExtrema, kVec, kW>: G = 16 / sizeof(T) pixels per thread, the focal
            # mode of the defaults (kFocalG2 = 2 for gamma 2, kFocalG0 = 1 for gamma 0; eps 0), kVec on NCHW
            # (vec_groups: H*W and the strides multiples of G, 16-byte aligned), kW false (no weights)
            G = 16 // _DT[dtype][1]
            kf = 2 if gamma == 2 else 1 if gamma == 0 else 0
            vec = "Lb1E" if layout != "channels_last" else "Lb0E"
            nbg = -(-(-(-P // G)) // THREADS)
            smem = 16 * V + ((D + 1) * THREADS * 4 * G if extrema else 0)
            return [CudaLaunch("tree_min", "tree_fwd_group_kernel",
                               T + A + f"Li{kf}E" + ("Lb1E" if extrema else "Lb0E") + vec + NO_KW, nbg, THREADS,
                               [None, gx, sC, None, gt, P, None, V, L, D, None, gamma, eps, ignore, 0, None, None,
                                NO_WEIGHTS, 0], scalars, smem), finish_weighted(nbg)]
        if up > 1:
            # banded (csrc/cuda/upsample.cuh): per band tree_up_rows_group_kernel<T, A, kF, kExtrema, kW> (G
            # destination pixels of a row per thread; the tree-min's depth slots and node bits as the group
            # backward's, fewer threads per block while that is over 48 KiB), then the gather
            G = 16 // _DT[dtype][1]
            kf = 2 if gamma == 2 else 1 if gamma == 0 else 0
            gw = -(-W // G)
            threads = THREADS
            while extrema and threads > 32 and min_bwd_group_smem_bytes(V, D, threads, G) > DEFAULT_SMEM:
                threads //= 2
            smem = min_bwd_group_smem_bytes(V, D, threads, G) if extrema else 16 * V
            return up_bwd_launches(
                TREE_UP_SOURCE, "tree_up_rows_group_kernel", T + A + f"Li{kf}E" + ("Lb1E" if extrema else "Lb0E") + NO_KW,
                threads, smem, low, xs, H, W, _DT[dtype][1],
                lambda rows, nq, ssn, ssc, ssy: [None, gg, None, sC, ug, 0, rows * gw, gw, nq, None, gt, None, V, L, D,
                                                 None, gamma, eps, ignore, None, ssn, ssc, ssy, NO_WEIGHTS], scalars, T,
                group=G)
        if not extrema:
            # tree_bce_bwd_group_kernel<T, A, kF, kVec, kW>: G pixels per thread as the forward, the node table only
            G = 16 // _DT[dtype][1]
            kf = 2 if gamma == 2 else 1 if gamma == 0 else 0
            vec = "Lb1E" if layout != "channels_last" else "Lb0E"
            return [CudaLaunch("tree_min", "tree_bce_bwd_group_kernel", T + A + f"Li{kf}E" + vec + NO_KW,
                               -(-(-(-P // G)) // THREADS), THREADS,
                               [None, gg, None, None, gx, sC, None, gt, P, None, V, L, D, None, gamma, eps, ignore,
                                NO_WEIGHTS], scalars, 16 * V)]
        # tree_min_bwd_group_kernel<T, A, kF, kVec, kW>: G pixels per thread as the tree BCE's, its depth slots and
        # node bits (G lanes each) in shared memory, fewer threads per block while that is over 48 KiB
        G = 16 // _DT[dtype][1]
        kf = 2 if gamma == 2 else 1 if gamma == 0 else 0
        vec = "Lb1E" if layout != "channels_last" else "Lb0E"
        mthreads = THREADS
        while mthreads > 32 and min_bwd_group_smem_bytes(V, D, mthreads, G) > DEFAULT_SMEM:
            mthreads //= 2
        return [CudaLaunch("tree_min", "tree_min_bwd_group_kernel", T + A + f"Li{kf}E" + vec + NO_KW,
                           -(-(-(-P // G)) // mthreads), mthreads,
                           [None, gg, None, None, gx, sC, None, gt, P, None, V, L, D, None, gamma, eps, ignore,
                            NO_WEIGHTS], scalars, min_bwd_group_smem_bytes(V, D, mthreads, G))]
    if op == "decode":
        # decode_cuda: decode_kernel<scalar_t, kAct, kOrdered, kMean, kUp>, kAct 0 (sigmoid), kOrdered when the
        # leaf ids increase along the pre-order (tables.decode_walk), kMean false (score="sum"), kUp with size=
        # (one thread per label pixel, HW and W the labels', the strides the low-resolution logits'); the walk
        # in static shared memory
        leaves = [tree.channel_labels[c] for c in tree.dfs_order if tree.channel_labels[c] >= 0]
        ordered = "Lb1E" if leaves == sorted(leaves) else "Lb0E"
        if up == 1 and layout == "nchw":
            # decode_lanes_kernel<scalar_t, kAct, kOrdered, kMean>: V = 16 / sizeof(T) pixels per thread,
            # 128 threads per block (kLaneThreads), on the layouts decode_math::lanes_layout accepts
            # (contiguous planes, H*W and the strides multiples of V, 16-byte aligned); static shared memory
            lanes = 16 // _DT[dtype][1]
            groups = P // lanes
            return [CudaLaunch("decode", "decode_lanes_kernel", T + "Li0E" + ordered + "Lb0E", -(-groups // 128),
                               128, [None, None, None, groups, H * W, C, xs[0], xs[1], ignore],
                               {"P": P, "C": C, "L": L, "D": D, **sizes})]
        if up > 1 and dtype != "float64":
            # decode_up_lanes_kernel<scalar_t, kAct, kOrdered, kMean>: G = 16 / sizeof(T) destination pixels of a
            # row per thread (gw groups per row), each channel of the G interpolated (UpLanes), 128 threads per
            # block (kLaneThreads); the logits' strides only through sC (any layout)
            G = 16 // _DT[dtype][1]
            gw = -(-W // G)
            ng = N * H * gw
            return [CudaLaunch("decode", "decode_up_lanes_kernel", T + "Li0E" + ordered + "Lb0E", -(-ng // 128), 128,
                               [None, None, None, ng, gw, C, xs[1], ignore, ug],
                               {"P": P, "C": C, "L": L, "D": D, **sizes})]
        return [CudaLaunch("decode", "decode_kernel", T + "Li0E" + ordered + "Lb0E" + kup, nb, THREADS,
                           [None, None, None, P, H * W, W, C, xs[0], xs[1], xs[2], xs[3], ignore, ug],
                           {"P": P, "C": C, "L": L, "D": D, **sizes})]
    raise ValueError(op)


def up_bwd_launches(source: str, rows_kernel: str, template: str, threads: int, smem: int, low, xs, H: int, W: int,
                    logit_bytes: int, rows_params, scalars: Dict[str, float], T: str,
                    group: int = 1) -> List[CudaLaunch]:
    """The banded upsampled backward (upsample.cuh up_backward_bands): per band, the op's rows kernel over the
    band's destination pixels (``group`` of a row per thread) and up_gather_kernel over its source pixels; the
    launches of each kernel merged into one (blocks summed, ``launches`` their number: the same compiled code, the
    count per thread unchanged but for the last band's size). rows_params(rows, nq, ssn, ssc, ssy): the rows
    kernel's parameters for a full band (nq threads; the scratch [N, C, rows, Wp]'s strides)."""
    N, C, h, w = low
    ug = upsample_geom(low, xs, H, W)
    rows, bands, am = up_bands(N, C, h, H, W, 4, logit_bytes)
    wp = -(-W // UP_SCRATCH_PAD) * UP_SCRATCH_PAD
    ssc = rows * wp
    ssn = C * ssc
    per_row = -(-W // group)
    rb = sum(-(-(N * (Y1 - Y0) * per_row) // threads) for Y0, Y1, _, _ in bands)
    gb = sum(-(-(N * (I1 - I0) * w) // UP_GATHER_PIX) for _, _, I0, I1 in bands)
    bw = max(I1 - I0 for _, _, I0, I1 in bands) * w
    ch, xw = up_gather_warps(C), up_gather_xw(w, W)
    sc = {**scalars, "ROWS": rows, "bands": len(bands), "CH": ch, "XW": xw}
    return [CudaLaunch(source, rows_kernel, template, rb, threads, rows_params(rows, N * rows * per_row, ssn, ssc, wp),
                       sc, smem, len(bands)),
            CudaLaunch(source, "up_gather_kernel", T + "f", gb, UP_GATHER_PIX * ch,
                       [None, None, None, ug, 0, rows, 0, N * bw, bw, C, ssn, ssc, wp, am, xs[0], xs[1], xs[2], xs[3],
                        xw], sc, xw * UP_GATHER_PIX * 4, len(bands), ch)]


def op_source(op: str) -> str:
    return {"hierarchical_softmax": "hierarchical_softmax", "tree_min": "tree_min", "tree_bce": "tree_min",
            "decode": "decode"}[op]


def cbank(launch: CudaLaunch, layout: List[Tuple[int, int, int]]) -> Dict[int, int]:
    """Known bytes of constant bank 0 for a launch: blockDim at 0x0 and the parameters at PARAM_BASE,
    placed by the cubin's parameter layout [(ordinal, offset, size)]."""
    if len(layout) != len(launch.params):
        raise SassError(f"{launch.kernel}: the cubin has {len(layout)} parameters, the model passes "
                        f"{len(launch.params)}: update benchmarks/sm90/cuda_side.py to the kernel's signature")
    out: Dict[int, int] = {}

    def put(off: int, data: bytes):
        for k, b in enumerate(data):
            out[off + k] = b

    put(0x0, struct.pack("<III", launch.threads // launch.block_y, launch.block_y, 1))
    for (ordinal, off, size), value in zip(layout, launch.params):
        where = PARAM_BASE + off
        if value is None:
            continue
        if isinstance(value, bytes):  # a struct, packed by the model
            ok, data = size == len(value), value
        elif isinstance(value, bool):
            ok, data = size == 1, bytes([int(value)])
        elif isinstance(value, float):
            ok, data = size == 4, struct.pack("<f", value)
        elif isinstance(value, tuple):
            ok, data = size == 8 * len(value), b"".join(struct.pack("<q", v) for v in value)
        else:
            ok, data = size in (4, 8), int(value).to_bytes(size, "little", signed=True) if size in (4, 8) else b""
        if not ok:
            raise SassError(f"{launch.kernel}: parameter {ordinal} is {size} bytes in the cubin but the model passes "
                            f"{value!r}: update benchmarks/sm90/cuda_side.py to the kernel's signature")
        put(where, data)
        if size == 1:  # padding after a bool: assume zeros
            for k in range(1, 4):
                out.setdefault(where + k, 0)
    return out
