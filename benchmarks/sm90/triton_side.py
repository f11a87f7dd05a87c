"""The Triton kernels as the runtime compiles them for an sm_90 GPU, without a GPU.

The launch code itself runs: the registry's op (``hss_kernels.triton.OPS``) is called on ``meta``
tensors of the real shape, strides and dtype, with ``_common.launch`` replaced by a recorder and
``_common.interpreted`` answering False (GPU tile sizes); the ``hss_triton`` custom ops run their Python
bodies directly, and a backward is the op's registered autograd backward replayed on the forward's
outputs. Each recorded launch is then compiled the way ``JITFunction.run`` does on a GPU: the call is
bound with the JIT's own binder (pointer and integer divisibility by 16, integers equal to 1 as
constants: the runtime's specialisation), with small CPU tensors standing in for the meta ones (their
data pointers 64-byte aligned like a CUDA allocation, offset as the meta tensor's storage offset says).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

__all__ = ["Launch", "record", "record_call", "coalesce", "compile_launch", "Compiled", "OP_KEYS", "fuses_upsample"]

# Row op name -> the Triton registry's op name.
OP_KEYS = {"hierarchical_softmax": "hierarchical_softmax_loss", "tree_min": "tree_min_loss",
           "tree_bce": "tree_bce_loss", "decode": "decode"}


@dataclass
class Launch:
    kernel: Any  # the JITFunction
    grid: Tuple[int, ...]
    args: Tuple[Any, ...]
    kwargs: Dict[str, Any]
    launches: int = 1  # launches of the same compiled kernel merged into this one by coalesce (grid: all programs)

    @property
    def programs(self) -> int:
        n = 1
        for g in self.grid:
            n *= int(g)
        return n

    @property
    def constexprs(self) -> Dict[str, Any]:
        names = [p.name for p in self.kernel.params]
        out = {}
        for p in self.kernel.params:
            if p.is_constexpr and p.name in self.kwargs:
                out[p.name] = self.kwargs[p.name]
        for i, a in enumerate(self.args):
            if self.kernel.params[i].is_constexpr:
                out[names[i]] = a
        return out

    def describe(self) -> Dict[str, Any]:
        """The launch's scalar arguments and constexprs, for the report."""
        out = {}
        for p, a in zip(self.kernel.params, self.args):
            if isinstance(a, (int, float, bool)):
                out[p.name] = a
        for k, v in self.kwargs.items():
            out[k] = v if isinstance(v, (int, float, bool, str)) else str(v)
        if self.launches > 1:
            out["launches"] = self.launches
        return out


def coalesce(launches: List[Launch]) -> List[Launch]:
    """Launches of one kernel with the same constexprs (the same compiled code: e.g. the upsampled tree-min
    backward's two kernels once per band of rows) as one launch over all their programs (a 1-D grid of their
    sum, ``launches`` their number), in the order of their first launch; the others as they are. The model's
    count per thread depends on the compiled code and the constexprs only, so the total is unchanged."""
    out: List[Launch] = []
    seen: Dict[Tuple[int, str], int] = {}
    for launch in launches:
        key = (id(launch.kernel), repr(sorted((k, repr(v)) for k, v in launch.constexprs.items())),
               repr(launch.kwargs.get("num_warps")))
        if key not in seen:
            seen[key] = len(out)
            out.append(launch)
            continue
        first = out[seen[key]]
        out[seen[key]] = Launch(first.kernel, (first.programs + launch.programs,), first.args, first.kwargs,
                                first.launches + launch.launches)
    return out


class _Ctx:
    """What a custom op's setup_context / backward see of autograd's ctx."""

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    needs_input_grad = (True,) * 16


class _Direct:
    """A custom op called as its Python body (the dispatcher would send meta tensors to the fake)."""

    def __init__(self, op, calls: list):
        self.op, self.calls = op, calls

    def __call__(self, *args, **kwargs):
        out = self.op._init_fn(*args, **kwargs)
        self.calls.append((self.op, args, kwargs, out))
        return out

    def __getattr__(self, name):
        return getattr(self.op, name)


@contextlib.contextmanager
def _recording():
    from torch._library.custom_ops import CustomOpDef

    import hss_kernels.triton as pkg
    from hss_kernels.triton import _common, decode, hierarchical_softmax, tree_min

    launches: List[Launch] = []
    calls: list = []

    def launch(kernel, grid, like, *args, **kwargs):
        launches.append(Launch(kernel, tuple(int(g) for g in grid), args, dict(kwargs)))

    saved = [(_common, "launch", _common.launch), (_common, "interpreted", _common.interpreted)]
    for mod in (hierarchical_softmax, tree_min, decode, pkg):
        for name, obj in list(vars(mod).items()):
            if isinstance(obj, CustomOpDef):
                saved.append((mod, name, obj))
                setattr(mod, name, _Direct(obj, calls))
    _common.launch = launch
    _common.interpreted = lambda device: False
    # Every row as a process's first call: its channel stride compiled in (_common.up_sxc), whatever rows came
    # before it in this process.
    seen, _common._up_sxc_seen = _common._up_sxc_seen, set()
    try:
        yield launches, calls
    finally:
        _common._up_sxc_seen = seen
        for mod, name, obj in saved:
            setattr(mod, name, obj)


def _backward(calls) -> None:
    """Replays the registered backward of the (last) forward custom op that has one."""
    for op, args, kwargs, out in reversed(calls):
        if getattr(op, "_backward_fn", None) is not None:
            ctx = _Ctx()
            outs = out if isinstance(out, tuple) else (out,)
            op._setup_context_fn(ctx, args, out)
            grads = [torch.ones_like(outs[0])] + [None] * (len(outs) - 1)
            op._backward_fn(ctx, *grads)
            return
    raise RuntimeError("no custom op with a backward was called")


def record_call(call: Callable[[], object], backward: bool = False) -> List[Launch]:
    """The Triton launches that ``call()`` makes (its forward), or with ``backward`` those of the registered
    backward of the last forward custom op it called. ``call`` must reach the ops through their modules'
    attributes (``hierarchical_softmax.hierarchical_softmax_loss(...)``, ``OPS[...]``), which are patched."""
    with _recording() as (launches, calls):
        call()
        if backward:
            del launches[:]
            _backward(calls)
        return coalesce(list(launches))


def fuses_upsample(op: str) -> bool:
    """Whether the Triton registry's function of ``op`` (a row name) fuses the upsampling: it says so with
    the ``takes_upsample`` attribute that ``hss_kernels.functional`` reads."""
    import hss_kernels.triton as pkg

    return bool(getattr(pkg.OPS[OP_KEYS[op]], "takes_upsample", False))


def weight_kwargs(weights: str, target: torch.Tensor, tree) -> Dict[str, torch.Tensor]:
    """The ``class_weight`` / ``pixel_weight`` keywords of a loss call with ``weights`` ("none", "class",
    "pixel", "class+pixel"): float32 tensors like ``target``'s (meta: one per leaf, the target's shape)."""
    kw = {}
    if weights in ("class", "class+pixel"):
        kw["class_weight"] = torch.empty(tree.num_leaves, dtype=torch.float32, device=target.device)
    if weights in ("pixel", "class+pixel"):
        kw["pixel_weight"] = torch.empty(target.shape, dtype=torch.float32, device=target.device)
    return kw


def _call(op: str, fn, logits: torch.Tensor, target: torch.Tensor, tree, upsample: bool, weights: str = "none"):
    """The registry function's call as ``hss_kernels.functional`` makes it, default options: the losses
    with ``upsample="bilinear"``, decode with ``size=`` the labels' (H, W), when ``upsample``; the losses with
    ``weights`` (:func:`weight_kwargs`; decode takes none)."""
    if op == "decode":
        return fn(logits, tree, size=tuple(target.shape[-2:])) if upsample else fn(logits, tree)
    kw = weight_kwargs(weights, target, tree)
    if kw and not getattr(fn, "takes_weights", False):
        from .model import NotFused
        raise NotFused(f"the Triton {OP_KEYS[op]} does not fuse the weights (no takes_weights)")
    return fn(logits, target, tree, upsample="bilinear", **kw) if upsample else fn(logits, target, tree, **kw)


def record(op: str, pass_: str, logits: torch.Tensor, target: torch.Tensor, tree, upsample: bool = False,
           weights: str = "none") -> List[Launch]:
    """The Triton launches of one pass of ``op`` (a row name) as the registry's op makes them with its
    default options, on meta tensors ``logits``/``target``; with ``upsample``, logits smaller than the
    target through ``upsample="bilinear"`` (``model.NotFused`` when the op does not fuse it); a loss with
    ``weights`` (:func:`weight_kwargs`)."""
    import hss_kernels.triton as pkg

    from .model import NotFused

    if upsample and not fuses_upsample(op):
        raise NotFused(f"the Triton {OP_KEYS[op]} does not fuse the upsampling (no takes_upsample)")

    def call():
        return _call(op, pkg.OPS[OP_KEYS[op]], logits, target, tree, upsample, weights)

    return record_call(call, backward=pass_ == "backward")


# --------------------------------------------------------------------------------------- compiling
def _stand_in(t: torch.Tensor) -> torch.Tensor:
    """A small CPU tensor with the dtype of ``t`` whose data pointer has the alignment (mod 64) a CUDA
    allocation of ``t`` would have."""
    size = t.element_size()
    off = (t.storage_offset() * size) % 64 // size
    buf = torch.empty(64 // size + off + 1, dtype=t.dtype)
    assert buf.data_ptr() % 64 == 0, "CPU allocations are 64-byte aligned"
    return buf[off:]


@dataclass
class Compiled:
    name: str
    cubin: bytes
    ptx: str
    num_warps: int
    shared: int  # dynamic shared memory of a launch, bytes
    key: str


def _key(launch: Launch, signature, constexprs, attrs, options) -> str:
    import triton

    h = hashlib.sha256()
    h.update(triton.__version__.encode())
    src_dir = Path(launch.kernel.fn.__code__.co_filename).resolve().parent
    for p in sorted(src_dir.glob("*.py")):  # the kernel's module and its helpers, line numbers included
        h.update(p.name.encode())
        h.update(p.read_bytes())
    for part in (launch.kernel.fn.__name__, signature, constexprs, attrs, sorted(options.items())):
        h.update(repr(part).encode())
    return h.hexdigest()[:24]


def compile_launch(launch: Launch, cache_dir: Optional[Path] = None, force: bool = False) -> Compiled:
    """Compiles a recorded launch for sm_90 as ``JITFunction.run`` would on a GPU (cached under
    ``cache_dir``, keyed by the Triton version, the kernel folder's sources and the specialisation)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    jit = launch.kernel
    args = [_stand_in(a) if isinstance(a, torch.Tensor) else a for a in launch.args]
    kwargs = {k: (_stand_in(v) if isinstance(v, torch.Tensor) else v) for k, v in launch.kwargs.items()}
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    opts = options.__dict__
    key = _key(launch, signature, constexprs, attrs, {k: v for k, v in opts.items() if isinstance(v, (int, str, bool, float, type(None), tuple))})
    if cache_dir is not None and not force:
        meta = cache_dir / f"{key}.json"
        if meta.is_file():
            m = json.loads(meta.read_text())
            return Compiled(m["name"], (cache_dir / f"{key}.cubin").read_bytes(), (cache_dir / f"{key}.ptx").read_text(),
                            m["num_warps"], m["shared"], key)
    # Compile in a private Triton cache: a shared one may hold the same kernel compiled from another
    # checkout (its key ignores file paths and helper line numbers).
    with tempfile.TemporaryDirectory(prefix="hss-sm90-triton-") as tmp:
        saved = triton.knobs.cache.dir
        triton.knobs.cache.dir = tmp
        try:
            k = triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=opts)
        finally:
            triton.knobs.cache.dir = saved
    out = Compiled(k.metadata.name, k.asm["cubin"], k.asm["ptx"], int(k.metadata.num_warps),
                   int(k.metadata.shared), key)
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        for name, data in ((f"{key}.cubin", out.cubin), (f"{key}.ptx", out.ptx.encode()),
                           (f"{key}.json", json.dumps({"name": out.name, "num_warps": out.num_warps,
                                                       "shared": out.shared}).encode())):  # json last: complete
            tmpf = cache_dir / f".{name}.{os.getpid()}"
            tmpf.write_bytes(data)
            tmpf.replace(cache_dir / name)
    return out
