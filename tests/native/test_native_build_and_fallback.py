"""Issue 4's build and fallback requirements: setup.py builds the CPU extension everywhere and adds the
CUDA sources when torch has CUDA, ``HSS_REQUIRE_CUDA=1`` turns a CPU-only build into an error,
``HSS_NO_EXTENSION=1`` skips the extension; without the extension the package still imports,
``backend="native"`` says clearly that it is not built, and ``"auto"`` falls back; CI compiles the CUDA
code (.ci/run calls .ci/cuda-build, which builds for sm_90 with HSS_REQUIRE_CUDA=1 against torch 2.11).

setup.py runs in a subprocess with ``setuptools.setup`` replaced by a recorder, so nothing is built.
"""
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SETUP_PROBE = textwrap.dedent("""
    import json, os, runpy, sys
    import setuptools
    import torch
    from torch.utils import cpp_extension

    def run(env, fake_cuda=False):
        old = dict(os.environ)
        os.environ.update(env)
        saved = (torch.version.cuda, cpp_extension.CUDA_HOME)
        if fake_cuda:  # what a CUDA build of torch with a toolkit found looks like to setup.py
            torch.version.cuda, cpp_extension.CUDA_HOME = "13.0", "/usr/local/cuda"
        got = {}
        setuptools.setup = lambda **kw: got.update(kw)
        try:
            runpy.run_path("setup.py", run_name="__main__")
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            os.environ.clear()
            os.environ.update(old)
            torch.version.cuda, cpp_extension.CUDA_HOME = saved
        return {"ext": [{"name": e.name, "sources": sorted(e.sources),
                         "macros": [list(m) for m in e.define_macros]} for e in got["ext_modules"]]}

    out = {
        "default": run({}),
        "no_extension": run({"HSS_NO_EXTENSION": "1"}),
        "require_cuda_cpu_torch": run({"HSS_REQUIRE_CUDA": "1"}),
        "cuda_torch": run({"HSS_REQUIRE_CUDA": "1"}, fake_cuda=True),
    }
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def setup_runs():
    env = {k: v for k, v in os.environ.items() if k not in ("HSS_REQUIRE_CUDA", "HSS_NO_EXTENSION")}
    proc = subprocess.run([sys.executable, "-c", _SETUP_PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_setup_builds_the_cpu_extension_by_default(setup_runs):
    import torch
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA: the default build includes the .cu files")
    (ext,) = setup_runs["default"]["ext"]
    assert ext["name"] == "hss_kernels._C"
    assert ext["sources"] and all(s.startswith("csrc") and s.endswith(".cpp") for s in ext["sources"])
    assert ["HSS_WITH_CUDA", "1"] not in ext["macros"]


def test_setup_adds_the_cuda_sources_when_torch_has_cuda(setup_runs):
    (ext,) = setup_runs["cuda_torch"]["ext"]
    cu = [s for s in ext["sources"] if s.endswith(".cu")]
    assert sorted(cu) == sorted(os.path.join("csrc", "cuda", f) for f in os.listdir(os.path.join(ROOT, "csrc", "cuda"))
                                if f.endswith(".cu"))
    assert ["HSS_WITH_CUDA", "1"] in ext["macros"]


def test_setup_require_cuda_makes_a_cpu_only_build_an_error(setup_runs):
    import torch
    if torch.version.cuda is not None:
        pytest.skip("this torch has CUDA")
    assert "HSS_REQUIRE_CUDA" in setup_runs["require_cuda_cpu_torch"].get("error", "")


def test_setup_no_extension(setup_runs):
    assert setup_runs["no_extension"]["ext"] == []


_NO_EXTENSION_PROBE = textwrap.dedent("""
    import sys
    sys.modules["hss_kernels._C"] = None  # the extension is not built: importing it fails
    import torch
    import hss_kernels
    from hss_kernels import backends, native, reference, trees

    tree = trees.load("cityscapes")
    x = torch.randn(1, tree.num_leaves, 2, 3)
    v = torch.randn(1, tree.num_nodes, 2, 3)
    y = torch.randint(0, tree.num_leaves, (1, 2, 3))
    assert native._C is None
    assert "native" not in hss_kernels.available_backends("cpu")
    for fn, args in ((hss_kernels.hierarchical_softmax_loss, (x, y, tree)),
                     (hss_kernels.tree_min_loss, (v, y, tree)), (hss_kernels.decode, (v, tree))):
        try:
            fn(*args, backend="native")
        except RuntimeError as exc:
            print("ERROR", exc)
        else:
            raise SystemExit(f"{fn.__name__}: backend='native' ran without the extension")
    assert torch.equal(hss_kernels.hierarchical_softmax_loss(x, y, tree),
                       reference.hierarchical_softmax_loss(x, y, tree))
    assert torch.equal(hss_kernels.tree_min_loss(v, y, tree), reference.tree_min_loss(v, y, tree))
    assert torch.equal(hss_kernels.decode(v, tree), reference.decode(v, tree))
    print("OK")
""")


def test_missing_extension_is_explained_and_auto_falls_back():
    proc = subprocess.run([sys.executable, "-c", _NO_EXTENSION_PROBE], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, TRITON_INTERPRET="0"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    errors = [line for line in proc.stdout.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 3 and proc.stdout.splitlines()[-1] == "OK"
    for line in errors:
        assert "backend='native'" in line and "hss_kernels._C is not built" in line and "pip install" in line, line


def test_ci_compiles_the_cuda_code():
    run = open(os.path.join(ROOT, ".ci", "run")).read()
    build = open(os.path.join(ROOT, ".ci", "cuda-build")).read()
    assert os.access(os.path.join(ROOT, ".ci", "cuda-build"), os.X_OK)
    # started in the background with the tests (lowest priority), waited for, and a failure fails CI
    assert re.search(r"^[^#\n]*nice -n 19 \.ci/cuda-build >", run, re.M), ".ci/run does not call .ci/cuda-build"
    assert re.search(r'wait "\$cuda_pid" \|\| status=\$\?', run) and "CI: .ci/cuda-build failed" in run
    venv = open(os.path.join(ROOT, ".ci", "cuda-venv")).read()
    assert re.search(r"^TORCH_VERSION=2\.11\.0$", venv, re.M), ".ci/cuda-venv must build against torch 2.11"
    assert ".ci/cuda-venv" in build
    build_cmd = re.search(r"TORCH_CUDA_ARCH_LIST=9\.0 .*HSS_REQUIRE_CUDA=1[^\n]*\n[^\n]*setup\.py[^\n]*build_ext", build)
    assert build_cmd, "cuda-build must build with TORCH_CUDA_ARCH_LIST=9.0 and HSS_REQUIRE_CUDA=1"
    assert "CUDA_HOME" in build and '_dispatch_has_kernel_for_dispatch_key(op, "CUDA")' in build
    for script in ("run", "cuda-build", "cuda-venv"):
        subprocess.run(["bash", "-n", os.path.join(ROOT, ".ci", script)], check=True)


def test_unavailable_reason():
    from hss_kernels import backends, native
    if native._C is None:
        pytest.skip(native.unavailable_reason("cpu"))
    assert native.unavailable_reason("cpu") is None
    assert "meta" in native.unavailable_reason("meta")
    assert "native" in backends.available_backends("cpu", "hierarchical_softmax_loss")
    assert "native" in backends.available_backends("cpu", "decode")
