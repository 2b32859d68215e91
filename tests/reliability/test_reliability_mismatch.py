"""Mismatches and non-finite values: each refused with both values shown, or with the sample named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from reliability_support import error_line, invoke, sealed, tiny_extract_args, tiny_store
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from distill.cli import main as distill_main
from extract.cli import main as extract_main
from extract.cli_support import run_command
from extract.data import TokenizedSample
from extract.errors import StoreError
from extract.models import load_tokenizer, tokenizer_fingerprint
from extract.plan import ShardPlan
from extract.store import StoreWriter, open_store, read_manifest
from extract.store.shards import SAFETENSORS_FORMAT
from extract.store.verify import verify_store
from extract.writer_thread import BatchItem, NonFiniteError, ShardWriterThread

__all__ = ["tiny_store"]


def _distill(store: Path, out: Path, *extra: str):
    return invoke(distill_main, "--store", store, "--out", out, "--device", "cpu", "--no-progress", "--num-workers", "0", *extra)


def test_student_tokenizer_mismatch(tiny_store: Path, student_path: str, tmp_path: Path) -> None:
    student = tmp_path / "student"
    shutil.copytree(student_path, student)
    tokenizer_file = student / "tokenizer.json"
    tokenizer = json.loads(tokenizer_file.read_text())
    extra_id = len(tokenizer["model"]["vocab"])
    tokenizer["added_tokens"].append(
        {"id": extra_id, "content": "<|extra|>", "single_word": False, "lstrip": False, "rstrip": False, "normalized": False, "special": True}
    )
    tokenizer_file.write_text(json.dumps(tokenizer))
    stored = read_manifest(tiny_store).tokenizer["fingerprint"]
    actual = tokenizer_fingerprint(load_tokenizer(str(student)))
    assert stored != actual

    result = _distill(tiny_store, tmp_path / "run", "--student", str(student))
    assert result.exit_code == 2
    error = error_line(result)
    assert actual[:23] in error
    assert stored[:23] in error


@pytest.mark.parametrize(
    "option, stored, requested",
    [("--layers", '"layout.layers"', "[0, 1, 2]"), ("--dtype", '"layout.dtype"', '"bfloat16"')],
    ids=["layers", "dtype"],
)
def test_resume_with_other_layout_refused(
    tiny_store: Path, small_data: tuple[Path, Path], teacher_path: str, copy_store, option: str, stored: str, requested: str
) -> None:
    store = copy_store(tiny_store)
    args = tiny_extract_args(teacher_path, small_data, store)
    value = {"--layers": "0-2", "--dtype": "bfloat16"}[option]
    result = invoke(extract_main, *args, option, value)
    assert result.exit_code == 2
    error = error_line(result)
    field = stored.strip('"')
    written = {"layout.layers": "[0, 1]", "layout.dtype": '"float32"'}[field]
    assert f"written with {field}={written} but this run has {requested}" in error

    # The same command with the store's own options resumes every shard and changes nothing.
    before = read_manifest(store).shards
    again = invoke(extract_main, *args)
    assert again.exit_code == 0, again.stderr
    assert f"{len(before)} shards resumed" in again.stdout
    assert read_manifest(store).shards == before


def _writer_for_first_shard(source: Path, target: Path) -> tuple[StoreWriter, ShardPlan, torch.Tensor]:
    """A writer for a new store with ``source``'s plan, the plan of shard 0 and that shard's kv, padded per sample."""
    manifest = read_manifest(source)
    manifest.shards, manifest.complete = [], False
    writer = StoreWriter.create_or_resume(target, manifest)
    with open_store(source) as store:
        refs = [ref for ref in store.samples if ref.shard == 0]
        samples = tuple(
            TokenizedSample(ref.source, ref.row, ref.split, tuple(store.read_token_ids(i).tolist()), ref.answer_start)
            for i, ref in enumerate(store.samples)
            if ref.shard == 0
        )
        longest = max(ref.length for ref in refs)
        batch = torch.zeros((len(refs), longest, *manifest.layout.token_shape))
        for b, sample_id in enumerate(i for i, ref in enumerate(store.samples) if ref.shard == 0):
            batch[b, : refs[b].length] = store.read_kv(sample_id)
    return writer, ShardPlan(0, samples), batch


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("flagged", [False, True], ids=["checked-on-cpu", "flag-from-device"])
def test_writer_thread_refuses_non_finite(tiny_store: Path, tmp_path: Path, value: float, flagged: bool) -> None:
    writer, plan, batch = _writer_for_first_shard(tiny_store, tmp_path / "store")
    finite = None
    if flagged:
        # The GPU path computes one flag per sample on the device; the thread trusts it.
        finite = torch.ones(batch.shape[0], dtype=torch.bool)
        finite[1] = False
    else:
        batch[1, 2, 0, 1, 0, 0] = value
    thread = ShardWriterThread(writer, {0: plan})
    thread.start()
    thread.put(BatchItem(shard=0, positions=list(range(batch.shape[0])), kv=batch, finite=finite))
    with pytest.raises(NonFiniteError) as raised:
        thread.close()
    sample = plan.samples[1]
    assert f"input source {sample.source} row {sample.row}" in str(raised.value)
    assert read_manifest(tmp_path / "store").shards == []
    assert list((tmp_path / "store" / "shards").iterdir()) == []


def test_writer_thread_writes_finite_batch(tiny_store: Path, tmp_path: Path) -> None:
    writer, plan, batch = _writer_for_first_shard(tiny_store, tmp_path / "store")
    thread = ShardWriterThread(writer, {0: plan})
    thread.start()
    thread.put(BatchItem(shard=0, positions=list(range(batch.shape[0])), kv=batch))
    thread.close()
    assert read_manifest(tmp_path / "store").shards == read_manifest(tiny_store).shards[:1]


def _poison(store: Path, split: str, value: float) -> tuple[int, str, int, int]:
    """Write ``value`` into one token of the first ``split`` sample; return (sample id, shard path, source, row)."""
    with open_store(store) as reader:
        sample_id = reader.sample_ids(split)[0]
        ref = reader.samples[sample_id]
        record = reader.manifest.shards[ref.shard]
    arrays = load_file(store / record.path)
    arrays["kv"][ref.start + 1, 0, 1, 0, 3] = value
    save_file(arrays, store / record.path, metadata={"format": SAFETENSORS_FORMAT})
    sealed(store, ref.shard)
    return sample_id, record.path, ref.source, ref.row


@pytest.mark.parametrize("split, value", [("heldout", float("nan")), ("train", float("-inf"))], ids=["heldout-nan", "train-inf"])
def test_non_finite_store_named(tiny_store: Path, copy_store, tmp_path: Path, split: str, value: float) -> None:
    store = copy_store(tiny_store)
    sample_id, shard, source, row = _poison(store, split, value)

    verified = invoke(extract_main, "verify", store, "--no-progress")
    assert verified.exit_code == 1
    assert f"FAULT: shard {shard}: sample {sample_id} (input source {source} row {row}) contains NaN or Inf values" in verified.stdout
    assert verify_store(store, check_values=False).ok

    # Evaluation reads every held-out sample first; one step of 12 reads every training sample.
    distilled = _distill(store, tmp_path / "run", "--steps", "1", "--batch-size", "12")
    assert distilled.exit_code == 2
    assert f"store sample {sample_id} contain NaN or Inf" in error_line(distilled)


class _FailingDataset(Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, index: int) -> torch.Tensor:
        raise StoreError(f"shard shards/00003.safetensors: file ended at byte {index}; the shard is truncated")


def test_worker_error_printed_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    loader = DataLoader(_FailingDataset(), batch_size=1, num_workers=1)
    with pytest.raises(SystemExit) as exited:
        run_command(lambda: next(iter(loader)))
    assert exited.value.code == 2
    assert capsys.readouterr().err == "error: shard shards/00003.safetensors: file ended at byte 0; the shard is truncated\n"
