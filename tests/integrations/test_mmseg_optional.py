"""mmsegmentation is optional: importing hss_kernels never imports it, and importing the integration
without it fails with an ImportError that says what to install. Runs in the main test run (no mmseg)."""
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

REFUSE = textwrap.dedent("""
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("mmseg", "mmengine", "mmcv"):
                raise ModuleNotFoundError(f"No module named {name!r} (refused by the test)", name=name)
            return None

    sys.meta_path.insert(0, Refuse())
""")


def run(body: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", REFUSE + textwrap.dedent(body)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_hss_kernels_never_imports_mmseg():
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        import hss_kernels, hss_kernels.integrations, hss_kernels.metrics, hss_kernels.modules
        print(sorted(m for m in sys.modules if m.partition(".")[0] in ("mmseg", "mmengine", "mmcv")))
    """)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_integration_without_mmseg_says_what_to_install():
    proc = run("""
        try:
            import hss_kernels.integrations.mmseg
        except ImportError as e:
            print("ImportError:", e)
        else:
            raise SystemExit("imported without mmseg")
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "ImportError: hss_kernels.integrations.mmseg needs mmsegmentation" in out
    assert "pip install" in out and "mmsegmentation" in out and "mmcv" in out and "mmengine" in out
