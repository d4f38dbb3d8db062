"""docs/benchmarks.md's tables are generated from benchmarks/results/ (benchmarks/report.py):
the doc must match the results committed with it, and the check must catch a drift either way."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "benchmarks" / "report.py"
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"


def check(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(REPORT), "--check", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=60)


def test_the_doc_matches_the_results() -> None:
    done = check()
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_changed_result_fails_the_check_and_regenerating_fixes_it(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    wire = json.loads((results / "wire.json").read_text())
    wire["figures"]["mb_per_s"]["bulk"] = 123456.0
    (results / "wire.json").write_text(json.dumps(wire))
    doc = tmp_path / "benchmarks.md"
    shutil.copy(DOC, doc)

    done = check("--doc", str(doc), "--results", str(results))
    assert done.returncode == 1
    assert "123456" in done.stdout  # the diff shows the figure the doc lacks

    subprocess.run([sys.executable, str(REPORT), "--doc", str(doc), "--results", str(results)], check=True, timeout=60)
    assert "| 123456 |" in doc.read_text()
    assert check("--doc", str(doc), "--results", str(results)).returncode == 0


def test_a_hand_edited_table_fails_the_check(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    text = DOC.read_text()
    start = text.index("<!-- table:wire -->")
    doc.write_text(text[:start] + text[start:].replace("| 1.00 |", "| 1.01 |", 1))
    done = check("--doc", str(doc))
    assert done.returncode == 1
    assert "1.01" in done.stdout


def test_a_table_without_its_markers_fails_the_check(tmp_path: Path) -> None:
    doc = tmp_path / "benchmarks.md"
    doc.write_text(DOC.read_text().replace("<!-- table:trust -->", "").replace("<!-- /table:trust -->", ""))
    done = check("--doc", str(doc))
    assert done.returncode != 0
    assert "trust" in done.stderr
