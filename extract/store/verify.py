"""Full integrity check of a store: checksums, shapes, offsets, finiteness and stray files."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from extract.errors import StoreError
from extract.store import shards as shard_io
from extract.store.manifest import LOCK_NAME, MANIFEST_NAME, SHARD_DIR, Manifest, ShardRecord, read_manifest
from extract.store.reader import check_shard_index

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

    first_sample = 0
    for record in manifest.shards:
        try:
            _verify_shard(report, manifest, record, first_sample, check_values, progress)
        except StoreError as exc:
            report.problems.append(str(exc))
        except OSError as exc:
            report.problems.append(f"shard {record.path}: cannot be read ({exc.strerror or exc})")
        first_sample += record.samples
    return report


def _verify_shard(
    report: VerifyReport,
    manifest: Manifest,
    record: ShardRecord,
    first_sample: int,
    check_values: bool,
    progress: Callable[[int], None] | None,
) -> None:
    """Check one listed shard; add a fault to ``report`` or raise ``StoreError`` naming the shard."""
    shard = shard_io.shard_path_in_store(report.path, record)
    if not shard.exists():
        report.problems.append(f"shard {record.path}: missing")
        return
    report.shards_checked += 1
    # Sizes first: a shard far larger than listed is reported without reading it.
    on_disk = shard_io.shard_disk_bytes(shard)
    if on_disk != record.bytes:
        report.problems.append(f"shard {record.path}: {on_disk} bytes, the manifest lists {record.bytes}")
        return
    size, sha256 = shard_io.hash_shard(shard)
    report.bytes_checked += size
    if progress is not None:
        progress(size)
    if sha256 != record.sha256:
        report.problems.append(f"shard {record.path}: sha256 {sha256[:16]}... does not match the manifest's {record.sha256[:16]}...")
        return

    handle = shard_io.open_shard(manifest.backend, shard, manifest.layout, record)
    try:
        index = handle.index()
        check_shard_index(record, index)
        report.samples_checked += record.samples
        if check_values:
            _check_finite(
                handle, record, index, first_sample, report, manifest.layout.topk, manifest.teacher.get("vocab_size")
            )
    finally:
        handle.close()


def _stray_files(root: Path, manifest: Manifest) -> list[str]:
    listed = {record.path for record in manifest.shards}
    problems = []
    for entry in sorted(root.iterdir()):
        if entry.name in (MANIFEST_NAME, SHARD_DIR, LOCK_NAME):
            continue
        problems.append(f"unexpected file in the store: {entry.name}")
    shard_dir = root / SHARD_DIR
    if shard_dir.is_symlink():
        problems.append(f"{SHARD_DIR} is a symbolic link to {os.readlink(shard_dir)}; shards must be inside the store")
    elif shard_dir.is_dir():
        for entry in sorted(shard_dir.iterdir()):
            relative = f"{SHARD_DIR}/{entry.name}"
            if relative not in listed:
                problems.append(f"unexpected file in the store: {relative} (not listed in the manifest)")
    return problems


def _check_finite(
    handle: shard_io.ShardReader,
    record: ShardRecord,
    index: dict[str, torch.Tensor],
    first_sample: int,
    report: VerifyReport,
    topk: int,
    vocab_size: int | None,
) -> None:
    offsets = index["sample_offsets"].tolist()
    rows = index["sample_rows"].tolist()
    sources = index["sample_sources"].tolist()
    for position in range(record.samples):
        for start in range(offsets[position], offsets[position + 1], _FINITE_CHECK_TOKENS):
            stop = min(offsets[position + 1], start + _FINITE_CHECK_TOKENS)
            problem = _kv_problem(handle.read_kv(start, stop))
            if problem is None and topk:
                problem = _topk_problem(*handle.read_topk(start, stop), vocab_size)
            if problem is not None:
                report.problems.append(
                    f"shard {record.path}: sample {first_sample + position} (input source {sources[position]} "
                    f"row {rows[position]}) {problem}"
                )
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
