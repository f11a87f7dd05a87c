"""What gets measured: configurations, losses, backends and the flat baselines, as callables.

Every hss row calls the public API (``hss_kernels.<loss>(..., backend=name)``), so it measures what a
user gets, input checks included. ``reference+compile`` is ``torch.compile`` of that same call with
``backend="reference"`` (the API skips its data-dependent label check while compiling).
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

import hss_kernels
from hss_kernels import Tree, trees

__all__ = ["Config", "CONFIGS", "LossSpec", "LOSSES", "DEFAULT_LOSSES", "HSS_BACKENDS", "WEIGHTS", "Case",
           "class_weights", "make_inputs", "build_case", "row_label", "random_tree", "hss_backends_for", "n_input_sets"]


@dataclass(frozen=True)
class Config:
    name: str
    tree: str
    batch: int
    height: int
    width: int
    note: str = ""


CONFIGS: Dict[str, Config] = {
    "cityscapes": Config("cityscapes", "cityscapes", 8, 1024, 2048, "Cityscapes training crop"),
    "vistas": Config("vistas", "vistas", 8, 1024, 1024, "Mapillary Vistas v1.2"),
    "vistas2": Config("vistas2", "vistas_v2", 8, 1024, 1024, "Mapillary Vistas v2.0"),
    "ppp": Config("ppp", "pascal_person_part", 16, 512, 512, "Pascal-Person-Part"),
    "small": Config("small", "vistas", 1, 64, 64, "a CPU finishes it in seconds"),
    "medium": Config("medium", "vistas", 1, 256, 256, "a CPU-sized Vistas crop"),
}
GPU_DEFAULT_CONFIGS = ["cityscapes", "vistas", "vistas2", "ppp"]
CPU_DEFAULT_CONFIGS = ["small"]


@dataclass(frozen=True)
class LossSpec:
    key: str              # row name
    op: str               # registry op name
    channels: str         # "leaves" or "nodes"
    baseline: str         # name of the flat baseline row
    has_backward: bool


LOSSES: Dict[str, LossSpec] = {
    "hierarchical_softmax": LossSpec("hierarchical_softmax", "hierarchical_softmax_loss", "leaves",
                                     "F.cross_entropy", True),
    "tree_min": LossSpec("tree_min", "tree_min_loss", "nodes", "F.binary_cross_entropy_with_logits", True),
    "decode": LossSpec("decode", "decode", "nodes", "torch.argmax", False),
    "tree_bce": LossSpec("tree_bce", "tree_bce_loss", "nodes", "F.binary_cross_entropy_with_logits", True),
}
DEFAULT_LOSSES = ["hierarchical_softmax", "tree_min", "decode"]
# Order of the rows; "flat" is the baseline a user would otherwise run.
HSS_BACKENDS = ["reference", "reference+compile", "triton", "native"]


def hss_backends_for(spec: LossSpec, device: torch.device, named: Sequence[str] = ()) -> Dict[str, Optional[str]]:
    """Backends to time for ``spec`` on ``device``: name → None when it runs, else why not.

    ``named``: the backends the user asked for (empty: all of :data:`HSS_BACKENDS`).
    ``reference+compile`` runs wherever the reference does. On the CPU Triton runs only under its
    interpreter, which measures Python, not a kernel: it is skipped unless named, and then its rows are
    labelled ``triton (interpreter)``.
    """
    device = torch.device(device)
    present = set(hss_kernels.available_backends(device, spec.op))
    status: Dict[str, Optional[str]] = {}
    for b in (list(named) or HSS_BACKENDS):
        if b == "reference+compile":
            status[b] = None if "reference" in present else "reference unavailable"
        elif b in present:
            status[b] = None
        else:
            why = hss_kernels.backends.unavailable_reason(b, device, spec.op)
            status[b] = why or "not available"
    if device.type == "cpu" and status.get("triton", "x") is None and "triton" not in named:
        status["triton"] = ("Triton on the CPU runs only under its interpreter (Python, not a kernel); "
                            "not timed unless --backend triton is given")
    return status


def row_label(spec: LossSpec, backend: str, device) -> str:
    """The row's printed name: the baseline's function for ``flat``; Triton on the CPU is marked
    ``(interpreter)`` so that no one mistakes its times for a kernel's."""
    if backend == "flat":
        return spec.baseline
    if torch.device(device).type == "cpu" and backend == "triton":
        return "triton (interpreter)"
    return backend


def n_input_sets(set_bytes: int, cache: int, limit: int = 8) -> int:
    """How many distinct input sets to rotate so that repeated runs do not just measure the cache:
    enough to exceed three times the last-level cache, at most ``limit``."""
    if set_bytes <= 0:
        return 1
    return int(max(1, min(limit, math.ceil(3 * cache / set_bytes))))


def random_tree(num_leaves: int, seed: int = 0) -> Tree:
    """A random depth-3 tree with ``num_leaves`` leaves (about L^(1/3) top nodes, L^(2/3) middle
    nodes, every internal node with at least one child), leaves first in channel order like HSSN."""
    if num_leaves < 2:
        raise ValueError("random_tree: need at least 2 leaves")
    rng = random.Random(seed)
    top = max(2, round(num_leaves ** (1 / 3)))
    mid = min(num_leaves, max(top, round(num_leaves ** (2 / 3))))
    top = min(top, mid)

    def assign(n_children: int, n_parents: int) -> List[int]:
        owners = list(range(n_parents)) + [rng.randrange(n_parents) for _ in range(n_children - n_parents)]
        rng.shuffle(owners)
        return owners

    leaf_parent = assign(num_leaves, mid)
    mid_parent = assign(mid, top)
    parents = [num_leaves + p for p in leaf_parent] + [num_leaves + mid + p for p in mid_parent] + [-1] * top
    return Tree.from_parents(parents)


# The weights a row passes (``--weights``): none, a class weight per leaf (``class_weights``), a float32 pixel
# weight map (the target's shape), or both.
WEIGHTS = ("none", "class", "pixel", "class+pixel")


def class_weights(tree: Tree, device) -> torch.Tensor:
    """The benchmark's class weights: ``L`` float32 values spread evenly over [0.5, 1.5] by label id."""
    return torch.linspace(0.5, 1.5, tree.num_leaves, device=device)


def make_inputs(spec: LossSpec, tree: Tree, batch: int, height: int, width: int, dtype: torch.dtype,
                device: torch.device, n_sets: int, need_dense_target: bool, weights: str = "none") -> List[dict]:
    """``n_sets`` independent input sets: logits ~ N(0, 1) (never zeros), uniform random leaf labels
    (int64), and for the BCE baseline the dense multi-label target ``t[n, v] = [v on the path of y]``
    in the logits' dtype; with pixel weights (``weights`` "pixel" or "class+pixel") a float32 weight map
    ``pw`` ~ U[0.5, 1.5) of the labels' shape."""
    C = tree.num_leaves if spec.channels == "leaves" else tree.num_nodes
    path = tree.tables(device).path.to(dtype) if need_dense_target else None  # (V, L)
    sets = []
    for _ in range(n_sets):
        x = torch.randn(batch, C, height, width, device=device, dtype=torch.float32).to(dtype)
        y = torch.randint(0, tree.num_leaves, (batch, height, width), device=device, dtype=torch.int64)
        s = {"x": x, "y": y}
        if path is not None:
            s["t"] = path.t()[y].permute(0, 3, 1, 2).contiguous()
        if "pixel" in weights:
            s["pw"] = torch.rand(batch, height, width, device=device) + 0.5
        sets.append(s)
    return sets


@dataclass
class Case:
    """One row: ``setup(i)`` (untimed) then ``run(state)`` (timed)."""
    loss: str
    backend: str
    pass_name: str
    setup: Callable[[int], object]
    run: Callable[[object], object]
    channels: int
    label_bytes: int
    out_bytes: int


def _call(spec: LossSpec, tree: Tree, backend: str, weights: str = "none") -> Callable:
    """f(x, y, t, pw) → the output a user's call returns. ``weights`` (:data:`WEIGHTS`): the class weights of
    :func:`class_weights` and/or the input set's pixel weight map ``pw`` go to the loss (and to the flat
    baseline, weighted as the user would write it); decode takes none."""
    cw = class_weights(tree, "cpu") if "class" in weights and spec.key != "decode" else None
    pixel = "pixel" in weights and spec.key != "decode"
    if backend == "flat":
        return _flat_call(spec, tree, cw, pixel)
    name = "reference" if backend == "reference+compile" else backend.split(" ")[0]
    api = getattr(hss_kernels, spec.op)
    if spec.key == "decode":
        fn = lambda x, y, t, pw: api(x, tree, backend=name)  # noqa: E731
    elif cw is None and not pixel:
        fn = lambda x, y, t, pw: api(x, y, tree, backend=name)  # noqa: E731
    else:
        cache = {}

        def fn(x, y, t, pw):
            w = cache.get(x.device) if cw is not None else None
            if cw is not None and w is None:
                w = cache[x.device] = cw.to(x.device)
            return api(x, y, tree, backend=name, class_weight=w, pixel_weight=pw if pixel else None)
    if backend == "reference+compile":
        fn = torch.compile(fn, dynamic=False)
    return fn


def _flat_call(spec: LossSpec, tree: Tree, cw: Optional[torch.Tensor], pixel: bool) -> Callable:
    """The flat baseline of ``spec``, weighted as a user would write it: ``F.cross_entropy(weight=)``, and a
    pixel weight map through ``reduction="none"``; the BCE baselines weigh each pixel's channels by its
    weight (class weight of its label times pixel weight) through ``weight=``."""
    if spec.baseline == "torch.argmax":
        return lambda x, y, t, pw: x.argmax(dim=1)
    if spec.baseline == "F.cross_entropy":
        if not pixel:
            return lambda x, y, t, pw: F.cross_entropy(
                x, y, weight=None if cw is None else cw.to(x.device, x.dtype), ignore_index=255)

        def ce(x, y, t, pw):
            w = None if cw is None else cw.to(x.device, x.dtype)
            per = F.cross_entropy(x, y, weight=w, ignore_index=255, reduction="none") * pw
            valid = y != 255
            denom = valid.sum() if w is None else w[y.clamp(0, w.numel() - 1)][valid].sum()
            return per.sum() / denom
        return ce
    if cw is None and not pixel:
        return lambda x, y, t, pw: F.binary_cross_entropy_with_logits(x, t)

    def bce(x, y, t, pw):
        w = torch.ones_like(y, dtype=torch.float32) if cw is None else cw.to(x.device)[y]
        if pixel:
            w = w * pw
        return F.binary_cross_entropy_with_logits(x, t, weight=w.unsqueeze(1).to(x.dtype))
    return bce


def build_case(spec: LossSpec, tree: Tree, backend: str, pass_name: str, sets: List[dict],
               fn: Optional[Callable] = None, weights: str = "none") -> Case:
    """The setup/run pair for one (loss, backend, pass) on the given input sets. ``backend`` is a
    registry name, ``reference+compile``, or ``flat`` (the baseline). A pixel weight map in the sets
    counts 4 bytes per pixel read."""
    fn = fn or _call(spec, tree, backend, weights)
    x0 = sets[0]["x"]
    C = x0.shape[1]
    P = x0.shape[0] * x0.shape[2] * x0.shape[3]
    b = x0.element_size()
    if spec.key == "decode":
        label_bytes, out_bytes = 0, 8 * P  # int64 labels out
    elif backend == "flat" and "binary" in spec.baseline:
        label_bytes, out_bytes = C * b, 4  # the dense float target, same dtype as the logits
    else:
        label_bytes, out_bytes = sets[0]["y"].element_size(), 4
    if "pw" in sets[0] and spec.key != "decode":
        label_bytes += sets[0]["pw"].element_size()
    n = len(sets)
    grad_sets = [dict(s, x=s["x"].detach().requires_grad_(True)) for s in sets] if pass_name != "forward" else None

    if pass_name == "forward":
        def setup(i):
            return sets[i % n]

        def run(s):
            with torch.no_grad():
                return fn(s["x"], s["y"], s.get("t"), s.get("pw"))
    elif pass_name == "forward+backward":
        def setup(i):
            return grad_sets[i % n]

        def run(s):
            out = fn(s["x"], s["y"], s.get("t"), s.get("pw"))
            return torch.autograd.grad(out, s["x"])
    elif pass_name == "backward":
        def setup(i):
            s = grad_sets[i % n]
            return s["x"], fn(s["x"], s["y"], s.get("t"), s.get("pw"))

        def run(state):
            x, out = state
            return torch.autograd.grad(out, x)
    else:
        raise ValueError(f"unknown pass {pass_name!r}")
    return Case(spec.key, backend, pass_name, setup, run, C, label_bytes, out_bytes)


def forward_output(spec: LossSpec, tree: Tree, backend: str, s: dict, fn: Optional[Callable] = None,
                   weights: str = "none"):
    """One forward call (no grad) on input set ``s``: the loss, or decode's labels."""
    fn = fn or _call(spec, tree, backend, weights)
    with torch.no_grad():
        return fn(s["x"], s["y"], s.get("t"), s.get("pw"))


def check_value(spec: LossSpec, got: torch.Tensor, ref: torch.Tensor) -> float:
    """How far a backend's forward output ``got`` is from the reference's ``ref`` on the same inputs:
    the relative difference of the loss, or for decode the fraction of pixels whose label differs."""
    if spec.key == "decode":
        return float((got != ref).float().mean())
    return float((got.double() - ref.double()).abs() / ref.double().abs().clamp(min=1e-30))


def load_tree(name: str) -> Tree:
    return trees.load(name)
