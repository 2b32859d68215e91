"""Read-only access to a store, one sample at a time."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from extract.errors import StoreError
from extract.store import shards as shard_io
from extract.store.manifest import SPLITS, Manifest, ShardRecord, read_manifest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SampleRef:
    """Where one sample lives: its shard, its token range there, and its provenance.

    ``answer_start`` counts from the sample's first token; it is 0 in stores that do not
    record answer starts.
    """

    shard: int
    start: int
    stop: int
    row: int
    source: int
    split: str
    answer_start: int = 0

    @property
    def length(self) -> int:
        return self.stop - self.start


class KVStore:
    """Read-only access to a complete (or, on request, partial) store.

    Opening validates the manifest and every listed shard's header against it, so a
    damaged or foreign store is rejected before any training starts. Shard data is read
    lazily, one sample at a time; checksums are checked by ``verify_store``.
    Instances can be pickled into DataLoader workers: open shard handles are dropped and
    reopened on first use in the new process.
    """

    def __init__(self, path: str | os.PathLike[str], *, allow_partial: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise StoreError(f"store not found: {self.path} is not a directory")
        self.manifest = read_manifest(self.path)
        if not self.manifest.complete and not allow_partial:
            raise StoreError(
                f"store {self.path} is incomplete: {len(self.manifest.shards)} of "
                f"{self.manifest.planned_shards} shards written; rerun the same extract command to finish it"
            )
        if not self.manifest.layout.answer_starts:
            logger.warning(
                "store %s records no answer starts (written before they existed); every token counts as an "
                "answer token. Re-extract it to get answer spans.",
                self.path,
            )
        self.samples: list[SampleRef] = []
        for record in self.manifest.shards:
            handle = self._open_shard(record)
            try:
                index = handle.index()
                check_shard_index(record, index)
            finally:
                handle.close()
            offsets = index["sample_offsets"].tolist()
            rows = index["sample_rows"].tolist()
            sources = index["sample_sources"].tolist()
            splits = index["sample_splits"].tolist()
            answer_starts = index[shard_io.ANSWER_STARTS].tolist() if shard_io.ANSWER_STARTS in index else [0] * record.samples
            for i in range(record.samples):
                self.samples.append(
                    SampleRef(record.index, offsets[i], offsets[i + 1], rows[i], sources[i], SPLITS[splits[i]], answer_starts[i])
                )
        self._handles: dict[int, shard_io.ShardReader] = {}

    # Pickling support for DataLoader workers.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _open_shard(self, record: ShardRecord) -> shard_io.ShardReader:
        path = shard_io.shard_path_in_store(self.path, record)
        return shard_io.open_shard(self.manifest.backend, path, self.manifest.layout, record)

    def __len__(self) -> int:
        return len(self.samples)

    def sample_ids(self, split: str | None = None) -> list[int]:
        if split is not None and split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return [i for i, ref in enumerate(self.samples) if split is None or ref.split == split]

    def _handle(self, shard: int) -> shard_io.ShardReader:
        handle = self._handles.get(shard)
        if handle is None:
            # Bound the number of open shards so file handles stay few on huge stores.
            if len(self._handles) >= 8:
                oldest = next(iter(self._handles))
                self._handles.pop(oldest).close()
            handle = self._open_shard(self.manifest.shards[shard])
            self._handles[shard] = handle
        return handle

    def read_kv(self, sample_id: int) -> torch.Tensor:
        """Return one sample's key/value rows, shaped [tokens, layers, 2, kv_heads, head_dim]."""
        ref = self.samples[sample_id]
        return self._handle(ref.shard).read_kv(ref.start, ref.stop)

    def read_kv_into(self, sample_id: int, out: torch.Tensor) -> None:
        """Read one sample's key/value rows into ``out``, a contiguous [tokens, layers, 2, kv_heads, head_dim] tensor."""
        ref = self.samples[sample_id]
        self._handle(ref.shard).read_kv_into(out, ref.start, ref.stop)

    def prefetch_kv(self, sample_id: int) -> None:
        """Start reading one sample's key/value rows into the page cache, without waiting for the disk."""
        ref = self.samples[sample_id]
        self._handle(ref.shard).prefetch_kv(ref.start, ref.stop)

    def read_token_ids(self, sample_id: int) -> torch.Tensor:
        ref = self.samples[sample_id]
        return self._handle(ref.shard).read_token_ids(ref.start, ref.stop)

    @property
    def topk(self) -> int:
        """K of the stored teacher top-k log-probabilities; 0 when the store has none."""
        return self.manifest.layout.topk

    def read_answer_start(self, sample_id: int) -> int:
        """Return the index of the sample's first answer token, counted from its first token.

        It is 0 for plain-text rows (every token is a target), the sample's length when
        truncation cut the answer off, and 0 for every sample of a store written before
        answer starts were recorded. Read from the index loaded at open; no shard I/O.
        """
        return self.samples[sample_id].answer_start

    def read_topk(self, sample_id: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Return the sample's teacher top-k (ids int32 [tokens, K], log-probabilities float32 [tokens, K]), or None.

        Row t contains the K most likely tokens to follow token t, sorted by descending
        log-probability. None when the store was extracted without --topk-logprobs.
        """
        if not self.topk:
            return None
        ref = self.samples[sample_id]
        return self._handle(ref.shard).read_topk(ref.start, ref.stop)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_shard_index(record: ShardRecord, index: dict[str, torch.Tensor]) -> None:
    """Check a shard's sample index against its manifest record; raise ``StoreError`` naming the shard."""
    offsets = index["sample_offsets"]
    if offsets.shape != (record.samples + 1,):
        raise StoreError(f"shard {record.path}: has {offsets.shape[0] - 1} samples, the manifest lists {record.samples}")
    if int(offsets[0]) != 0 or int(offsets[-1]) != record.tokens or bool((offsets[1:] <= offsets[:-1]).any()):
        raise StoreError(f"shard {record.path}: sample offsets are not increasing from 0 to {record.tokens}")
    splits = index["sample_splits"]
    if bool((splits >= len(SPLITS)).any()):
        raise StoreError(f"shard {record.path}: unknown split code in sample_splits")
    counts = {name: int((splits == code).sum()) for code, name in enumerate(SPLITS)}
    if any(counts.get(name, 0) != record.splits.get(name, 0) for name in SPLITS):
        raise StoreError(f"shard {record.path}: split counts {counts} disagree with the manifest's {record.splits}")
    answer_starts = index.get(shard_io.ANSWER_STARTS)
    if answer_starts is not None:
        lengths = offsets[1:] - offsets[:-1]
        outside = ((answer_starts < 0) | (answer_starts > lengths)).nonzero().flatten().tolist()
        if outside:
            sample = outside[0]
            raise StoreError(
                f"shard {record.path}: sample {sample} has answer start {int(answer_starts[sample])} "
                f"outside its 0..{int(lengths[sample])} tokens; the shard is damaged"
            )


def open_store(path: str | os.PathLike[str], *, allow_partial: bool = False) -> KVStore:
    """Open a store for reading; raise ``StoreError`` with a one-line reason if it is unusable."""
    return KVStore(path, allow_partial=allow_partial)


