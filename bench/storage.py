"""Benchmark 5, storage options: bytes per token, write time and cold read time of each store format.

Each option stores the same random K/V in the Qwen2.5-14B per-token shape. Raw size is
layers x 2 x KV heads x head_dim x dtype bytes per token. Writes go through the
project's ``StoreWriter`` (serialise, fsync, sha256, manifest), and the reference is
``numpy.tofile`` plus fsync of the same K/V bytes. Reads go through ``KVStore.read_kv``
sample by sample, and the reference reads the store's files into a reused buffer. Both
reads start with the pages evicted.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import torch

from bench.common import Row, Section, drop_page_cache, files_under, measure_pairs
from bench.fixtures import Fixtures
from bench.models import qwen14b_layout
from bench.store_read import raw_pass
from bench.stores import random_store, sample_lengths, write_store
from extract.models import load_tokenizer, tokenizer_fingerprint
from extract.store import open_store

OPTIONS = (("safetensors", "float32"), ("safetensors", "bfloat16"), ("safetensors", "float16"), ("zarr", "bfloat16"))
SAMPLES, SMOKE_SAMPLES = 4, 2
SAMPLE_TOKENS, SMOKE_SAMPLE_TOKENS = (200, 300), (16, 24)


def _raw_write(path: Path, shards: list) -> float:
    started = time.perf_counter()
    with open(path, "wb") as handle:
        for contents in shards:
            contents.kv.view(torch.uint8).numpy().tofile(handle)
        handle.flush()
        os.fsync(handle.fileno())
    return time.perf_counter() - started


def _store_read(store_path: Path) -> float:
    started = time.perf_counter()
    with open_store(store_path) as store:
        for sample_id in range(len(store)):
            store.read_kv(sample_id)
    return time.perf_counter() - started


def _bench_option(fixtures: Fixtures, backend: str, dtype: str, fingerprint: str, vocab: int) -> list[Row]:
    ctx = fixtures.ctx
    layout = qwen14b_layout(dtype)
    low, high = SMOKE_SAMPLE_TOKENS if ctx.smoke else SAMPLE_TOKENS
    lengths = sample_lengths(SMOKE_SAMPLES if ctx.smoke else SAMPLES, low, high, seed=5)
    manifest, shards = random_store(
        layout=layout, lengths=lengths, backend=backend, shard_bytes=2**40, tokenizer_fingerprint=fingerprint, vocab_size=vocab, seed=5
    )
    root = ctx.scratch(f"storage-{backend}-{dtype}")
    store_path, raw_path = root / "store", root / "raw.bin"
    tokens = sum(lengths)

    def store_write() -> float:
        if store_path.exists():
            shutil.rmtree(store_path)
        started = time.perf_counter()
        write_store(store_path, manifest, shards)
        return time.perf_counter() - started

    def raw_write() -> float:
        raw_path.unlink(missing_ok=True)
        return _raw_write(raw_path, shards)

    label = f"{backend} {dtype}"
    writes = measure_pairs(store_write, raw_write, ctx.pairs, label=f"storage write {label}")
    files = files_under([store_path])

    def store_read() -> float:
        drop_page_cache(files)
        return _store_read(store_path)

    def raw_read() -> float:
        drop_page_cache(files)
        return raw_pass(files)[0]

    reads = measure_pairs(store_read, raw_read, ctx.pairs, label=f"storage read {label}")
    on_disk = sum(p.stat().st_size for p in files)
    shard_bytes = sum(p.stat().st_size for p in files_under([store_path / "shards"]))
    raw_per_token = layout.bytes_per_token
    size_ratio = on_disk / tokens / raw_per_token
    shutil.rmtree(root)
    compressor = "; the writer has no compressor option" if backend == "zarr" else ""
    return [
        Row(
            benchmark="5 storage",
            case=f"{label}: size",
            measured=f"{on_disk / tokens:,.0f} B/token on disk ({shard_bytes / tokens:,.0f} in shards)",
            reference=f"{raw_per_token:,} B/token raw",
            ratio_text=f"{size_ratio:.4f}",
            note=f"{tokens} tokens in {len(lengths)} samples, one shard{compressor}",
        ),
        Row(
            benchmark="5 storage",
            case=f"{label}: write",
            measured=f"{writes.median_a:.3f} s ({on_disk / writes.median_a / 1e9:.2f} GB/s) StoreWriter",
            reference=f"{writes.median_b:.3f} s numpy tofile + fsync",
            paired=writes,
            note="time ratio: above 1 is slower than raw",
        ),
        Row(
            benchmark="5 storage",
            case=f"{label}: cold read",
            measured=f"{reads.median_a:.3f} s ({on_disk / reads.median_a / 1e9:.2f} GB/s) KVStore.read_kv",
            reference=f"{reads.median_b:.3f} s raw read",
            paired=reads,
            note="time ratio: above 1 is slower than raw",
        ),
    ]


def run(fixtures: Fixtures) -> Section:
    section = Section("5. Storage: bytes per token, write and read time per format")
    tokenizer = load_tokenizer(str(fixtures.teacher_dir()))
    fingerprint = tokenizer_fingerprint(tokenizer)
    for backend, dtype in OPTIONS:
        section.rows.extend(_bench_option(fixtures, backend, dtype, fingerprint, len(tokenizer)))
    section.facts.append("raw size: layers x 2 x KV heads x head_dim x dtype bytes per token, Qwen2.5-14B shapes (48 x 2 x 8 x 128)")
    section.facts.append("the zarr backend stores bf16 as uint16 bits; zarr-python 3.1 has no bfloat16 dtype")
    return section
