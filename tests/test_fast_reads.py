"""Fast read paths: Zarr rows read around zarr-python, batches read straight into place, read-ahead."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import zarr

from conftest import extract_small_store
from distill.stream import BufferPool, KVSampleDataset, collate_samples, training_loader
from extract.errors import StoreError
from extract.store import open_store
from extract.store.shards import ShardContents, _write_zarr
from extract.store.zarr_direct import DirectRowReader


def _write_shard(path: Path, tokens: int, chunk_tokens: int, dtype: torch.dtype) -> torch.Tensor:
    kv = torch.randn(tokens, 3, 2, 2, 8).to(dtype)
    contents = ShardContents(
        kv=kv,
        token_ids=torch.arange(tokens, dtype=torch.int32),
        sample_offsets=torch.tensor([0, tokens]),
        sample_rows=torch.tensor([0]),
        sample_sources=torch.tensor([0], dtype=torch.uint8),
        sample_splits=torch.tensor([0], dtype=torch.uint8),
    )
    _write_zarr(path, contents, chunk_tokens)
    return kv


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(-1).view(torch.uint8)


@pytest.mark.parametrize(("tokens", "chunk_tokens", "dtype"), [(300, 128, torch.bfloat16), (1000, 7, torch.float32), (128, 128, torch.float16)])
def test_direct_rows_equal_zarr_rows(tmp_path: Path, tokens: int, chunk_tokens: int, dtype: torch.dtype) -> None:
    kv = _write_shard(tmp_path / "shard.zarr", tokens, chunk_tokens, dtype)
    group = zarr.open_group(str(tmp_path / "shard.zarr"), mode="r")
    reader = DirectRowReader.open(tmp_path / "shard.zarr" / "kv", group["kv"], dtype, "test")
    token_reader = DirectRowReader.open(tmp_path / "shard.zarr" / "token_ids", group["token_ids"], torch.int32, "test")
    assert reader is not None and token_reader is not None

    draw = random.Random(0)
    ranges = [(0, tokens), (0, 0), (tokens, tokens)] + [tuple(sorted(draw.sample(range(tokens + 1), 2))) for _ in range(30)]
    for start, stop in ranges:
        expected = torch.from_numpy(group["kv"][start:stop].copy()).view(dtype)
        rows = reader.read(start, stop)
        assert rows.shape == (stop - start, 3, 2, 2, 8)
        assert torch.equal(_bits(rows), _bits(expected)), (start, stop)
        assert torch.equal(_bits(rows), _bits(kv[start:stop])), (start, stop)
        assert torch.equal(token_reader.read(start, stop), torch.arange(start, stop, dtype=torch.int32))


def test_direct_reader_declines_compressed_arrays(tmp_path: Path) -> None:
    group = zarr.open_group(str(tmp_path / "g.zarr"), mode="w", zarr_format=3)
    array = group.create_array("kv", shape=(64, 4), dtype="float32", chunks=(16, 4), compressors=zarr.codecs.ZstdCodec(level=1))
    array[...] = 1.0

    assert DirectRowReader.open(tmp_path / "g.zarr" / "kv", array, torch.float32, "test") is None


def test_direct_reader_rejects_damaged_index(tmp_path: Path) -> None:
    _write_shard(tmp_path / "shard.zarr", 300, 128, torch.bfloat16)
    chunk_file = tmp_path / "shard.zarr" / "kv" / "c" / "0" / "0" / "0" / "0" / "0"
    data = bytearray(chunk_file.read_bytes())
    data[-10] ^= 0xFF  # inside the shard index, which ends with its CRC32C
    chunk_file.write_bytes(bytes(data))
    group = zarr.open_group(str(tmp_path / "shard.zarr"), mode="r")
    reader = DirectRowReader.open(tmp_path / "shard.zarr" / "kv", group["kv"], torch.bfloat16, "shard x")

    with pytest.raises(StoreError, match="shard x: shard index checksum does not match"):
        reader.read(0, 10)


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory: pytest.TempPathFactory, small_data: tuple[Path, Path], teacher_path: str) -> Path:
    return extract_small_store(tmp_path_factory.mktemp("zarr") / "store", small_data, teacher_path, backend="zarr", zarr_chunk_tokens=16)


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
def test_read_batch_equals_collated_items(backend: str, small_store: Path, zarr_store: Path) -> None:
    store = open_store(small_store if backend == "safetensors" else zarr_store)
    dataset = KVSampleDataset(store, store.sample_ids())
    indices = [7, 0, 31, 12]

    batch = dataset.read_batch(indices)
    expected = collate_samples([dataset[i] for i in indices])

    for field in ("sample_ids", "input_ids", "attention_mask", "teacher_kv"):
        assert torch.equal(getattr(batch, field), getattr(expected, field)), field
    assert batch.teacher_kv.is_contiguous()


def test_read_ahead_keeps_batch_order(small_store: Path) -> None:
    store = open_store(small_store)
    dataset = KVSampleDataset(store, store.sample_ids("train"))
    ahead = list(training_loader(dataset, batch_size=3, steps=20, seed=4, num_workers=1))
    in_loop = list(training_loader(dataset, batch_size=3, steps=20, seed=4, num_workers=0))

    assert len(ahead) == len(in_loop) == 20
    for first, second in zip(ahead, in_loop):
        assert torch.equal(first.sample_ids, second.sample_ids)
        assert torch.equal(first.teacher_kv, second.teacher_kv)


def test_read_ahead_stops_early_cleanly(small_store: Path) -> None:
    store = open_store(small_store)
    loader = training_loader(KVSampleDataset(store, store.sample_ids("train")), batch_size=2, steps=50, seed=0, num_workers=1)
    iterator = iter(loader)
    first = next(iterator)
    iterator.close()  # what a training loop that stops early does

    assert first.sample_ids.shape == (2,)


def test_buffer_pool_reuses_only_free_buffers() -> None:
    pool = BufferPool(capacity=2)
    first = pool.tensor((4, 1000), torch.float32)
    first_address = first.data_ptr()
    view = first[1:3]
    del first

    second = pool.tensor((4, 1000), torch.float32)
    assert second.data_ptr() != first_address, "a buffer still referenced through a view must not be reused"

    del view
    third = pool.tensor((2, 1000), torch.float32)
    assert third.data_ptr() == first_address, "a buffer nothing refers to any more is reused"

    fourth = pool.tensor((4, 1000), torch.float32)
    assert fourth.data_ptr() not in (second.data_ptr(), third.data_ptr()), "a full pool allocates outside it"
