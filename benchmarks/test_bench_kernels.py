"""pytest-benchmark suite: every loss × available backend × pass at small sizes, beside the flat baseline.

Not part of the CI test run (pytest's testpaths is ``tests/``). Run it with

    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only
    python -m pytest benchmarks/test_bench_kernels.py --benchmark-only -k "hierarchical and forward" \\
        --benchmark-columns=median,iqr,rounds --benchmark-sort=name

(``pip install pytest-benchmark``; it is in the ``test`` extra). Each benchmark's ``extra_info`` holds
the bytes it must move (MATH.md §5) and the achieved GB/s, so ``--benchmark-json`` files carry them.
On a GPU, each round synchronizes the device so that the host clock covers the work; use
``python -m benchmarks`` for CUDA-event timings, the roofline and memory.
"""
import pytest
import torch

from benchmarks import cases as C
from benchmarks.measure import PASSES, bytes_moved

pytest.importorskip("pytest_benchmark")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SIZES = [("vistas", 1, 64, 64), ("cityscapes", 2, 64, 128)] if DEVICE.type == "cpu" else \
        [("vistas", 2, 512, 512), ("cityscapes", 2, 512, 1024)]
DTYPES = [torch.float32] if DEVICE.type == "cpu" else [torch.float32, torch.bfloat16]


def _params():
    out = []
    for loss, spec in C.LOSSES.items():
        # Triton on the CPU would time its interpreter, and torch.compile would time compilation in
        # pytest-benchmark's short runs: both are left to `python -m benchmarks`.
        named = ["reference", "native"] + (["triton"] if DEVICE.type == "cuda" else [])
        status = C.hss_backends_for(spec, DEVICE, named)
        backends = [b for b, why in status.items() if why is None] + ["flat"]
        for backend in backends:
            for p in PASSES:
                if p != "forward" and not spec.has_backward:
                    continue
                for size in SIZES:
                    for dtype in DTYPES:
                        out.append(pytest.param(loss, backend, p, size, dtype,
                                                id=f"{loss}-{backend}-{p}-{size[0]}x{size[1]}x{size[2]}x{size[3]}-"
                                                   f"{str(dtype)[6:]}"))
    return out


@pytest.mark.parametrize("loss, backend, pass_name, size, dtype", _params())
def test_kernel(benchmark, loss, backend, pass_name, size, dtype):
    tree_name, batch, H, W = size
    spec = C.LOSSES[loss]
    tree = C.load_tree(tree_name)
    torch.manual_seed(0)
    sets = C.make_inputs(spec, tree, batch, H, W, dtype, DEVICE, 2, need_dense_target="binary" in spec.baseline)
    case = C.build_case(spec, tree, backend, pass_name, sets)
    counter = {"i": 0}

    def setup():
        counter["i"] += 1
        return (case.setup(counter["i"]),), {}

    def target(state):
        out = case.run(state)
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(target, setup=setup, rounds=10 if DEVICE.type == "cpu" else 50, warmup_rounds=2)
    nbytes = bytes_moved(pass_name, batch * H * W, case.channels, sets[0]["x"].element_size(), case.label_bytes,
                         case.out_bytes)
    benchmark.extra_info.update(bytes=nbytes, device=str(DEVICE), label=C.row_label(spec, backend, DEVICE))
    median = benchmark.stats.stats.median if benchmark.stats is not None else None
    if median:
        benchmark.extra_info["GBps"] = nbytes / median / 1e9
