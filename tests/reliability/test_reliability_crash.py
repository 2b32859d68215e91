"""Crashes and concurrency: SIGKILL at seeded moments, a file size limit, two writers, two readers.

All cases run ``python -m extract`` (and ``python -m distill``) as real child processes on
24 samples of the small data set, cut at 64 tokens into about thirty shards, which keeps
each run short. The store written by one uninterrupted run is the reference every
interrupted store must equal.
"""

from __future__ import annotations

import json
import os
import random
import re
import resource
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from reliability_support import child_env, reliability_figures, tiny_extract_args, tiny_store

from extract.store import open_store
from extract.store.shards import hash_shard
from extract.store.verify import verify_store

__all__ = ["reliability_figures", "tiny_store"]

SEED = 20261204
KILLS = 21
MAX_CYCLES = 5
# Phases each run of the test must hit at least once. Under heavy load a poll can come
# too late for one of them, and the test then runs another cycle.
REQUIRED_PHASES = ("during shard 00000 (teacher running)", "after the last shard was listed")
POLL_SECONDS = 0.002
# Faults a killed run may leave: the store is incomplete, and files the manifest does not
# list wait for the rerun to delete them. Those are a shard being written or renamed, the
# temporary file safetensors itself writes a shard through (.tmpXXXXXX), and a manifest
# being replaced.
ALLOWED_AFTER_KILL = re.compile(
    r"store is incomplete: .*|unexpected file in the store: "
    r"(shards/(\d{5}\.safetensors(\.tmp)?|\.tmp\w+) \(not listed in the manifest\)|manifest\.json\.tmp)"
)


def _extract_command(teacher_path: str, small_data: tuple[Path, Path], store: Path) -> list[str]:
    return [
        sys.executable, "-m", "extract", "run", "--teacher", teacher_path, "--data", str(small_data[0]),
        "--heldout", str(small_data[1]), "--out", str(store), "--device", "cpu", "--no-progress",
        "--limit", "8", "--max-length", "64", "--layers", "0,1", "--shard-mb", "0.1",
    ]


@pytest.fixture(scope="module")
def reference_store(tmp_path_factory: pytest.TempPathFactory, teacher_path: str, small_data: tuple[Path, Path]) -> Path:
    """The store one uninterrupted run writes."""
    store = tmp_path_factory.mktemp("reference") / "store"
    done = subprocess.run(_extract_command(teacher_path, small_data, store), capture_output=True, text=True, timeout=600, env=child_env())
    assert done.returncode == 0, done.stderr
    return store


def assert_same_store(store: Path, reference: Path) -> None:
    """Check that two stores hold the same samples, shard bytes and manifest (but for creation times)."""
    manifests = [json.loads((path / "manifest.json").read_text()) for path in (store, reference)]
    for manifest in manifests:
        del manifest["created"], manifest["updated"]
    assert manifests[0] == manifests[1]
    assert sorted(os.listdir(store / "shards")) == sorted(os.listdir(reference / "shards"))
    for record in manifests[0]["shards"]:
        assert hash_shard(store / record["path"]) == hash_shard(reference / record["path"])
    with open_store(store) as mine, open_store(reference) as theirs:
        assert mine.samples == theirs.samples
        for sample_id in range(len(mine)):
            assert torch.equal(mine.read_kv(sample_id), theirs.read_kv(sample_id))
            assert torch.equal(mine.read_token_ids(sample_id), theirs.read_token_ids(sample_id))
    assert not (store / "extract.lock").exists()


@dataclass
class StoreState:
    """The state of a store directory at one poll."""

    opened: bool = False  # this run has written the manifest
    listed: int = 0
    complete: bool = False
    writing: bool = False


class StoreWatcher:
    """Polls a store while extract writes it, and checks at every poll that each listed shard is whole."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.checked: set[str] = set()
        self.first_version = self._manifest_version()
        self._parsed: tuple[tuple[int, int] | None, dict | None] = (None, None)

    def _manifest_version(self) -> tuple[int, int] | None:
        try:
            status = os.stat(self.store / "manifest.json")
        except FileNotFoundError:
            return None
        return status.st_ino, status.st_mtime_ns

    def poll(self) -> StoreState:
        try:
            names = os.listdir(self.store / "shards")
        except FileNotFoundError:
            names = []
        state = StoreState(writing=any(name.endswith(".tmp") for name in names))
        state.writing |= (self.store / "manifest.json.tmp").exists()
        version = self._manifest_version()
        if version is None:
            return state
        if self._parsed[0] != version:
            # Parse only a replaced manifest: polls come every few milliseconds.
            try:
                self._parsed = (version, json.loads((self.store / "manifest.json").read_bytes()))
            except FileNotFoundError:
                return state
        manifest = self._parsed[1]
        # A run replaces the manifest when it opens the store, before the teacher starts.
        state.opened = version is not None and version != self.first_version
        state.listed, state.complete = len(manifest["shards"]), manifest["complete"]
        for record in manifest["shards"]:
            if record["path"] not in self.checked:
                # The rename of a shard precedes the manifest that lists it: a listed shard
                # is whole at every moment (the checksum is checked after each kill).
                assert (self.store / record["path"]).stat().st_size == record["bytes"], record
                self.checked.add(record["path"])
        return state


def _phase(state: StoreState, listed_at_start: int) -> str:
    if state.complete:
        return "after the last shard was listed"
    if state.writing:
        return "while a shard file was written"
    if not state.opened:
        return "before this run opened the store"
    if state.listed == 0:
        return "during shard 00000 (teacher running)"
    if state.listed == listed_at_start:
        return "before this run finished a shard"
    return "between two shards"


def _cycle_targets(rng: random.Random, planned: int) -> list[tuple[str, int, float]]:
    """One cycle's seven kill targets, in order: (event, shard count, delay in seconds after the event).

    The first kill comes during startup. The second comes while the teacher computes shard
    00000, after this run has opened the store and before it lists a shard. Then come two
    kills while later shard files are written and two between shards, at seeded shard
    counts. The last comes after the manifest lists every shard.
    """
    counts = sorted(rng.sample(range(1, planned - 1), 4))
    events = ["writing", "writing", "listed", "listed"]
    rng.shuffle(events)
    middle = [(event, count, rng.uniform(0, 0.01)) for event, count in zip(events, counts)]
    return [
        ("started", 0, rng.uniform(0.1, 1.2)),
        ("opened", 0, rng.uniform(0, 0.05)),
        *middle,
        ("complete", planned, rng.uniform(0, 0.02)),
    ]


def _reached(event: str, count: int, state: StoreState) -> bool:
    if event == "started":
        return True
    if event == "opened":
        return state.opened
    if event == "writing":
        # A shard file exists for a few milliseconds, and the polls may miss it. Then the
        # next listed shard fires the kill, so a cycle never loses its later targets.
        return state.listed >= count and (state.writing or state.listed > count)
    if event == "listed":
        return state.listed >= count
    if event == "complete":
        return state.complete
    return False  # "never": the run finishes


def _run_until(command: list[str], store: Path, target: tuple[str, int, float], log: Path) -> tuple[bool, str, int]:
    """Start extract, SIGKILL it at ``target``; return (killed, phase seen at the kill, exit code)."""
    event, count, delay = target
    watcher = StoreWatcher(store)
    listed_at_start = watcher.poll().listed
    with open(log, "wb") as output:
        child = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=child_env())
    started = time.monotonic()
    fire_at = None
    state = StoreState()
    while child.poll() is None:
        state = watcher.poll()
        now = time.monotonic()
        if fire_at is None and _reached(event, count, state):
            fire_at = (started if event == "started" else now) + delay
        if fire_at is not None and now >= fire_at:
            child.send_signal(signal.SIGKILL)
            child.wait()
            break
        time.sleep(POLL_SECONDS)
    if child.returncode != -signal.SIGKILL:
        return False, "finished", child.returncode
    return True, _phase(state, listed_at_start), child.returncode


def _lock_holder(store: Path) -> dict | None:
    """The holder that a lock file records, or None (no file, or killed before it was written)."""
    try:
        holder = json.loads((store / "extract.lock").read_text())
    except (FileNotFoundError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _check_after_kill(store: Path, context: str) -> None:
    if not (store / "manifest.json").exists():
        # Killed before the store was created: no shard can exist yet.
        assert not list(store.glob("shards/*.safetensors")), context
        return
    report = verify_store(store, check_values=False)
    unexpected = [problem for problem in report.problems if not ALLOWED_AFTER_KILL.fullmatch(problem)]
    assert not unexpected, context


def test_sigkill_then_resume(
    teacher_path: str, small_data: tuple[Path, Path], reference_store: Path, tmp_path: Path, reliability_figures: dict[str, str]
) -> None:
    rng = random.Random(SEED)
    planned = json.loads((reference_store / "manifest.json").read_text())["plan"]["shards"]
    phases: Counter[str] = Counter()
    runs = takeovers = resumed = cycles = 0
    started = time.monotonic()
    while (sum(phases.values()) < KILLS or not all(phases[phase] for phase in REQUIRED_PHASES)) and cycles < MAX_CYCLES:
        store = tmp_path / f"store-{cycles}"
        cycles += 1
        command = _extract_command(teacher_path, small_data, store)
        for target in [*_cycle_targets(rng, planned), ("never", 0, 0.0)]:
            log = tmp_path / f"run-{runs}.log"
            lock_left = _lock_holder(store) is not None
            killed, phase, code = _run_until(command, store, target, log)
            runs += 1
            output = log.read_text()
            takeovers += "taking over the lock" in output
            resumed += "resuming: " in output
            if killed:
                phases[phase] += 1
                _check_after_kill(store, f"run {runs} killed {phase} at target {target}")
                continue
            assert code == 0, output
            assert "Traceback" not in output
            # A lock left by a killed run names a dead process, and the rerun logs that it takes over.
            assert not lock_left or "taking over the lock" in output, output
            break
        assert_same_store(store, reference_store)

    kills = sum(phases.values())
    assert kills >= 20
    for phase in REQUIRED_PHASES:
        assert phases[phase] >= 1, phases
    reliability_figures["SIGKILL test"] = (
        f"{kills} kills in {runs} runs over {cycles} stores ({planned} shards each), {resumed} runs found finished shards to resume, "
        f"{takeovers} took over a dead process's lock, {time.monotonic() - started:.0f} s"
    )
    reliability_figures["SIGKILL test, kills by phase"] = ", ".join(f"{count} {phase}" for phase, count in sorted(phases.items()))


def _file_size_limit(limit: int):
    def apply() -> None:
        # Without this, exceeding the limit sends SIGXFSZ, which kills the process: we
        # want the failed write (EFBIG) that a full disk also produces.
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_file_size_limit_then_resume(
    teacher_path: str, small_data: tuple[Path, Path], tiny_store: Path, tmp_path: Path, reliability_figures: dict[str, str]
) -> None:
    # The tiny store's shards contain several samples each, so their sizes vary. A limit
    # equal to the largest earlier size stops the first shard larger than all before it.
    # Without such a shard, the limit stops shard 00000.
    sizes = [record["bytes"] for record in json.loads((tiny_store / "manifest.json").read_text())["shards"]]
    failing = next((k for k in range(1, len(sizes)) if sizes[k] > max(sizes[:k])), 0)
    limit = max(sizes[:failing]) if failing else sizes[0] - 1
    store = tmp_path / "store"
    command = [sys.executable, "-m", "extract", *tiny_extract_args(teacher_path, small_data, store)]

    limited = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env(), preexec_fn=_file_size_limit(limit))
    assert limited.returncode == 1
    lines = limited.stderr.strip().splitlines()
    assert lines[-1] == (
        f"error: File too large ({store}/shards/{failing:05d}.safetensors.tmp); completed work is kept, fix the cause and rerun"
    )
    assert "Traceback" not in limited.stderr
    report = verify_store(store, check_values=False)
    assert [problem for problem in report.problems if not ALLOWED_AFTER_KILL.fullmatch(problem)] == []
    assert json.loads((store / "manifest.json").read_text())["shards"] == json.loads((tiny_store / "manifest.json").read_text())["shards"][:failing]

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env())
    assert rerun.returncode == 0, rerun.stderr
    if failing:
        assert f"{failing} shards resumed" in rerun.stdout
    assert_same_store(store, tiny_store)
    reliability_figures["file size limit test"] = (
        f"limit {limit} bytes per file, write of shard {failing} failed, {failing} finished shards kept and resumed"
    )


def _wait_for_lock_holder(path: Path, child: subprocess.Popen, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert child.poll() is None, "extract ended before it locked the store"
        try:
            holder = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            holder = {}
        if holder.get("pid") == child.pid:
            return holder
        time.sleep(0.01)
    raise AssertionError(f"no lock at {path} after {timeout} s")


def test_second_writer_refused_then_stale_lock_taken_over(
    teacher_path: str, small_data: tuple[Path, Path], reference_store: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    command = _extract_command(teacher_path, small_data, store)
    first = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=child_env())
    try:
        holder = _wait_for_lock_holder(store / "extract.lock", first)
        # Stopped, the first writer keeps its lock for as long as the second one needs.
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env())
        assert second.returncode == 2
        assert second.stderr.strip().splitlines()[-1] == (
            f"error: store {store} is locked by process {first.pid} on host {socket.gethostname()} "
            f"(started {holder['started']}); wait for it to finish"
        )
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()

    third = subprocess.run(command, capture_output=True, text=True, timeout=600, env=child_env())
    assert third.returncode == 0, third.stderr
    assert (
        f"taking over the lock on {store} left by process {first.pid} on host {socket.gethostname()} "
        f"(started {holder['started']}), which no longer runs"
    ) in third.stderr
    assert_same_store(store, reference_store)


def test_two_distill_runs_share_a_store(tiny_store: Path, tmp_path: Path) -> None:
    runs = [tmp_path / "run-a", tmp_path / "run-b"]
    command = [
        sys.executable, "-m", "distill", "--store", str(tiny_store), "--device", "cpu", "--steps", "3", "--batch-size", "2",
        "--eval-samples", "2", "--num-workers", "1", "--log-every", "1", "--no-progress",
    ]
    children = [
        subprocess.Popen([*command, "--out", str(run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=child_env())
        for run in runs
    ]
    outputs = [child.communicate(timeout=600) for child in children]
    for child, (stdout, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr
        assert "distill: 3 steps" in stdout
    for run in runs:
        assert len([line for line in (run / "metrics.jsonl").read_text().splitlines() if '"step"' in line]) == 3
    assert verify_store(tiny_store).ok
