"""Create or resume a store and append shards to it, crash-safely."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from extract.errors import StoreError
from extract.store import shards as shard_io
from extract.store.manifest import (
    LOCK_NAME,
    MANIFEST_NAME,
    SHARD_DIR,
    SPLITS,
    KVLayout,
    Manifest,
    ShardRecord,
    read_manifest,
    utc_now,
    write_manifest,
)

logger = logging.getLogger(__name__)


def _differences(stored: Any, requested: Any, where: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(stored, dict) and isinstance(requested, dict):
        found = []
        for key in sorted(set(stored) | set(requested)):
            found += _differences(stored.get(key), requested.get(key), f"{where}.{key}" if where else key)
        return found
    if isinstance(stored, (list, tuple)) and isinstance(requested, (list, tuple)):
        stored, requested = list(stored), list(requested)
    return [] if stored == requested else [(where, stored, requested)]


def _readable_first(differences: list[tuple[str, Any, Any]]) -> tuple[str, Any, Any]:
    """Prefer an option a user typed over the digests derived from it."""
    derived = ("sha256", "fingerprint", "identity")
    plain = [d for d in differences if not any(word in d[0] for word in derived)]
    return (plain or differences)[0]


def _check_optional_arrays(index: int, contents: shard_io.ShardContents, layout: KVLayout) -> None:
    """Raise RuntimeError unless the shard carries exactly the optional arrays the layout names, in their shapes."""
    samples, tokens = int(contents.sample_rows.shape[0]), int(contents.kv.shape[0])
    answer_starts = contents.sample_answer_starts
    if (answer_starts is not None) != layout.answer_starts:
        raise RuntimeError(
            f"shard {index}: has sample_answer_starts={answer_starts is not None}, the layout has answer_starts={layout.answer_starts}"
        )
    if answer_starts is not None and tuple(answer_starts.shape) != (samples,):
        raise RuntimeError(f"shard {index}: sample_answer_starts has shape {tuple(answer_starts.shape)}, expected ({samples},)")
    for name in shard_io.TOPK_ARRAYS:
        tensor = getattr(contents, name)
        if (tensor is not None) != bool(layout.topk):
            raise RuntimeError(f"shard {index}: has {name}={tensor is not None}, the layout has topk={layout.topk}")
        if tensor is not None and tuple(tensor.shape) != (tokens, layout.topk):
            raise RuntimeError(f"shard {index}: {name} has shape {tuple(tensor.shape)}, expected ({tokens}, {layout.topk})")


class StoreWriter:
    """Create a store, or resume one written by the same configuration, and add shards to it."""

    def __init__(self, path: Path, manifest: Manifest, *, zarr_chunk_tokens: int = shard_io.ZARR_CHUNK_TOKENS) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.zarr_chunk_tokens = zarr_chunk_tokens

    @classmethod
    def create_or_resume(cls, path: str | os.PathLike[str], requested: Manifest, **kwargs: Any) -> "StoreWriter":
        """Open ``path`` for writing ``requested``; resume its finished shards if it was started by the same configuration."""
        path = Path(path)
        manifest_path = path / MANIFEST_NAME
        if manifest_path.exists():
            stored = read_manifest(path)
            differences = _differences(stored.identity(), requested.identity())
            if differences:
                field_name, old, new = _readable_first(differences)
                more = f" (and {len(differences) - 1} more fields)" if len(differences) > 1 else ""
                raise StoreError(
                    f"store {path} was written with {field_name}={json.dumps(old)} but this run has "
                    f"{json.dumps(new)}{more}; write to a new --out directory or rerun with the store's options"
                )
            writer = cls(path, stored, **kwargs)
            writer._check_finished_shards()
        else:
            # A crash while the first manifest was written leaves only these names behind.
            leftovers = (SHARD_DIR, LOCK_NAME, MANIFEST_NAME + ".tmp")
            if path.exists() and any(p.name not in leftovers for p in path.iterdir()):
                raise StoreError(f"{path} exists and is not a KV store (no {MANIFEST_NAME}); choose an empty or new --out")
            requested.created = utc_now()
            writer = cls(path, requested, **kwargs)
        if (path / SHARD_DIR).is_symlink():
            raise StoreError(
                f"{path / SHARD_DIR} is a symbolic link; shards must be inside the store (link the whole store directory instead)"
            )
        (path / SHARD_DIR).mkdir(parents=True, exist_ok=True)
        writer._remove_unlisted_files()
        write_manifest(path, writer.manifest)
        return writer

    def _check_finished_shards(self) -> None:
        for record in self.manifest.shards:
            shard = shard_io.shard_path_in_store(self.path, record)
            if not shard.exists():
                raise StoreError(f"store {self.path}: finished shard {record.path} is missing; run `python -m extract verify` and restore or re-extract it")
            # Sizes only: hashing every finished shard would make each resume reread the store.
            size = shard_io.shard_disk_bytes(shard)
            if size != record.bytes:
                raise StoreError(
                    f"store {self.path}: finished shard {record.path} has {size} bytes, the manifest lists {record.bytes}; "
                    "run `python -m extract verify` and restore or re-extract it"
                )

    def _remove_unlisted_files(self) -> None:
        """Delete temporary files and shards that a crash left behind before the manifest listed them."""
        listed = {record.path for record in self.manifest.shards}
        for entry in sorted((self.path / SHARD_DIR).iterdir()):
            relative = f"{SHARD_DIR}/{entry.name}"
            if relative not in listed:
                logger.info("removing unfinished shard %s", relative)
                shard_io.remove_path(entry)
        (self.path / (MANIFEST_NAME + ".tmp")).unlink(missing_ok=True)

    @property
    def finished_shards(self) -> int:
        return len(self.manifest.shards)

    def shard_path(self, index: int) -> str:
        return f"{SHARD_DIR}/{index:05d}{shard_io.BACKENDS[self.manifest.backend]}"

    def write_shard(self, index: int, contents: shard_io.ShardContents) -> ShardRecord:
        """Write shard ``index`` (the next one in plan order) and list it in the manifest."""
        if index != len(self.manifest.shards):
            raise RuntimeError(f"shard {index} written out of order; the manifest lists {len(self.manifest.shards)} shards")
        layout = self.manifest.layout
        expected = (contents.kv.shape[0], *layout.token_shape)
        if tuple(contents.kv.shape) != expected or contents.kv.dtype != shard_io.torch_dtype(layout.dtype):
            raise RuntimeError(f"shard {index}: kv {tuple(contents.kv.shape)} {contents.kv.dtype} does not match the layout {expected} {layout.dtype}")
        _check_optional_arrays(index, contents, layout)
        relative = self.shard_path(index)
        size, sha256 = shard_io.write_shard(
            self.manifest.backend, self.path / relative, contents, zarr_chunk_tokens=self.zarr_chunk_tokens
        )
        splits = {name: int((contents.sample_splits == code).sum()) for code, name in enumerate(SPLITS)}
        record = ShardRecord(
            index=index,
            path=relative,
            samples=int(contents.sample_rows.shape[0]),
            tokens=int(contents.kv.shape[0]),
            bytes=size,
            sha256=sha256,
            splits=splits,
        )
        self.manifest.shards.append(record)
        write_manifest(self.path, self.manifest)
        return record

    def finish(self) -> Manifest:
        if len(self.manifest.shards) != self.manifest.planned_shards:
            raise RuntimeError(f"finish() with {len(self.manifest.shards)} of {self.manifest.planned_shards} shards")
        self.manifest.complete = True
        write_manifest(self.path, self.manifest)
        return self.manifest
