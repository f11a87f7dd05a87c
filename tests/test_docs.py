"""The documentation the code points at exists: every ``docs/MATH.md §N`` citation names a section."""
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITATION = re.compile(r"docs/MATH\.md`*\s*§\s*(\d+(?:\.\d+)*)")


def _sections():
    heads = re.findall(r"^#{2,3} (\d+(?:\.\d+)*)[. ]", (ROOT / "docs" / "MATH.md").read_text(encoding="utf-8"),
                       flags=re.M)
    return set(heads)


def _citations():
    for folder in ("hss_kernels", "csrc", "benchmarks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix not in (".py", ".h", ".cpp", ".cu", ".cuh", ".md") or "results" in path.parts:
                continue
            for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
                for section in CITATION.findall(line):
                    yield f"{path.relative_to(ROOT)}:{lineno}", section


def test_math_sections_are_found():
    sections = _sections()
    assert {"1", "1.7", "2.4", "3.10", "5", "5.6", "6"} <= sections


def test_every_math_citation_names_a_section():
    sections = _sections()
    cited = list(_citations())
    assert len(cited) >= 20  # the pattern still finds the citations
    missing = [f"{where}: §{section}" for where, section in cited if section not in sections]
    assert not missing, "citations of docs/MATH.md sections that do not exist:\n" + "\n".join(missing)
