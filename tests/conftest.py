"""Shared fixtures: the embedded models, a small extracted store, and a CLI runner.

The session-scoped store is extracted once from the first rows of the embedded problems
and is opened read-only by the tests that use it; a test that changes a store copies it
first with ``copy_store``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from extract.embedded import EMBEDDED_STUDENT, EMBEDDED_TEACHER, embedded_problems_path, resolve_model_path
from extract.pipeline import ExtractOptions, run_extract

REPO = Path(__file__).resolve().parent.parent
REAL_GSM8K_TEST = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"

# Rows of the embedded problems in the session store: enough for several shards and
# batches, few enough to extract in about a second.
SMALL_TRAIN_ROWS = 48
SMALL_HELDOUT_ROWS = 16


@dataclass
class CliResult:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 600, env: dict[str, str] | None = None) -> CliResult:
    """Run ``python -m <module> args`` in a subprocess, the way a user runs the tools."""
    merged = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout, env=merged
    )
    return CliResult(done.returncode, done.stdout, done.stderr)


@pytest.fixture(scope="session")
def teacher_path() -> str:
    return resolve_model_path(EMBEDDED_TEACHER)


@pytest.fixture(scope="session")
def student_path() -> str:
    return resolve_model_path(EMBEDDED_STUDENT)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """First rows of the embedded train and held-out files, as two JSONL files."""
    folder = tmp_path_factory.mktemp("small-data")
    paths = []
    for split, rows in (("train", SMALL_TRAIN_ROWS), ("heldout", SMALL_HELDOUT_ROWS)):
        lines = embedded_problems_path(split).read_text(encoding="utf-8").splitlines(keepends=True)[:rows]
        path = folder / f"{split}.jsonl"
        path.write_text("".join(lines), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1]


def extract_small_store(out: Path, data: tuple[Path, Path], teacher: str, **overrides) -> Path:
    """Extract ``data`` with the embedded teacher into ``out`` on CPU, without progress bars."""
    options = dict(
        teacher=teacher, data=data[0], heldout=data[1], out=out, device="cpu", shard_mb=4, progress=False
    )
    options.update(overrides)
    run_extract(ExtractOptions(**options))
    return out


@pytest.fixture(scope="session")
def small_store(tmp_path_factory: pytest.TempPathFactory, small_data: tuple[Path, Path], teacher_path: str) -> Path:
    """A safetensors store of the small data set; read-only for tests (copy it to change it)."""
    return extract_small_store(tmp_path_factory.mktemp("stores") / "small", small_data, teacher_path)


@pytest.fixture
def copy_store(tmp_path: Path):
    """Return a function that copies a store into this test's temporary directory."""

    def copy(store: Path, name: str = "store") -> Path:
        target = tmp_path / name
        shutil.copytree(store, target)
        return target

    return copy


@pytest.fixture(scope="session")
def real_gsm8k() -> Path:
    if not REAL_GSM8K_TEST.is_file():
        pytest.skip(f"real GSM8K test split not found at {REAL_GSM8K_TEST}")
    return REAL_GSM8K_TEST
