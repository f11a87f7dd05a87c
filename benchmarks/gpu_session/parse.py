"""Reading what the stages' commands wrote: pytest's JUnit XML, hss-check's table, compute-sanitizer's log."""
from __future__ import annotations

import os
import re
import xml.etree.ElementTree as ET
from typing import List, Optional


def _test_id(classname: str, name: str) -> str:
    """pytest's node id from JUnit's classname (``tests.test_x`` or ``tests.test_x.TestY``) and name."""
    if not classname:
        return name
    parts = classname.split(".")
    cls = [parts.pop()] if len(parts) > 1 and parts[-1][:1].isupper() else []
    return "::".join(["/".join(parts) + ".py"] + cls + [name])


def junit_counts(path: str, max_ids: int = 50) -> dict:
    """Counts of a pytest ``--junitxml`` report: tests, passed, failed, errors, skipped, the failing test
    ids (``file::name``, at most ``max_ids``) and the skip reasons with their counts. Raises
    FileNotFoundError or ``xml.etree.ElementTree.ParseError``."""
    root = ET.parse(path).getroot()
    cases = root.iter("testcase")
    out = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "time_s": 0.0,
           "failed_ids": [], "error_ids": [], "skip_reasons": {}}
    for case in cases:
        out["tests"] += 1
        test_id = _test_id(case.get("classname", ""), case.get("name", ""))
        try:
            out["time_s"] += float(case.get("time", 0) or 0)
        except ValueError:
            pass
        kinds = {child.tag for child in case}
        if "failure" in kinds:
            out["failed"] += 1
            out["failed_ids"].append(test_id)
        elif "error" in kinds:
            out["errors"] += 1
            out["error_ids"].append(test_id)
        elif "skipped" in kinds:
            out["skipped"] += 1
            msg = case.find("skipped").get("message", "") or ""
            out["skip_reasons"][msg[:120]] = out["skip_reasons"].get(msg[:120], 0) + 1
        else:
            out["passed"] += 1
    for key in ("failed_ids", "error_ids"):
        if len(out[key]) > max_ids:
            out[key] = out[key][:max_ids] + [f"... and {len(out[key]) - max_ids} more"]
    out["time_s"] = round(out["time_s"], 1)
    return out


def check_table(text: str) -> dict:
    """hss-check's table: the rows (op, backend, tree, check, err, result) by result, and its last line.
    A row is a line of 6 cells between '|' whose last cell is ok, FAIL or n/a."""
    rows = {"ok": [], "FAIL": [], "n/a": []}
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 6 and cells[-1] in rows:
            rows[cells[-1]].append(cells)
    final = None
    for line in reversed(text.splitlines()):
        if re.match(r"^(all \d+ checks hold|\d+ passed, \d+ failed)", line.strip()):
            final = line.strip()
            break
    header = next((ln for ln in text.splitlines() if ln.startswith("hss_kernels self-check on")), None)
    return {"ok": len(rows["ok"]), "failed": len(rows["FAIL"]), "not_run": len(rows["n/a"]),
            "failed_rows": [" | ".join(r) for r in rows["FAIL"]],
            "not_run_rows": [" | ".join(r) for r in rows["n/a"]], "final_line": final, "header": header}


def sanitizer_log(text: str) -> dict:
    """compute-sanitizer's verdict (``ERROR SUMMARY: N errors``), the kinds of error it printed, and
    the sancalls lines: calls done, calls that raised, backends unavailable, and the last call started."""
    m = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    kinds = {}
    for k in re.findall(r"=========\s+(Invalid [^\n]*?|Uninitialized [^\n]*?|Out of bounds [^\n]*?|"
                        r"Program hit [^\n]*?|Malloc/Free [^\n]*?)(?: at | by |\n|$)", text):
        k = k.strip()[:80]
        kinds[k] = kinds.get(k, 0) + 1
    calls = re.findall(r"^CALL (.+)$", text, re.M)
    done = re.findall(r"^DONE (.+)$", text, re.M)
    raised = re.findall(r"^RAISED (.+)$", text, re.M)
    unavailable = re.findall(r"^UNAVAILABLE (.+)$", text, re.M)
    return {"errors": int(m[-1]) if m else None, "error_kinds": kinds, "calls": len(calls), "done": len(done),
            "raised": raised, "unavailable": unavailable, "last_call": calls[-1] if calls else None}


def tail(path: str, lines: int = 40, max_chars: int = 6000) -> str:
    """The last ``lines`` lines of a text file (at most ``max_chars``), or '' if it is missing."""
    if not os.path.exists(path):
        return ""
    with open(path, "rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 256 * 1024))
        text = f.read().decode("utf-8", "replace")
    out = "\n".join(text.splitlines()[-lines:])
    return out[-max_chars:]


def read_text(path: str) -> str:
    if not os.path.exists(path):
        return ""
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def first_line(text: Optional[str]) -> str:
    return (text or "").strip().splitlines()[0] if (text or "").strip() else ""


def pytest_summary_line(text: str) -> Optional[str]:
    """pytest's final '== 3 failed, 10 passed in 5.0s ==' line (or its -q form), if any."""
    found = None
    for line in text.splitlines():
        s = line.strip().strip("=").strip()
        if re.search(r"\b(passed|failed|error|errors|skipped|deselected|no tests ran)\b", s) and re.search(
                r"\bin \d+(\.\d+)?s\b", s):
            found = s
    return found


def list_failures(items: List[str], limit: int = 10) -> str:
    shown = ", ".join(f"`{x}`" for x in items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
