"""The core library needs torch only: it imports and runs with NumPy, Pillow, Matplotlib and tqdm refused;
the parts that need them (training, pictures) say what to install."""
import ast
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hss_kernels import _extras

ROOT = Path(__file__).resolve().parents[1]

# A fresh interpreter in which importing any of the train extra's modules fails as if it were not installed.
REFUSE = textwrap.dedent("""
    import sys
    REFUSED = {refused!r}

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in REFUSED:
                raise ModuleNotFoundError(f"No module named {{name!r}} (refused by the test)", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
    import warnings
    warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch tries, and carries on
""")


def run_without(refused, body: str) -> subprocess.CompletedProcess:
    code = REFUSE.format(refused=set(refused)) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_core_runs_without_the_train_extra():
    proc = run_without(_extras.TRAIN, """
        import torch
        import hss_kernels as hk
        from hss_kernels.metrics import HierarchicalMetrics

        tree = hk.trees.load("cityscapes")
        y = torch.randint(0, tree.num_leaves, (2, 6, 7))
        y[0, 0, 0] = 255
        for backend in ["reference"] + [b for b in hk.available_backends("cpu") if b in ("native",)]:
            x = torch.randn(2, tree.num_leaves, 6, 7, requires_grad=True)
            hk.hierarchical_softmax_loss(x, y, tree, backend=backend).backward()
            z = torch.randn(2, tree.num_nodes, 6, 7, requires_grad=True)
            (hk.tree_min_loss(z, y, tree, backend=backend) + hk.tree_bce_loss(z, y, tree, backend=backend)).backward()
            assert torch.isfinite(x.grad).all() and torch.isfinite(z.grad).all()
            pred = hk.decode(z.detach(), tree, backend=backend)
            m = HierarchicalMetrics(tree)
            m.update(pred, y)
            print(backend, sorted(m.compute()))
        e = torch.randn(2, 8, 6, 7, requires_grad=True)
        hk.tree_triplet_loss(e, y, tree).backward()
        print("loaded:", sorted({n.partition(".")[0] for n in sys.modules} & REFUSED))
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "reference [1, 2]" in proc.stdout
    assert "loaded: []" in proc.stdout


@pytest.mark.parametrize("module", ["hss_kernels.train", "hss_kernels.viz"])
def test_train_and_pictures_say_what_to_install(module):
    proc = run_without(["matplotlib"] if module == "hss_kernels.train" else ["PIL"], f"""
        try:
            import {module}
        except ImportError as exc:
            print("ImportError:", exc)
        else:
            print("imported")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ImportError:" in proc.stdout and 'pip install "hss_kernels[train]"' in proc.stdout, proc.stdout
    assert ("matplotlib" if module == "hss_kernels.train" else "pillow") in proc.stdout


def test_setup_extras_match_the_library():
    # setup.py cannot import the package it installs: its lists are read with ast.
    values = {}
    for node in ast.parse((ROOT / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                values[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    assert sorted(values["TRAIN_EXTRA"]) == sorted(_extras.TRAIN.values())
    assert "numpy" in values["TRITON_EXTRA"]  # triton.runtime.interpreter imports it
