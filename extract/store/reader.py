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
    """Where one sample lives: its shard, its token range there, and its provenance."""

    shard: int
    start: int
    stop: int
    row: int
    source: int
    split: str

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
        self.samples: list[SampleRef] = []
        for record in self.manifest.shards:
            handle = self._open_shard(record)
            index = handle.index()
            self._check_shard_index(record, index)
            offsets = index["sample_offsets"].tolist()
            rows = index["sample_rows"].tolist()
            sources = index["sample_sources"].tolist()
            splits = index["sample_splits"].tolist()
            for i in range(record.samples):
                self.samples.append(
                    SampleRef(record.index, offsets[i], offsets[i + 1], rows[i], sources[i], SPLITS[splits[i]])
                )
            handle.close()
        self._handles: dict[int, shard_io.ShardReader] = {}

    # Pickling support for DataLoader workers.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _open_shard(self, record: ShardRecord) -> shard_io.ShardReader:
        path = self.path / record.path
        return shard_io.open_shard(self.manifest.backend, path, self.manifest.layout, record)

    def _check_shard_index(self, record: ShardRecord, index: dict[str, torch.Tensor]) -> None:
        offsets = index["sample_offsets"]
        if offsets.shape != (record.samples + 1,):
            raise StoreError(f"shard {record.path}: has {offsets.shape[0] - 1} samples, manifest says {record.samples}")
        if int(offsets[0]) != 0 or int(offsets[-1]) != record.tokens or bool((offsets[1:] <= offsets[:-1]).any()):
            raise StoreError(f"shard {record.path}: sample offsets are not increasing from 0 to {record.tokens}")
        splits = index["sample_splits"]
        if bool((splits >= len(SPLITS)).any()):
            raise StoreError(f"shard {record.path}: unknown split code in sample_splits")
        counts = {name: int((splits == code).sum()) for code, name in enumerate(SPLITS)}
        if any(counts.get(name, 0) != record.splits.get(name, 0) for name in SPLITS):
            raise StoreError(f"shard {record.path}: split counts {counts} disagree with the manifest's {record.splits}")

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

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles.clear()

    def __enter__(self) -> "KVStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_store(path: str | os.PathLike[str], *, allow_partial: bool = False) -> KVStore:
    """Open a store for reading; raise ``StoreError`` with a one-line reason if it is unusable."""
    return KVStore(path, allow_partial=allow_partial)


