"""Full integrity check of a store: checksums, shapes, offsets, finiteness and stray files."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from extract.errors import StoreError
from extract.store import shards as shard_io
from extract.store.manifest import LOCK_NAME, MANIFEST_NAME, SHARD_DIR, Manifest, read_manifest
from extract.store.reader import KVStore

logger = logging.getLogger(__name__)

# Samples are checked for NaN/Inf this many tokens at a time, to bound memory.
_FINITE_CHECK_TOKENS = 4096


@dataclass
class VerifyReport:
    """What ``verify_store`` found: one line per fault, plus what was checked."""

    path: Path
    problems: list[str] = field(default_factory=list)
    shards_checked: int = 0
    samples_checked: int = 0
    bytes_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_store(
    path: str | Path,
    *,
    check_values: bool = True,
    progress: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Re-check every shard of the store at ``path`` against its manifest.

    Checks, per listed shard: presence, byte size and sha256; the header's arrays, dtypes
    and shapes; sample offsets, split counts and answer starts; and (``check_values``)
    that every stored key and value is finite and that stored top-k log-probabilities are
    finite, at most 0 and sorted, with ids inside the teacher's vocabulary. Also reports
    an incomplete store and files that the store does not list. ``progress`` receives
    the bytes hashed so far, shard by shard.
    """
    report = VerifyReport(Path(path))
    try:
        manifest = read_manifest(report.path)
    except StoreError as exc:
        report.problems.append(str(exc))
        return report

    if not manifest.complete:
        report.problems.append(
            f"store is incomplete: {len(manifest.shards)} of {manifest.planned_shards} planned shards written"
        )
    report.problems.extend(_stray_files(report.path, manifest))

    intact = []
    for record in manifest.shards:
        shard = report.path / record.path
        if not shard.exists():
            report.problems.append(f"shard {record.path}: missing")
            continue
        if shard.is_symlink():
            report.problems.append(f"shard {record.path}: is a symbolic link")
            continue
        size, sha256 = shard_io.hash_shard(shard)
        report.bytes_checked += size
        if progress is not None:
            progress(size)
        if size != record.bytes:
            report.problems.append(f"shard {record.path}: {size} bytes, the manifest lists {record.bytes}")
        elif sha256 != record.sha256:
            report.problems.append(f"shard {record.path}: sha256 {sha256[:16]}... does not match the manifest's {record.sha256[:16]}...")
        else:
            intact.append(record.index)
        report.shards_checked += 1

    if not intact:
        return report
    try:
        store = KVStore(report.path, allow_partial=True)
    except StoreError as exc:
        report.problems.append(str(exc))
        return report
    with store:
        if check_values:
            _check_finite(store, set(intact), report)
        report.samples_checked = sum(1 for ref in store.samples if ref.shard in intact)
    return report


def _stray_files(root: Path, manifest: Manifest) -> list[str]:
    listed = {record.path for record in manifest.shards}
    problems = []
    for entry in sorted(root.iterdir()):
        if entry.name in (MANIFEST_NAME, SHARD_DIR, LOCK_NAME):
            continue
        problems.append(f"unexpected file in the store: {entry.name}")
    shard_dir = root / SHARD_DIR
    if shard_dir.is_dir():
        for entry in sorted(shard_dir.iterdir()):
            relative = f"{SHARD_DIR}/{entry.name}"
            if relative not in listed:
                problems.append(f"unexpected file in the store: {relative} (not listed in the manifest)")
    return problems


def _check_finite(store: KVStore, shards: set[int], report: VerifyReport) -> None:
    vocab_size = store.manifest.teacher.get("vocab_size")
    for sample_id, ref in enumerate(store.samples):
        if ref.shard not in shards:
            continue
        handle = store._handle(ref.shard)
        for start in range(ref.start, ref.stop, _FINITE_CHECK_TOKENS):
            stop = min(ref.stop, start + _FINITE_CHECK_TOKENS)
            problem = _kv_problem(handle.read_kv(start, stop))
            if problem is None and store.topk:
                problem = _topk_problem(*handle.read_topk(start, stop), vocab_size)
            if problem is not None:
                record = store.manifest.shards[ref.shard]
                report.problems.append(f"shard {record.path}: sample {sample_id} (input row {ref.row}) {problem}")
                break


def _kv_problem(rows: torch.Tensor) -> str | None:
    return None if bool(torch.isfinite(rows).all()) else "contains NaN or Inf values"


def _topk_problem(ids: torch.Tensor, logprobs: torch.Tensor, vocab_size: int | None) -> str | None:
    """Describe the first fault of a top-k block: non-finite or positive log-probabilities, bad order, ids out of range."""
    if not bool(torch.isfinite(logprobs).all()):
        return "has NaN or Inf in topk_logprobs"
    if bool((logprobs > 0).any()):
        return "has a positive value in topk_logprobs (log-probabilities are at most 0)"
    if bool((logprobs[:, 1:] > logprobs[:, :-1]).any()):
        return "has topk_logprobs rows that are not sorted in descending order"
    upper = vocab_size if isinstance(vocab_size, int) else torch.iinfo(torch.int32).max
    if bool(((ids < 0) | (ids >= upper)).any()):
        return f"has topk_ids outside the teacher's vocabulary 0..{upper - 1}"
    return None
