"""Tests for the store's answer starts and teacher top-k log-probabilities, from extraction to KVBatch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import extract_small_store, run_cli
from distill.stream import TOPK_PAD_LOGPROB, KVBatch, KVSampleDataset, collate_samples, evaluation_loader
from extract.cli import main as extract_main
from extract.errors import UserError
from extract.store import KVLayout, ShardRecord, open_store
from extract.store import shards as shard_io
from extract.store.manifest import MANIFEST_NAME, read_manifest, write_manifest
from extract.store.verify import verify_store

TOPK = 5
# Small Zarr chunks, so that sample reads cross chunk boundaries.
ZARR_CHUNK_TOKENS = 16


@pytest.fixture(scope="module")
def topk_stores(tmp_path_factory, small_data, teacher_path) -> dict[str, Path]:
    """The small data set extracted with --topk-logprobs 5, once per backend."""
    folder = tmp_path_factory.mktemp("topk-stores")
    return {
        backend: extract_small_store(
            folder / backend,
            small_data,
            teacher_path,
            backend=backend,
            topk_logprobs=TOPK,
            zarr_chunk_tokens=ZARR_CHUNK_TOKENS,
        )
        for backend in ("safetensors", "zarr")
    }


@pytest.fixture(scope="module")
def tokenizer(teacher_path):
    return AutoTokenizer.from_pretrained(teacher_path)


def input_rows(data: tuple[Path, Path]) -> dict[int, list[dict]]:
    """Decoded JSONL rows by source index: 0 for the train file, 1 for the held-out file."""
    return {source: [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()] for source, path in enumerate(data)}


def rehash_shards(store: Path) -> None:
    """Record the current size and sha256 of every shard in the manifest, as if extract had written them so."""
    manifest = read_manifest(store)
    records = []
    for record in manifest.shards:
        size, sha256 = shard_io.hash_shard(store / record.path)
        records.append(ShardRecord(record.index, record.path, record.samples, record.tokens, size, sha256, record.splits))
    manifest.shards = records
    write_manifest(store, manifest)


# ----------------------------------------------------------------------------- shard round trips


@pytest.mark.parametrize("backend", ["safetensors", "zarr"])
def test_shard_arrays_round_trip(backend, tmp_path):
    generator = torch.Generator().manual_seed(0)
    layout = KVLayout(layers=(0, 2), num_kv_heads=2, head_dim=4, dtype="bfloat16", topk=3)
    lengths = [7, 20, 1]
    tokens, samples = sum(lengths), len(lengths)
    contents = shard_io.ShardContents(
        kv=torch.randn((tokens, *layout.token_shape), generator=generator).to(torch.bfloat16),
        token_ids=torch.randint(0, 1000, (tokens,), generator=generator, dtype=torch.int32),
        sample_offsets=torch.tensor([0, 7, 27, 28]),
        sample_rows=torch.tensor([5, 3, 9]),
        sample_sources=torch.zeros(samples, dtype=torch.uint8),
        sample_splits=torch.tensor([0, 1, 0], dtype=torch.uint8),
        sample_answer_starts=torch.tensor([4, 0, 1]),
        topk_ids=torch.randint(0, 150_000, (tokens, 3), generator=generator, dtype=torch.int32),
        topk_logprobs=-torch.rand((tokens, 3), generator=generator).sort(dim=1).values * 30,
    )
    path = tmp_path / f"00000{shard_io.BACKENDS[backend]}"
    size, sha256 = shard_io.write_shard(backend, path, contents, zarr_chunk_tokens=8)
    record = ShardRecord(0, f"shards/{path.name}", samples, tokens, size, sha256, {"train": 2, "heldout": 1})

    shard = shard_io.open_shard(backend, path, layout, record)
    assert torch.equal(shard.index()["sample_answer_starts"], contents.sample_answer_starts)
    ids, logprobs = shard.read_topk(5, 27)
    assert ids.dtype == torch.int32
    assert logprobs.dtype == torch.float32
    assert torch.equal(ids, contents.topk_ids[5:27])
    assert torch.equal(logprobs, contents.topk_logprobs[5:27])
    shard.close()


def test_shard_with_missing_topk_rejected(tmp_path):
    layout = KVLayout(layers=(0,), num_kv_heads=1, head_dim=2, dtype="float32", topk=2)
    contents = shard_io.ShardContents(
        kv=torch.zeros((3, *layout.token_shape)),
        token_ids=torch.zeros(3, dtype=torch.int32),
        sample_offsets=torch.tensor([0, 3]),
        sample_rows=torch.tensor([0]),
        sample_sources=torch.zeros(1, dtype=torch.uint8),
        sample_splits=torch.zeros(1, dtype=torch.uint8),
        sample_answer_starts=torch.tensor([0]),
    )
    path = tmp_path / "00000.safetensors"
    size, sha256 = shard_io.write_shard("safetensors", path, contents)
    record = ShardRecord(0, "shards/00000.safetensors", 1, 3, size, sha256, {"train": 1})
    with pytest.raises(UserError, match="holds arrays"):
        shard_io.open_shard("safetensors", path, layout, record)


# ----------------------------------------------------------------------------- extracted stores


def test_topk_backends_agree(topk_stores):
    with open_store(topk_stores["safetensors"]) as first, open_store(topk_stores["zarr"]) as second:
        assert first.topk == TOPK
        assert second.topk == TOPK
        layout = first.manifest.layout
        assert layout.bytes_per_token == layout.kv_bytes_per_token + 8 * TOPK
        assert len(first) == len(second) == 64
        for sample_id in range(len(first)):
            ids, logprobs = first.read_topk(sample_id)
            length = first.samples[sample_id].length
            assert ids.shape == (length, TOPK)
            assert logprobs.shape == (length, TOPK)
            other_ids, other_logprobs = second.read_topk(sample_id)
            assert torch.equal(ids, other_ids)
            assert torch.equal(logprobs, other_logprobs)
            assert first.read_answer_start(sample_id) == second.read_answer_start(sample_id)


def test_topk_equals_unbatched_log_softmax(topk_stores, teacher_path):
    model = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32).eval()
    with open_store(topk_stores["safetensors"]) as store:
        lengths = [ref.length for ref in store.samples]
        # Extraction ran padded batches, so the shortest sample carried the most padding.
        chosen = [lengths.index(max(lengths)), lengths.index(min(lengths)), len(store) // 2]
        for sample_id in chosen:
            token_ids = store.read_token_ids(sample_id).long()
            with torch.inference_mode():
                logits = model(input_ids=token_ids[None]).logits[0].float()
            reference = torch.log_softmax(logits, dim=-1)
            expected_values, expected_ids = reference.topk(TOPK, dim=-1)
            ids, logprobs = store.read_topk(sample_id)
            assert torch.equal(ids.long(), expected_ids)
            torch.testing.assert_close(logprobs, expected_values, atol=1e-5, rtol=0)


def test_answer_start_gsm8k_rows(topk_stores, small_data, tokenizer):
    rows = input_rows(small_data)
    with open_store(topk_stores["safetensors"]) as store:
        for sample_id, ref in enumerate(store.samples):
            row = rows[ref.source][ref.row]
            token_ids = store.read_token_ids(sample_id).tolist()
            start = store.read_answer_start(sample_id)
            assert token_ids[-1] == tokenizer.eos_token_id
            answer = tokenizer.decode(token_ids[start:-1])
            prompt = tokenizer.decode(token_ids[:start])
            assert answer.removeprefix(" ") == row["answer"].strip()
            assert prompt.rstrip(" ") == f"Question: {row['question'].strip()}\nAnswer:"


def test_answer_start_text_and_truncated_rows(tmp_path, teacher_path, tokenizer):
    long_answer = " ".join(f"Step {i}: add {i} apples." for i in range(30))
    rows = [
        {"text": "Plain text rows are targets from their first token."},
        {"question": "How many apples are there in total? " * 12, "answer": "There are 12.\n#### 12"},
        # A question far longer than 64 characters per allowed token is cut before
        # tokenizing, which removes the answer from the text.
        {"question": "Count the apples. " * 200, "answer": "There are 3.\n#### 3"},
        {"question": "How many apples?", "answer": long_answer},
    ]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    store_path = extract_small_store(
        tmp_path / "store", (data, data), teacher_path, heldout=None, heldout_fraction=0.0, max_length=40
    )
    with open_store(store_path) as store:
        by_row = {ref.row: sample_id for sample_id, ref in enumerate(store.samples)}
        assert sorted(by_row) == [0, 1, 2, 3]
        assert store.read_answer_start(by_row[0]) == 0
        for row in (1, 2):
            assert store.samples[by_row[row]].length == 40
            assert store.read_answer_start(by_row[row]) == 40
        cut_in_answer = by_row[3]
        start = store.read_answer_start(cut_in_answer)
        answer_part = tokenizer.decode(store.read_token_ids(cut_in_answer)[start:].tolist()).removeprefix(" ")
        assert 0 < start < 40
        assert len(answer_part) > 20
        assert long_answer.startswith(answer_part)


def test_resume_with_other_topk_rejected(topk_stores, copy_store, small_data, teacher_path):
    store = copy_store(topk_stores["safetensors"])
    manifest_before = (store / MANIFEST_NAME).read_bytes()
    result = run_cli(
        "extract", "--teacher", teacher_path, "--data", str(small_data[0]), "--heldout", str(small_data[1]),
        "--out", str(store), "--device", "cpu", "--shard-mb", "4", "--topk-logprobs", "3", "--no-progress",
    )
    assert result.returncode == 2, result.stderr
    assert "layout.topk=5 but this run has 3" in result.stderr
    assert "Traceback" not in result.stderr
    assert (store / MANIFEST_NAME).read_bytes() == manifest_before


def test_topk_above_vocabulary_rejected(tmp_path, small_data, teacher_path):
    with pytest.raises(UserError, match="--topk-logprobs 5000 is outside 0..1334"):
        extract_small_store(tmp_path / "store", small_data, teacher_path, topk_logprobs=5000)
    assert not (tmp_path / "store").exists()


def test_verify_reports_nan_in_topk(topk_stores, copy_store):
    store = copy_store(topk_stores["safetensors"])
    shard = store / read_manifest(store).shards[0].path
    arrays = load_file(shard)
    arrays["topk_logprobs"][3, 1] = float("nan")
    save_file(arrays, shard, metadata={"format": "mercator-kv-shard", "format_version": "1"})
    rehash_shards(store)

    report = verify_store(store)
    assert len(report.problems) == 1
    assert "NaN or Inf in topk_logprobs" in report.problems[0]
    assert report.problems[0].startswith("shard shards/00000.safetensors: sample 0 ")

    result = run_cli("extract", "verify", str(store), "--no-progress")
    assert result.returncode == 1
    assert "FAULT: shard shards/00000.safetensors: sample 0" in result.stdout


def test_verify_clean_topk_store(topk_stores):
    for backend, store in topk_stores.items():
        report = verify_store(store)
        assert report.problems == [], backend
        assert report.samples_checked == 64


def test_info_shows_topk(topk_stores):
    result = CliRunner().invoke(extract_main, ["info", str(topk_stores["zarr"])])
    assert result.exit_code == 0, result.output
    assert f"teacher top-{TOPK} log-probabilities, {8 * TOPK} bytes per token; answer starts" in result.output
    manifest = json.loads(CliRunner().invoke(extract_main, ["info", "--json", str(topk_stores["zarr"])]).output)
    assert manifest["kv"]["topk"] == TOPK
    assert manifest["kv"]["answer_starts"] is True
    assert manifest["kv"]["bytes_per_token"] == manifest["kv"]["kv_bytes_per_token"] + 8 * TOPK
    assert manifest["teacher"]["vocab_size"] == 1334


def test_store_without_new_arrays_opens(small_store, copy_store):
    store = copy_store(small_store)
    for record in read_manifest(store).shards:
        arrays = load_file(store / record.path)
        del arrays["sample_answer_starts"]
        save_file(arrays, store / record.path, metadata={"format": "mercator-kv-shard", "format_version": "1"})
    manifest = json.loads((store / MANIFEST_NAME).read_text())
    del manifest["kv"]["topk"], manifest["kv"]["answer_starts"]
    (store / MANIFEST_NAME).write_text(json.dumps(manifest))
    rehash_shards(store)

    with open_store(store) as opened:
        assert opened.topk == 0
        assert opened.manifest.layout.answer_starts is False
        assert opened.read_topk(0) is None
        assert all(opened.read_answer_start(i) == 0 for i in range(len(opened)))
        batch = collate_samples([KVSampleDataset(opened, [0, 1])[i] for i in range(2)])
        assert torch.equal(batch.answer_mask, batch.attention_mask)
    assert verify_store(store).problems == []


# ----------------------------------------------------------------------------- KVBatch


def test_kvbatch_answer_mask_and_topk(topk_stores):
    with open_store(topk_stores["zarr"]) as store:
        lengths = [ref.length for ref in store.samples]
        sample_ids = [lengths.index(max(lengths)), lengths.index(min(lengths)), 7]
        batch = next(iter(evaluation_loader(KVSampleDataset(store, sample_ids), batch_size=3)))
        longest = max(lengths)
        assert batch.answer_mask.shape == (3, longest)
        assert batch.answer_mask.dtype == torch.bool
        assert batch.topk_ids.shape == (3, longest, TOPK)
        assert batch.topk_ids.dtype == torch.long
        assert batch.topk_logprobs.dtype == torch.float32
        positions = torch.arange(longest)
        for i, sample_id in enumerate(sample_ids):
            length, start = lengths[sample_id], store.read_answer_start(sample_id)
            assert 0 < start < length
            expected_answer = (positions >= start) & (positions < length)
            assert torch.equal(batch.answer_mask[i], expected_answer)
            assert torch.equal(batch.attention_mask[i], positions < length)
            ids, logprobs = store.read_topk(sample_id)
            assert torch.equal(batch.topk_ids[i, :length], ids.long())
            assert torch.equal(batch.topk_logprobs[i, :length], logprobs)
            assert bool((batch.topk_ids[i, length:] == 0).all())
            assert bool((batch.topk_logprobs[i, length:] == TOPK_PAD_LOGPROB).all())


def test_kvbatch_padding_keeps_kl_finite(topk_stores):
    with open_store(topk_stores["safetensors"]) as store:
        lengths = [ref.length for ref in store.samples]
        dataset = KVSampleDataset(store, [lengths.index(max(lengths)), lengths.index(min(lengths))])
        batch = collate_samples([dataset[0], dataset[1]])
    student_logprobs = torch.log_softmax(torch.randn(*batch.input_ids.shape, 1334), dim=-1)
    teacher_logprobs = batch.topk_logprobs
    kl = (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs.gather(-1, batch.topk_ids))).sum(-1)
    assert bool(torch.isfinite(kl).all())
    # Padding contributes exactly 0 even before masking, and the masked mean is finite.
    assert bool((kl[~batch.attention_mask] == 0).all())
    assert torch.isfinite((kl * batch.answer_mask).sum() / batch.answer_mask.sum())
    renormalised = torch.softmax(teacher_logprobs, dim=-1)
    assert bool(torch.isfinite(renormalised).all())


def test_kvbatch_move_keeps_fields(topk_stores, small_store):
    with open_store(topk_stores["safetensors"]) as store:
        batch = collate_samples([KVSampleDataset(store, [0, 1])[i] for i in range(2)])
    with open_store(small_store) as store:
        without_topk = collate_samples([KVSampleDataset(store, [0, 1])[i] for i in range(2)])
    assert without_topk.topk_ids is None
    assert without_topk.topk_logprobs is None

    for original in (batch, without_topk):
        moved = original.to(torch.device("cpu"))
        assert torch.equal(moved.answer_mask, original.answer_mask)
        assert (moved.topk_ids is None) == (original.topk_ids is None)
        if torch.cuda.is_available():
            pinned = original.pin_memory()
            assert pinned.answer_mask.is_pinned()
            assert pinned.topk_logprobs is None or pinned.topk_logprobs.is_pinned()
            on_gpu = pinned.to(torch.device("cuda"))
            assert on_gpu.answer_mask.is_cuda
            assert on_gpu.topk_ids is None or on_gpu.topk_ids.is_cuda


def test_kvbatch_default_answer_mask():
    mask = torch.tensor([[True, True, False]])
    batch = KVBatch(torch.tensor([0]), torch.zeros((1, 3), dtype=torch.long), mask, torch.zeros((1, 3, 1, 2, 1, 2)))
    assert torch.equal(batch.answer_mask, mask)
    assert batch.answer_mask is not mask
    assert batch.topk_ids is None
