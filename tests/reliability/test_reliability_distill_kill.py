"""Kill `python -m distill` with SIGKILL mid-run and mid-checkpoint; `--resume` must finish
from the last complete checkpoint with the figures of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from distill.checkpoint import complete_checkpoints

ARGS = [
    "--steps", "12", "--checkpoint-every", "2", "--keep-checkpoints", "2", "--batch-size", "2",
    "--log-every", "1", "--eval-samples", "4", "--num-workers", "0", "--device", "cpu", "--no-progress",
]
POLL_SECONDS = 0.001
# Attempts at catching a checkpoint half-written; a poll can miss the short window.
MID_CHECKPOINT_ATTEMPTS = 4


def _start(store: Path, out: Path, log: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "distill", "--store", str(store), "--out", str(out), *ARGS, *extra]
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))


def _kill_when(child: subprocess.Popen, condition, timeout: float = 300) -> bool:
    """SIGKILL ``child`` as soon as ``condition()`` holds; return False if it exited first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            child.send_signal(signal.SIGKILL)
            child.wait()
            return True
        if child.poll() is not None:
            return False
        time.sleep(POLL_SECONDS)
    child.kill()
    pytest.fail("distill neither reached the kill point nor exited in time")


def _complete_steps(out: Path) -> list[int]:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in folder.glob("step-*") if (p / "COMPLETE").is_file())


def _partial(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    return list(folder.glob(".partial-*")) if folder.is_dir() else []


def _final_figures(out: Path) -> dict:
    record = yaml.safe_load((out / "record.yaml").read_text(encoding="utf-8"))
    final = record["results"]["final"]
    return {key: final[key] for key in ("raw_cos", "centred_cos", "baseline_cos")}


def test_distill_sigkill_then_resume(small_store: Path, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    child = _start(small_store, reference, tmp_path / "reference.log")
    assert child.wait(timeout=600) == 0, (tmp_path / "reference.log").read_text()
    expected = _final_figures(reference)

    out = tmp_path / "run"
    # Kill 1: mid-run, once the checkpoint of step 4 is complete.
    child = _start(small_store, out, tmp_path / "run-0.log")
    assert _kill_when(child, lambda: 4 in _complete_steps(out))
    assert not (out / "record.yaml").exists()

    # Kill 2: mid-checkpoint, while a checkpoint folder is still being written.
    caught = 0
    for attempt in range(MID_CHECKPOINT_ATTEMPTS):
        child = _start(small_store, out, tmp_path / f"run-{attempt + 1}.log", "--resume")
        if _kill_when(child, lambda: bool(_partial(out))):
            caught += 1
            # The half-written folder is never listed as a checkpoint.
            assert [c.step for c in complete_checkpoints(out)] == _complete_steps(out)
            assert all(c.path.name.startswith("step-") for c in complete_checkpoints(out))
            resume_from = _complete_steps(out)[-1]
            log = tmp_path / "resume.log"
            child = _start(small_store, out, log, "--resume")
            assert child.wait(timeout=600) == 0, log.read_text()
            assert f"resuming at step {resume_from} of 12" in log.read_text()
            break
        # The run finished before a poll saw a partial folder; start the next attempt from scratch.
        out = tmp_path / f"run-attempt-{attempt}"
        child = _start(small_store, out, tmp_path / f"fresh-{attempt}.log")
        assert _kill_when(child, lambda: 4 in _complete_steps(out))
    assert caught == 1, "no poll caught a checkpoint being written"

    assert not _partial(out)
    figures = _final_figures(out)
    for key, value in expected.items():
        assert figures[key] == pytest.approx(value, abs=1e-6), key
