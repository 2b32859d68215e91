"""Tests for streaming store samples into padded training batches."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from distill.stream import (
    KVSample,
    KVSampleDataset,
    StepBatchSampler,
    collate_samples,
    evaluation_loader,
    training_loader,
)
from extract.store import open_store


def _item(sample_id: int, length: int, token_shape=(2, 2, 3, 4)) -> KVSample:
    token_ids = torch.arange(1, length + 1, dtype=torch.int32) + 100 * sample_id
    kv = torch.full((length, *token_shape), float(sample_id + 1))
    return KVSample(sample_id, token_ids, kv, answer_start=0, topk=None)


# Collation.


def test_collate_pads_on_the_right():
    batch = collate_samples([_item(0, 3), _item(1, 5), _item(2, 1)])

    assert batch.sample_ids.tolist() == [0, 1, 2]
    assert batch.input_ids.shape == (3, 5)
    assert batch.attention_mask.dtype == torch.bool
    assert batch.attention_mask.sum(dim=1).tolist() == [3, 5, 1]
    assert batch.attention_mask[0].tolist() == [True, True, True, False, False]
    assert batch.input_ids[0].tolist() == [1, 2, 3, 0, 0]
    assert batch.input_ids[2].tolist() == [201, 0, 0, 0, 0]
    assert batch.teacher_kv.shape == (3, 5, 2, 2, 3, 4)
    assert torch.equal(batch.teacher_kv[0, :3], torch.full((3, 2, 2, 3, 4), 1.0))
    assert batch.teacher_kv[0, 3:].abs().sum() == 0
    assert batch.teacher_kv[2, 1:].abs().sum() == 0
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4]] * 3


def test_collate_keeps_store_dtype():
    item = _item(0, 2)
    batch = collate_samples([item._replace(kv=item.kv.to(torch.bfloat16))])
    assert batch.teacher_kv.dtype == torch.bfloat16


def test_teacher_vectors_concatenate_heads():
    batch = collate_samples([_item(0, 2), _item(1, 3)])
    # Make every element distinct so the reshape order is visible.
    batch.teacher_kv = torch.arange(batch.teacher_kv.numel(), dtype=torch.float32).reshape(batch.teacher_kv.shape)

    keys, values = batch.teacher_vectors()
    assert keys.shape == values.shape == (2, 2, 3, 3 * 4)  # [batch, layers, tokens, kv_heads * head_dim]
    assert torch.equal(keys[1, 0, 2], batch.teacher_kv[1, 2, 0, 0].reshape(-1))
    assert torch.equal(values[0, 1, 1], batch.teacher_kv[0, 1, 1, 1].reshape(-1))


def test_training_batches_from_store(small_store):
    with open_store(small_store) as store:
        train_ids = store.sample_ids("train")
        loader = training_loader(KVSampleDataset(store, train_ids), batch_size=4, steps=3, seed=0, num_workers=0)
        batches = list(loader)
        assert len(batches) == 3
        for batch in batches:
            lengths = [store.samples[i].length for i in batch.sample_ids.tolist()]
            assert batch.attention_mask.sum(dim=1).tolist() == lengths
            assert batch.input_ids.shape[1] == max(lengths)
            for row, sample_id in enumerate(batch.sample_ids.tolist()):
                length = lengths[row]
                assert torch.equal(batch.teacher_kv[row, :length], store.read_kv(sample_id))
                assert torch.equal(batch.input_ids[row, :length], store.read_token_ids(sample_id).long())
                assert batch.teacher_kv[row, length:].abs().sum() == 0
            assert set(batch.sample_ids.tolist()) <= set(train_ids)


def test_worker_batches_equal_main_process(small_store):
    with open_store(small_store) as store:
        dataset = KVSampleDataset(store, store.sample_ids("train"))
        main = list(training_loader(dataset, batch_size=3, steps=4, seed=5, num_workers=0))
        workers = list(training_loader(dataset, batch_size=3, steps=4, seed=5, num_workers=1))
    for ours, theirs in zip(main, workers, strict=True):
        assert torch.equal(ours.sample_ids, theirs.sample_ids)
        assert torch.equal(ours.teacher_kv, theirs.teacher_kv)


def test_evaluation_loader_covers_heldout_in_order(small_store):
    with open_store(small_store) as store:
        heldout = store.sample_ids("heldout")
        batches = list(evaluation_loader(KVSampleDataset(store, heldout), batch_size=5))
    assert [len(b.sample_ids) for b in batches] == [5, 5, 5, 1]
    assert torch.cat([b.sample_ids for b in batches]).tolist() == heldout


# The step sampler.


def test_sampler_deterministic_per_seed():
    first = list(StepBatchSampler(10, 4, steps=12, seed=3))
    again = list(StepBatchSampler(10, 4, steps=12, seed=3))
    other = list(StepBatchSampler(10, 4, steps=12, seed=4))

    assert first == again
    assert first != other
    assert len(first) == 12
    assert all(len(batch) == 4 for batch in first)


@pytest.mark.parametrize("start_step", [1, 2, 3, 7, 11])
def test_sampler_resume_continues_sequence(start_step):
    full = list(StepBatchSampler(10, 4, steps=12, seed=3))
    resumed = StepBatchSampler(10, 4, steps=12, seed=3, start_step=start_step)
    assert len(resumed) == 12 - start_step
    assert list(resumed) == full[start_step:]


def test_sampler_every_sample_once_per_epoch():
    # 15 steps of 4 over 12 items are exactly 5 epochs, and some batches cross an epoch boundary.
    order = [i for batch in StepBatchSampler(12, 4, steps=15, seed=0) for i in batch]
    epochs = [order[i : i + 12] for i in range(0, len(order), 12)]
    assert len(epochs) == 5
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    assert len({tuple(epoch) for epoch in epochs}) == 5


def test_sampler_batch_larger_than_dataset():
    batches = list(StepBatchSampler(3, 5, steps=3, seed=0))
    order = [i for batch in batches for i in batch]
    assert [sorted(order[i : i + 3]) for i in range(0, 15, 3)] == [[0, 1, 2]] * 5


def test_sampler_rejects_empty_dataset():
    with pytest.raises(ValueError, match="empty dataset"):
        StepBatchSampler(0, 4, steps=1, seed=0)


# Memory: a dataset item reads its own sample and nothing else.


def _safetensors_span(shard: Path, name: str) -> tuple[int, int, int]:
    """Return (data offset, byte size, rows) of one array in a safetensors file."""
    with open(shard, "rb") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
    begin, end = header[name]["data_offsets"]
    return 8 + header_size + begin, end - begin, header[name]["shape"][0]


def test_item_reads_only_its_sample(small_store, copy_store):
    store_dir = copy_store(small_store)
    with open_store(store_dir) as store:
        sample_id = 30
        ref = store.samples[sample_id]
        expected_kv, expected_ids = store.read_kv(sample_id), store.read_token_ids(sample_id)
        store.close()
        assert ref.start > 0
        assert ref.stop < store.manifest.shards[ref.shard].tokens

        # Destroy every byte the sample does not own: other shards go, and the rest of
        # its own shard's K/V and token ids become 0xFF (NaN for float32).
        for record in store.manifest.shards:
            if record.index != ref.shard:
                (store_dir / record.path).unlink()
        shard = store_dir / store.manifest.shards[ref.shard].path
        with open(shard, "r+b") as handle:
            for name in ("kv", "token_ids"):
                offset, size, rows = _safetensors_span(shard, name)
                row_bytes = size // rows
                for begin, end in ((0, ref.start), (ref.stop, rows)):
                    handle.seek(offset + begin * row_bytes)
                    handle.write(b"\xff" * ((end - begin) * row_bytes))

        dataset = KVSampleDataset(store, [sample_id])
        read_before = _bytes_read()
        returned_id, token_ids, kv, _, _ = dataset[0]
        read_bytes = _bytes_read() - read_before
    assert returned_id == sample_id
    assert torch.equal(kv, expected_kv)
    assert torch.equal(token_ids, expected_ids)
    assert kv.shape[0] == ref.length
    # The sample's rows plus the shard's header, which the first read of a shard parses.
    sample_bytes = ref.length * (store.manifest.layout.bytes_per_token + 4)
    assert sample_bytes <= read_bytes <= sample_bytes + 64 * 1024


def _bytes_read() -> int:
    """Bytes this process has read through read/pread system calls so far (Linux)."""
    io = Path("/proc/self/io")
    if not io.is_file():
        pytest.skip("needs /proc/self/io to count bytes read")
    fields = dict(line.split(": ") for line in io.read_text().splitlines())
    return int(fields["rchar"])
