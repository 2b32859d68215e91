"""Benchmark 2, store read: the distill data loader against raw sequential reads of the same files.

The store contains random K/V in the Qwen2.5-14B per-token shape (48 layers x 2 x 8 KV
heads x 128, bf16: 192 KiB per token) and is written with the project's writer. Each
side reads every byte of the store once per pass. The loader reads as training does:
random sample order, batches of 4, reading ahead in a background thread. The reference
reads the shard files in order into one reused buffer. Cold passes first evict the
files from the page cache.
"""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import numpy as np

from bench.common import BenchContext, Row, Section, Target, drop_page_cache, files_under, logger, measure_pairs, resident_fraction
from bench.fixtures import Fixtures
from bench.models import qwen14b_layout, tokenizer_dir
from bench.stores import lengths_for_bytes, write_random_store
from distill.stream import KVSampleDataset, training_loader
from extract.models import load_tokenizer, tokenizer_fingerprint
from extract.store import open_store

GIB = 2**30
RAW_BLOCK_BYTES = 64 * 2**20
# Sample lengths are drawn uniformly. GSM8K problems with their solutions average about 250 tokens.
SAMPLE_TOKENS, SMOKE_SAMPLE_TOKENS = (150, 350), (20, 40)
READ_LIMIT = (
    "the loader reads samples in random order and zero-fills each batch's padding rows, while the "
    "reference reads the files front to back. A new batch buffer costs page faults and a kernel "
    "zero-fill, so the loader reuses its buffers (distill.stream.BufferPool) once the training step has "
    "dropped a batch; if a caller keeps batches, new buffers are allocated and reads slow down."
)
TARGETS = {"safetensors": Target(">=", 0.8), "zarr": Target(">=", 0.5)}


def choose_store_bytes(ctx: BenchContext, wanted: int) -> tuple[int, str]:
    """Return the store size to write: ``wanted``, or less when the disk has little room."""
    free = shutil.disk_usage(ctx.workdir).free
    # One store at a time, plus room for the raw reference's buffers and other users.
    affordable = int(free * 0.4)
    if affordable >= wanted:
        return wanted, f"{wanted / GIB:.2f} GiB ({free / GIB:.0f} GiB free on the disk)"
    return affordable, f"{affordable / GIB:.2f} GiB, reduced from {wanted / GIB:.2f} GiB: only {free / GIB:.1f} GiB free"


def loader_pass(dataset: KVSampleDataset, batch_size: int, seed: int) -> tuple[float, int, int]:
    """Read every sample once through the training loader; return (seconds, samples, K/V bytes).

    Passes share ``dataset``, as the epochs of one training run do, so its batch
    buffers are allocated in the first pass and reused after.
    """
    steps = max(1, len(dataset) // batch_size)
    bytes_per_token = dataset.store.manifest.layout.bytes_per_token
    started = time.perf_counter()
    loader = training_loader(dataset, batch_size=batch_size, steps=steps, seed=seed, num_workers=1)
    samples = tokens = 0
    for batch in loader:
        samples += batch.sample_ids.shape[0]
        tokens += int(batch.attention_mask.sum())
    seconds = time.perf_counter() - started
    return seconds, samples, tokens * bytes_per_token


def raw_pass(files: list[Path]) -> tuple[float, int]:
    """Read the files in order, in blocks, into one reused buffer; return (seconds, bytes).

    The buffer is allocated by numpy, so it gets huge pages like the loader's buffers.
    It is faulted in before the clock starts, so the time covers only the copy out of
    the page cache and, when cold, the disk read.
    """
    buffer = np.ones(RAW_BLOCK_BYTES, dtype=np.uint8)
    view = memoryview(buffer)
    started = time.perf_counter()
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as handle:
            while count := handle.readinto(view):
                total += count
    return time.perf_counter() - started, total


def _bench_backend(ctx: BenchContext, backend: str, store_bytes: int, section: Section) -> None:
    layout = qwen14b_layout()
    root = ctx.scratch(f"store-read-{backend}")
    store_path = root / "store"
    if store_path.exists():
        shutil.rmtree(store_path)
    tokenizer = load_tokenizer(str(tokenizer_dir()))
    low, high = SMOKE_SAMPLE_TOKENS if ctx.smoke else SAMPLE_TOKENS
    lengths = lengths_for_bytes(store_bytes, layout.bytes_per_token, low, high, seed=2)
    started = time.perf_counter()
    write_random_store(
        store_path, layout=layout, lengths=lengths, backend=backend, shard_bytes=min(store_bytes // 4 + 1, GIB),
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer), seed=2,
    )
    logger.info("wrote %s store of %d samples in %.1f s", backend, len(lengths), time.perf_counter() - started)
    files = files_under([store_path / "shards"])
    on_disk = sum(p.stat().st_size for p in files)
    samples_seen: list[float] = []
    resident: dict[str, list[float]] = {"cold": [], "warm": []}
    store = open_store(store_path)
    dataset = KVSampleDataset(store, store.sample_ids())
    loader_pass(dataset, 4, seed=0)  # the first pass allocates the batch buffers

    def loader_side(cold: bool) -> float:
        if cold:
            drop_page_cache(files)
        resident["cold" if cold else "warm"].append(resident_fraction(files))
        seconds, samples, nbytes = loader_pass(dataset, 4, seed=len(samples_seen) + 1)
        samples_seen.append(samples / seconds)
        return nbytes / seconds / 1e9

    def raw_side(cold: bool) -> float:
        if cold:
            drop_page_cache(files)
        resident["cold" if cold else "warm"].append(resident_fraction(files))
        seconds, nbytes = raw_pass(files)
        return nbytes / seconds / 1e9

    for mode in ("cold", "warm"):
        cold = mode == "cold"
        if not cold:
            raw_pass(files)  # fill the page cache
        samples_seen.clear()
        paired = measure_pairs(lambda: loader_side(cold), lambda: raw_side(cold), ctx.pairs, label=f"store read {backend} {mode}")
        in_cache = resident[mode]
        section.rows.append(
            Row(
                benchmark="2 store read",
                case=f"{backend}, {mode} ({min(in_cache):.0%}-{max(in_cache):.0%} of pages cached before each pass)",
                measured=f"loader {paired.median_a:.2f} GB/s, {statistics.median(samples_seen):.1f} samples/s",
                reference=f"raw read {paired.median_b:.2f} GB/s",
                paired=paired,
                target=TARGETS[backend] if cold else None,
                note="target applies to cold reads" if cold else "page cache full",
                limit=READ_LIMIT,
            )
        )
    section.facts.append(
        f"{backend} store: {len(lengths)} samples of {low}-{high} tokens, {sum(lengths)} tokens, "
        f"{on_disk / GIB:.2f} GiB on disk in {len(files)} files"
    )
    store.close()
    shutil.rmtree(root)


def run(fixtures: Fixtures) -> Section:
    ctx = fixtures.ctx
    section = Section("2. Store read: distill loader vs raw sequential read")
    wanted = 64 * 2**20 if ctx.smoke else 2 * GIB
    store_bytes, size_note = choose_store_bytes(ctx, wanted)
    section.facts.append(
        f"store size per backend: {size_note}; per-token shape of Qwen2.5-14B: {qwen14b_layout().bytes_per_token} bytes (bf16)"
    )
    section.facts.append(
        "loader: distill.stream.training_loader, batch 4, reading ahead in its background thread; "
        f"reference: each shard file read in order with readinto() into one reused {RAW_BLOCK_BYTES // 2**20} MiB buffer; "
        "the loader can beat it, because it asks the kernel to prefetch a whole batch at once (POSIX_FADV_WILLNEED)"
    )
    for backend in ("safetensors", "zarr"):
        _bench_backend(ctx, backend, store_bytes, section)
    return section

