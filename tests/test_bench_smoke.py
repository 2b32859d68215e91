"""`python -m bench.run --smoke` runs every benchmark at tiny sizes and writes its report to --out.

The smoke figures mean nothing. The test checks that each benchmark executes end to end
and reports, and that the smoke run leaves docs/benchmarks.md alone.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from bench.run import BENCHMARKS, DOCS_PAGE
from conftest import run_cli

EXPECTED_SECTIONS = (
    "### 1. Extraction overhead",
    "### 2. Store read",
    "### 3. Distill input stall",
    "### 4. Offline store vs online teacher",
    "### 5. Storage",
    "### 6. Memory",
)


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None


def test_bench_smoke_runs_every_benchmark(tmp_path: Path) -> None:
    report = tmp_path / "report.md"
    docs_before = _digest(DOCS_PAGE)

    done = run_cli("bench.run", "--smoke", "--out", str(report), "--workdir", str(tmp_path / "work"), timeout=300)

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = report.read_text(encoding="utf-8")
    assert "**Smoke mode**" in text
    for heading in EXPECTED_SECTIONS:
        assert heading in text, heading
    table_rows = [line for line in text.splitlines() if line.startswith("| ") and line[2].isdigit()]
    benchmarks = {row.split("|")[1].strip().split()[0] for row in table_rows}
    assert benchmarks == {str(n) for n in range(1, len(BENCHMARKS) + 1)}
    assert "| Qwen2.5-14B | teacher |" in text
    assert "bench: " in done.stdout
    assert not (tmp_path / "work").exists(), "the scratch directory must be removed"
    assert _digest(DOCS_PAGE) == docs_before


def test_bench_rejects_unknown_benchmark(tmp_path: Path) -> None:
    done = run_cli("bench.run", "--only", "nonsense", "--workdir", str(tmp_path / "work"))

    assert done.returncode == 2
    assert "unknown benchmarks ['nonsense']" in done.stderr
