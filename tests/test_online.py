"""The online-teacher mode: K/V computed in the loop equal the stored K/V, and the CLI trains with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from conftest import run_cli
from distill.online import OnlineTeacher
from distill.stream import KVSampleDataset, training_loader
from extract.embedded import EMBEDDED_STUDENT, EMBEDDED_TEACHER
from extract.errors import UserError
from extract.store import open_store

# The embedded models are tiny: one thread runs them fastest, and far faster than two on a busy machine.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def test_online_kv_equals_stored_kv(small_store: Path, teacher_path: str) -> None:
    store = open_store(small_store)
    teacher = OnlineTeacher.load(teacher_path, store.manifest, torch.device("cpu"))
    dataset = KVSampleDataset(store, store.sample_ids())
    # Samples of different lengths, so the batch has padding, and an order extraction never used.
    batch = dataset.read_batch([5, 0, 17, 3, 40, 11])

    online = teacher.kv(batch)

    assert online.shape == batch.teacher_kv.shape
    assert online.dtype == batch.teacher_kv.dtype
    assert bool(batch.attention_mask.sum(1).unique().numel() > 1), "the batch should mix sample lengths"
    padding = ~batch.attention_mask
    assert bool((online[padding] == 0).all())
    assert float((online - batch.teacher_kv).abs().max()) <= 1e-5


def test_online_vectors_match_store_vectors(small_store: Path, teacher_path: str) -> None:
    store = open_store(small_store)
    teacher = OnlineTeacher.load(EMBEDDED_TEACHER, store.manifest, torch.device("cpu"))
    batch = KVSampleDataset(store, store.sample_ids()).read_batch([1, 2, 3, 4])

    online_k, online_v = teacher.vectors(batch)
    stored_k, stored_v = batch.teacher_vectors()

    assert torch.allclose(online_k, stored_k, atol=1e-5, rtol=0)
    assert torch.allclose(online_v, stored_v, atol=1e-5, rtol=0)


def test_token_only_loader_reads_no_kv(small_store: Path) -> None:
    store = open_store(small_store)
    dataset = KVSampleDataset(store, store.sample_ids("train"), with_kv=False)
    batches = list(training_loader(dataset, batch_size=4, steps=3, seed=0, num_workers=1))
    full = list(training_loader(KVSampleDataset(store, store.sample_ids("train")), batch_size=4, steps=3, seed=0, num_workers=1))

    assert len(batches) == 3
    for token_only, stored in zip(batches, full):
        assert token_only.teacher_kv.shape[2] == 0
        assert torch.equal(token_only.input_ids, stored.input_ids)
        assert torch.equal(token_only.attention_mask, stored.attention_mask)


def test_online_teacher_mismatch_rejected(small_store: Path, student_path: str) -> None:
    store = open_store(small_store)
    with pytest.raises(UserError, match="is not the store's teacher"):
        OnlineTeacher.load(student_path, store.manifest, torch.device("cpu"))


def test_online_teacher_geometry_mismatch_rejected(small_store: Path, teacher_path: str) -> None:
    manifest = open_store(small_store).manifest
    manifest.teacher = dict(manifest.teacher, num_key_value_heads=manifest.teacher["num_key_value_heads"] * 2)
    with pytest.raises(UserError, match="num_key_value_heads"):
        OnlineTeacher.load(teacher_path, manifest, torch.device("cpu"))


def test_online_cli_five_steps(small_store: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    done = run_cli(
        "distill", "--store", str(small_store), "--student", EMBEDDED_STUDENT, "--online-teacher", EMBEDDED_TEACHER,
        "--steps", "5", "--log-every", "5", "--eval-samples", "4", "--out", str(out), "--device", "cpu", "--no-progress",
        env=ONE_THREAD,
    )

    assert done.returncode == 0, done.stderr
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in steps if "step" in entry] == [5]
    assert yaml.safe_load((out / "config.yaml").read_text())["online_teacher"] == EMBEDDED_TEACHER
    assert "held-out:" in done.stdout


def test_online_cli_wrong_teacher_exits_2(small_store: Path, tmp_path: Path) -> None:
    done = run_cli(
        "distill", "--store", str(small_store), "--online-teacher", EMBEDDED_STUDENT,
        "--steps", "1", "--out", str(tmp_path / "run"), "--device", "cpu", "--no-progress",
        env=ONE_THREAD,
    )

    assert done.returncode == 2
    assert "error: online teacher 'embedded-student'" in done.stderr
    assert "Traceback" not in done.stderr
