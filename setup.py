"""Build and install hss_kernels.

    pip install --no-build-isolation -e .

The C++ extension ``hss_kernels._C`` is built from ``csrc/ops.cpp`` (the module and the op schemas) and
``csrc/cpu/*.cpp`` (CPU, OpenMP) when those sources exist, plus ``csrc/cuda/*.cu`` when the installed
torch has CUDA and a toolkit is found (``CUDA_HOME``); the headers shared by both are in ``csrc/include``.
Environment variables:

* ``HSS_REQUIRE_CUDA=1``: a missing CUDA build is an error instead of a silent CPU-only build;
* ``HSS_NO_EXTENSION=1``: skip the extension (pure Python; ``backend="native"`` is then unavailable).
"""
import glob
import os

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
INCLUDE = os.path.join(ROOT, "csrc", "include")
# No --use_fast_math: it turns expf/logf/division into approximations and flushes denormals on the GPU
# only, so the CPU tests of the same per-pixel code (HSS_CPU_PIXEL_PATH=1, IEEE libm) would say nothing
# about the GPU build. A kernel that wants a fast intrinsic calls it explicitly, where its error is known.
# benchmarks/sm90 reads this list (with ast) to compile the same code.
NVCC_FLAGS = ["-O3"]
# hss-train (hss_kernels.train) and the pictures (hss_kernels.viz): the distributions of
# hss_kernels/_extras.py's TRAIN (tests/test_dependencies.py checks that they agree).
TRAIN_EXTRA = ["numpy", "pillow", "matplotlib", "tqdm"]
# Triton's interpreter module, which the Triton backend imports, needs NumPy; triton does not declare it.
TRITON_EXTRA = ["triton>=3.6", "numpy"]


def extensions():
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    if not sources or os.environ.get("HSS_NO_EXTENSION") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    cuda_sources = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    use_cuda = bool(cuda_sources) and torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if os.environ.get("HSS_REQUIRE_CUDA") == "1" and not use_cuda:
        raise RuntimeError(
            "HSS_REQUIRE_CUDA=1 but the CUDA kernels cannot be built: "
            f"torch.version.cuda={torch.version.cuda}, CUDA_HOME={cpp_extension.CUDA_HOME}, "
            f"{len(cuda_sources)} .cu files")
    openmp = ["-fopenmp"]
    # -fno-trapping-math lets GCC turn the float selects of the CPU lane loops into vector blends (the
    # code never reads the floating-point exception flags).
    cxx = ["-O3", "-fno-trapping-math"] + openmp
    define = [("HSS_WITH_CUDA", "1")] if use_cuda else []
    if use_cuda:
        ext = cpp_extension.CUDAExtension(
            "hss_kernels._C", sources + cuda_sources, include_dirs=[INCLUDE],
            define_macros=define, extra_compile_args={"cxx": cxx, "nvcc": list(NVCC_FLAGS)},
            extra_link_args=openmp)
    else:
        ext = cpp_extension.CppExtension(
            "hss_kernels._C", sources, include_dirs=[INCLUDE],
            extra_compile_args={"cxx": cxx}, extra_link_args=openmp)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=True)}


ext_modules, cmdclass = extensions()

setup(
    name="hss_kernels",
    version="0.1.0",
    description="Fast hierarchical semantic-segmentation losses (hierarchical softmax, focal tree-min) "
                "with Triton, C++ and CUDA kernels",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # benchmarks/ is not installed: it runs from the checkout (python -m benchmarks), next to the results it
    # writes and reads and the sources it compiles.
    packages=find_packages(include=["hss_kernels", "hss_kernels.*"]) + ["hss_kernels.tree_files"],
    # The tree files live in the top-level trees/ folder and install as hss_kernels/tree_files.
    package_dir={"hss_kernels.tree_files": "trees"},
    package_data={"hss_kernels.tree_files": ["*.txt", "*.md"], "hss_kernels": ["gpu_auto.json"]},
    # The core library (trees, losses, decoding, metrics, hss-check) needs torch only.
    install_requires=["torch>=2.11"],
    extras_require={
        "train": TRAIN_EXTRA,
        "triton": TRITON_EXTRA,
        # Everything the test suite exercises: training and pictures, Triton under its interpreter.
        "test": list(dict.fromkeys(["pytest", "pytest-xdist", "torchmetrics"] + TRAIN_EXTRA + TRITON_EXTRA)),
    },
    entry_points={"console_scripts": [
        "hss-check=hss_kernels.check:main",
        "hss-train=hss_kernels.train.cli:main",
    ]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
