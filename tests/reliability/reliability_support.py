"""Helpers of the reliability suite: tiny stores, an in-process CLI runner, an audit of file opens.

Test modules import the fixtures they use from here. This is not a conftest.py because
other test modules import the top-level one as ``conftest``, a name two conftest files
cannot share. Most cases here run the real click commands in this process (``invoke``), because
starting ``python -m`` costs about two seconds of imports per run and the suite runs
several hundred command lines. Cases that measure a process (kills, memory, locks, file
size limits) start real subprocesses.

Tests add the figures that docs/reliability.md quotes to ``reliability_figures``; they
are printed in the terminal summary under "reliability figures".
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from conftest import extract_small_store

# The tiny stores keep two teacher layers and 12 training rows: a few MB in a few
# shards, so a test can copy and damage one in milliseconds.
TINY_OPTIONS = dict(layers="0,1", limit=12, shard_mb=2)

_FIGURES: dict[str, str] = {}
_STORES: dict[str, Path] = {}
_OPENED: list[str] | None = None


@dataclass
class Invocation:
    exit_code: int
    stdout: str
    stderr: str


def invoke(command: Any, *args: str) -> Invocation:
    """Run a click command in this process as its console script would, and return its outputs.

    An exception other than ``SystemExit`` would be a traceback for a real user, so it is
    re-raised here and fails the test.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(command, [str(arg) for arg in args], catch_exceptions=True)
    finally:
        # The commands reconfigure logging for a terminal; give pytest its handlers back.
        root.handlers[:] = handlers
        root.setLevel(level)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return Invocation(result.exit_code, result.stdout, result.stderr)


def child_env() -> dict[str, str]:
    """The environment for the suite's child processes: this one's, with one OpenMP thread.

    The suite starts dozens of short children on a small machine that other jobs share.
    There, a second OpenMP thread spin-waiting for a busy core tripled the CPU time of a
    child extract run (11 s against 4 s user time, measured on this suite's kill-test
    configuration on 2 shared cores). The tiny store comes out bit-identical either way.
    """
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def tiny_extract_args(teacher_path: str, small_data: tuple[Path, Path], store: Path) -> list[str]:
    """The ``extract run`` arguments that write the tiny store (``TINY_OPTIONS``) into ``store``."""
    return [
        "run", "--teacher", teacher_path, "--data", str(small_data[0]), "--heldout", str(small_data[1]),
        "--out", str(store), "--device", "cpu", "--no-progress", "--layers", TINY_OPTIONS["layers"],
        "--limit", str(TINY_OPTIONS["limit"]), "--shard-mb", str(TINY_OPTIONS["shard_mb"]),
    ]


def error_line(result: Invocation) -> str:
    """Return the one ``error:`` line a refused command printed; fail if it printed more or a traceback."""
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    assert lines[-1] == errors[0], result.stderr
    return errors[0]


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _OPENED is None or event not in ("open", "os.listdir", "os.scandir"):
        return
    target = args[0] if args else None
    if target is None or isinstance(target, int):
        return
    try:
        _OPENED.append(os.path.realpath(os.fsdecode(target)))
    except (TypeError, ValueError, OSError):
        pass


sys.addaudithook(_audit)


@contextmanager
def recorded_opens() -> Iterator[list[str]]:
    """Record the resolved path of every file opened and directory listed by this process."""
    global _OPENED
    _OPENED = []
    try:
        yield _OPENED
    finally:
        _OPENED = None


def sealed(store: Path, shard_index: int) -> None:
    """Update the manifest's size and sha256 of one shard to match its bytes on disk.

    A damaged shard sealed this way passes the checksum, so the deeper checks (header,
    shapes, dtypes, values) are the ones that must catch it.
    """
    from extract.store.shards import hash_shard

    manifest = json.loads((store / "manifest.json").read_text())
    record = manifest["shards"][shard_index]
    record["bytes"], record["sha256"] = hash_shard(store / record["path"])
    (store / "manifest.json").write_text(json.dumps(manifest))


class _FigureReporter:
    """A pytest plugin that prints the collected figures after the test results."""

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if _FIGURES:
            terminalreporter.section("reliability figures")
            for key, value in _FIGURES.items():
                terminalreporter.write_line(f"{key}: {value}")


@pytest.fixture(scope="session")
def reliability_figures(pytestconfig: pytest.Config) -> dict[str, str]:
    if not pytestconfig.pluginmanager.has_plugin("reliability-figures"):
        pytestconfig.pluginmanager.register(_FigureReporter(), "reliability-figures")
    return _FIGURES


def _built_once(key: str, build: Any) -> Path:
    # Several test modules import these fixtures, and pytest runs a session fixture once
    # for each module that imports it. This cache keeps one store per session.
    if key not in _STORES:
        _STORES[key] = build()
    return _STORES[key]


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory: pytest.TempPathFactory, small_data: tuple[Path, Path], teacher_path: str) -> Path:
    """A read-only safetensors store of 28 samples (12 train, 16 held-out), two layers, four shards."""
    return _built_once(
        "safetensors",
        lambda: extract_small_store(tmp_path_factory.mktemp("tiny") / "store", small_data, teacher_path, **TINY_OPTIONS),
    )


@pytest.fixture(scope="session")
def tiny_zarr_store(tmp_path_factory: pytest.TempPathFactory, small_data: tuple[Path, Path], teacher_path: str) -> Path:
    """The tiny store's samples in the Zarr backend; read-only."""
    return _built_once(
        "zarr",
        lambda: extract_small_store(
            tmp_path_factory.mktemp("tiny-zarr") / "store", small_data, teacher_path, backend="zarr", **TINY_OPTIONS
        ),
    )
