"""Stores of random K/V written with the project's own writer, for read and memory benchmarks."""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from extract import __version__
from extract.store import SPLITS, KVLayout, Manifest, ShardContents, StoreWriter
from extract.store.shards import torch_dtype

# Random bytes are generated once per store and reused, rotated, for every shard: the
# readers never look at the values, and generating gigabytes of normals would cost more
# than writing them.
_POOL_BYTES = 64 * 2**20


def sample_lengths(count: int, low: int, high: int, seed: int) -> list[int]:
    """Seeded uniform sample lengths in [low, high]."""
    draw = random.Random(seed)
    return [draw.randint(low, high) for _ in range(count)]


def lengths_for_bytes(total_bytes: int, bytes_per_token: int, low: int, high: int, seed: int) -> list[int]:
    """Seeded sample lengths in [low, high] whose tokens add up to at least ``total_bytes``."""
    draw = random.Random(seed)
    lengths: list[int] = []
    while sum(lengths) * bytes_per_token < total_bytes:
        lengths.append(draw.randint(low, high))
    return lengths


def random_store(
    *,
    layout: KVLayout,
    lengths: Sequence[int],
    backend: str,
    shard_bytes: int,
    tokenizer_fingerprint: str,
    vocab_size: int,
    seed: int = 0,
) -> tuple[Manifest, list[ShardContents]]:
    """Build the manifest and shard contents of a store of random K/V and token ids; every tenth sample is held out.

    The manifest's teacher block names no real checkpoint (``name_or_path`` is
    ``random``), so only a student and readers can use the store, not an online teacher.
    """
    generator = torch.Generator().manual_seed(seed)
    shards = _plan(lengths, layout.bytes_per_token, shard_bytes)
    manifest = Manifest(
        backend=backend,
        layout=layout,
        teacher={
            "name_or_path": "random",
            "identity": {"kind": "name", "value": f"random-kv-seed-{seed}"},
            "model_type": "random",
            "num_hidden_layers": len(layout.layers),
            "num_key_value_heads": layout.num_kv_heads,
            "head_dim": layout.head_dim,
        },
        tokenizer={"fingerprint": tokenizer_fingerprint, "size": vocab_size},
        dataset={"fingerprint": f"random-seed-{seed}", "max_length": max(lengths)},
        plan={"shards": len(shards), "shard_bytes": shard_bytes, "samples": len(lengths), "tokens": sum(lengths)},
        package_version=__version__,
    )
    dtype = torch_dtype(layout.dtype)
    pool = torch.randn(_POOL_BYTES // torch.empty((), dtype=dtype).element_size(), generator=generator).to(dtype)
    contents = []
    first_sample = 0
    for index, shard_lengths in enumerate(shards):
        tokens = sum(shard_lengths)
        kv = torch.empty((tokens, *layout.token_shape), dtype=dtype)
        _fill_from_pool(kv.view(-1), pool, shift=index * 7919)
        offsets = [0]
        for length in shard_lengths:
            offsets.append(offsets[-1] + length)
        sample_ids = range(first_sample, first_sample + len(shard_lengths))
        contents.append(
            ShardContents(
                kv=kv,
                token_ids=torch.randint(1, vocab_size, (tokens,), generator=generator, dtype=torch.int32),
                sample_offsets=torch.tensor(offsets, dtype=torch.int64),
                sample_rows=torch.tensor(list(sample_ids), dtype=torch.int64),
                sample_sources=torch.zeros(len(shard_lengths), dtype=torch.uint8),
                sample_splits=torch.tensor([SPLITS.index("heldout") if i % 10 == 9 else 0 for i in sample_ids], dtype=torch.uint8),
                sample_answer_starts=torch.zeros(len(shard_lengths), dtype=torch.int64),
            )
        )
        first_sample += len(shard_lengths)
    return manifest, contents


def write_store(out: Path, manifest: Manifest, shards: Sequence[ShardContents], *, zarr_chunk_tokens: int = 128) -> Path:
    """Write a complete store with the project's ``StoreWriter``: every shard, then the finished manifest."""
    writer = StoreWriter.create_or_resume(out, copy.deepcopy(manifest), zarr_chunk_tokens=zarr_chunk_tokens)
    for index, contents in enumerate(shards):
        writer.write_shard(index, contents)
    writer.finish()
    return out


def write_random_store(out: Path, *, zarr_chunk_tokens: int = 128, **spec: Any) -> Path:
    """Write a store of random K/V; ``spec`` is the keyword arguments of ``random_store``."""
    manifest, shards = random_store(**spec)
    return write_store(out, manifest, shards, zarr_chunk_tokens=zarr_chunk_tokens)


def _plan(lengths: Sequence[int], bytes_per_token: int, shard_bytes: int) -> list[list[int]]:
    shards: list[list[int]] = [[]]
    tokens = 0
    for length in lengths:
        if shards[-1] and (tokens + length) * bytes_per_token > shard_bytes:
            shards.append([])
            tokens = 0
        shards[-1].append(length)
        tokens += length
    return shards


def _fill_from_pool(flat: torch.Tensor, pool: torch.Tensor, shift: int) -> None:
    done = 0
    start = shift % pool.numel()
    while done < flat.numel():
        count = min(flat.numel() - done, pool.numel() - start)
        flat[done : done + count] = pool[start : start + count]
        done += count
        start = 0
