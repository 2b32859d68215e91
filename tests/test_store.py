"""Tests for the KV store: shard round trips on both backends, the manifest, and verify."""

from __future__ import annotations

import copy
import gc
import json
import pickle
import re
from pathlib import Path

import pytest
import torch
from conftest import run_cli

from extract.errors import StoreError
from extract.store import (
    BACKENDS,
    FORMAT_VERSION,
    KVLayout,
    Manifest,
    ShardContents,
    StoreWriter,
    content_fingerprint,
    open_store,
    read_manifest,
)
from extract.store.manifest import parse_manifest
from extract.store.shards import SafetensorsShard
from extract.store.verify import verify_store

# Bit patterns of each store dtype, viewed as the integer type of the same width.
BIT_VIEWS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
LAYOUT = dict(layers=(0, 2, 3), num_kv_heads=2, head_dim=4)

# Three shards of hand-made samples: (sample lengths, rows, sources, splits as names).
SHARD_SAMPLES = [
    ([5, 3, 1], [7, 0, 12], [0, 0, 1], ["train", "train", "heldout"]),
    ([4], [3], [1], ["heldout"]),
    ([2, 2, 6, 1], [1, 2, 4, 5], [0, 0, 0, 0], ["train", "heldout", "train", "train"]),
]


def make_manifest(backend: str, dtype: str, planned_shards: int) -> Manifest:
    return Manifest(
        backend=backend,
        layout=KVLayout(dtype=dtype, **LAYOUT),
        teacher={"name_or_path": "test-teacher", "num_hidden_layers": 4},
        tokenizer={"fingerprint": "sha256:" + "0" * 64},
        dataset={"max_length": 16},
        plan={"shards": planned_shards},
        package_version="test",
    )


def random_bits(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    """Every bit pattern of ``dtype`` is possible: NaN payloads, -0.0, subnormals, infinities."""
    int_dtype = BIT_VIEWS[dtype]
    info = torch.iinfo(int_dtype)
    return torch.randint(info.min, info.max + 1, shape, dtype=int_dtype, generator=generator).view(dtype)


def make_shard(lengths, rows, sources, splits, dtype: torch.dtype, generator: torch.Generator) -> ShardContents:
    tokens = sum(lengths)
    layout = KVLayout(dtype="float32", **LAYOUT)
    offsets = [0]
    for length in lengths:
        offsets.append(offsets[-1] + length)
    return ShardContents(
        kv=random_bits((tokens, *layout.token_shape), dtype, generator),
        token_ids=torch.randint(0, 2**31 - 1, (tokens,), dtype=torch.int32, generator=generator),
        sample_offsets=torch.tensor(offsets, dtype=torch.int64),
        sample_rows=torch.tensor(rows, dtype=torch.int64),
        sample_sources=torch.tensor(sources, dtype=torch.uint8),
        sample_splits=torch.tensor([("train", "heldout").index(s) for s in splits], dtype=torch.uint8),
        sample_answer_starts=torch.tensor([length // 2 for length in lengths], dtype=torch.int64),
    )


def write_store(path: Path, backend: str, dtype: str) -> list[ShardContents]:
    generator = torch.Generator().manual_seed(1)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    writer = StoreWriter.create_or_resume(path, make_manifest(backend, dtype, len(SHARD_SAMPLES)))
    written = []
    for index, samples in enumerate(SHARD_SAMPLES):
        contents = make_shard(*samples, dtype=torch_dtype, generator=generator)
        writer.write_shard(index, contents)
        written.append(contents)
    writer.finish()
    return written


def expected_samples(written: list[ShardContents]):
    """Yield (kv, token ids, row, source, split) of every written sample in store order."""
    for contents in written:
        offsets = contents.sample_offsets.tolist()
        for i in range(len(offsets) - 1):
            start, stop = offsets[i], offsets[i + 1]
            split = ("train", "heldout")[int(contents.sample_splits[i])]
            yield (
                contents.kv[start:stop],
                contents.token_ids[start:stop],
                int(contents.sample_rows[i]),
                int(contents.sample_sources[i]),
                split,
            )


def assert_bits_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    view = BIT_VIEWS[expected.dtype]
    assert torch.equal(actual.view(view), expected.view(view))


# Round trip.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_round_trip_bit_exact(tmp_path, backend, dtype):
    written = write_store(tmp_path / "store", backend, dtype)
    expected = list(expected_samples(written))

    with open_store(tmp_path / "store") as store:
        assert len(store) == len(expected) == 8
        for sample_id, (kv, token_ids, row, source, split) in enumerate(expected):
            assert_bits_equal(store.read_kv(sample_id), kv)
            assert torch.equal(store.read_token_ids(sample_id), token_ids)
            ref = store.samples[sample_id]
            assert (ref.row, ref.source, ref.split) == (row, source, split)
            assert ref.length == kv.shape[0]


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_round_trip_offsets_and_shards(tmp_path, backend):
    written = write_store(tmp_path / "store", backend, "bfloat16")

    with open_store(tmp_path / "store") as store:
        assert [ref.shard for ref in store.samples] == [0, 0, 0, 1, 2, 2, 2, 2]
        assert [(ref.start, ref.stop) for ref in store.samples] == [
            (0, 5), (5, 8), (8, 9), (0, 4), (0, 2), (2, 4), (4, 10), (10, 11)
        ]
        manifest = store.manifest
    assert [record.path for record in manifest.shards] == [f"shards/{i:05d}{BACKENDS[backend]}" for i in range(3)]
    assert [record.tokens for record in manifest.shards] == [9, 4, 11]
    assert [record.splits for record in manifest.shards] == [
        {"train": 2, "heldout": 1}, {"train": 0, "heldout": 1}, {"train": 3, "heldout": 1}
    ]
    totals = manifest.totals()
    assert totals == {
        "samples": 8, "tokens": 24, "bytes": sum(r.bytes for r in manifest.shards), "shards": 3,
        "train_samples": 5, "heldout_samples": 3,
    }
    assert manifest.complete
    assert len(written) == 3


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_sample_ids_by_split(tmp_path, backend):
    write_store(tmp_path / "store", backend, "float32")

    with open_store(tmp_path / "store") as store:
        assert store.sample_ids("train") == [0, 1, 4, 6, 7]
        assert store.sample_ids("heldout") == [2, 3, 5]
        assert store.sample_ids() == list(range(8))
        with pytest.raises(ValueError, match="unknown split 'test'"):
            store.sample_ids("test")


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_reader_pickles_for_workers(tmp_path, backend):
    written = write_store(tmp_path / "store", backend, "float16")
    expected = [kv for kv, *_ in expected_samples(written)]
    store = open_store(tmp_path / "store")
    store.read_kv(0)  # open a shard handle before pickling

    clone = pickle.loads(pickle.dumps(store))
    for sample_id in (7, 0, 3):
        assert_bits_equal(clone.read_kv(sample_id), expected[sample_id])

    # The worker process reads through its own unpickled copy of the store.
    reads = torch.utils.data.DataLoader(_ReadDataset(store), batch_size=None, num_workers=1)
    received = list(reads)
    assert len(received) == len(expected)
    for kv, expected_kv in zip(received, expected):
        assert_bits_equal(kv, expected_kv)
    store.close()


class _ReadDataset(torch.utils.data.Dataset):
    def __init__(self, store) -> None:
        self.store = store

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.store.read_kv(index)


@pytest.mark.parametrize("backend", list(BACKENDS))
def test_identical_shards_identical_bytes(tmp_path, backend):
    digests = set()
    for attempt in range(12):
        generator = torch.Generator().manual_seed(4)
        contents = make_shard(*SHARD_SAMPLES[2], dtype=torch.bfloat16, generator=generator)
        writer = StoreWriter.create_or_resume(tmp_path / str(attempt), make_manifest(backend, "bfloat16", 1))
        digests.add(writer.write_shard(0, contents).sha256)
    assert len(digests) == 1


def test_incomplete_store_needs_allow_partial(tmp_path):
    generator = torch.Generator().manual_seed(2)
    writer = StoreWriter.create_or_resume(tmp_path / "store", make_manifest("safetensors", "float32", 2))
    writer.write_shard(0, make_shard(*SHARD_SAMPLES[0], dtype=torch.float32, generator=generator))

    with pytest.raises(StoreError, match=r"incomplete: 1 of 2 shards written; rerun the same extract command"):
        open_store(tmp_path / "store")
    with open_store(tmp_path / "store", allow_partial=True) as store:
        assert len(store) == 3


# Manifest.


@pytest.fixture(scope="module")
def manifest_json(small_store: Path) -> dict:
    return json.loads((small_store / "manifest.json").read_text(encoding="utf-8"))


def _set(obj: dict, dotted: str, value) -> None:
    *parents, last = _split(dotted)
    for key in parents:
        obj = obj[key]
    if value is _DELETE:
        del obj[last]
    else:
        obj[last] = value


def _split(dotted: str) -> list:
    return [int(part) if part.isdigit() else part for part in dotted.split(".")]


_DELETE = object()


def test_manifest_round_trip(manifest_json):
    manifest = parse_manifest(manifest_json)
    again = parse_manifest(json.loads(json.dumps(manifest.to_json())))

    assert again == manifest
    assert manifest.to_json() == manifest_json
    assert manifest.layout == KVLayout(layers=(0, 1, 2, 3, 4, 5), num_kv_heads=4, head_dim=32, dtype="float32")
    assert manifest.layout.bytes_per_token == 6 * 2 * 4 * 32 * 4
    assert len(manifest.shards) == manifest.planned_shards == 14


def test_read_manifest_matches_file(small_store, manifest_json):
    assert read_manifest(small_store).to_json() == manifest_json


@pytest.mark.parametrize(
    "field",
    [
        "format_version", "backend", "kv", "kv.layers", "kv.dtype", "kv.key_position", "kv.num_kv_heads",
        "kv.head_dim", "plan", "plan.shards", "shards", "complete", "teacher", "tokenizer", "dataset",
        "created", "updated", "package_version", "shards.0.path", "shards.0.index", "shards.0.sha256",
        "shards.0.splits", "shards.0.samples", "shards.0.tokens", "shards.0.bytes",
    ],
)
def test_manifest_missing_field(manifest_json, field):
    broken = copy.deepcopy(manifest_json)
    _set(broken, field, _DELETE)
    last = field.rsplit(".", 1)[-1]
    where = field.replace(".0.", "[0].") if field.startswith("shards.0.") else field

    with pytest.raises(StoreError, match=rf"missing field '{re.escape(where)}'") as caught:
        parse_manifest(broken)
    assert last in str(caught.value)


def test_manifest_missing_format(manifest_json):
    broken = copy.deepcopy(manifest_json)
    del broken["format"]
    with pytest.raises(StoreError, match=r"'format' is None, expected 'mercator-kv-store'"):
        parse_manifest(broken)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("format_version", "1", r"'format_version' must be int, got str"),
        ("format_version", True, r"'format_version' must be int, got True"),
        ("complete", "yes", r"'complete' must be bool, got str"),
        ("backend", "hdf5", r"backend 'hdf5' is not one of"),
        ("kv.layers", "0-5", r"'kv.layers' must be list, got str"),
        ("kv.layers", [0, 0], r"'kv.layers' repeats a layer"),
        ("kv.layers", [], r"'kv.layers' must be a non-empty list"),
        ("kv.num_kv_heads", 4.0, r"'kv.num_kv_heads' must be int, got float"),
        ("kv.head_dim", 0, r"'kv.head_dim' = 0 must be positive"),
        ("kv.dtype", "int8", r"'kv.dtype' 'int8' is not one of"),
        ("kv.key_position", "pre-rope", r"'kv.key_position' 'pre-rope' is not one of"),
        ("teacher", [], r"'teacher' must be dict, got list"),
        ("shards", {}, r"'shards' must be list, got dict"),
        ("shards.0.tokens", True, r"'shards\[0\].tokens' must be int, got True"),
        ("shards.0.bytes", -1, r"'shards\[0\].bytes' = -1 is out of range"),
        ("shards.0.index", 3, r"has index 3 at list position 0"),
        ("shards.0.sha256", "ABC", r"'shards\[0\].sha256' of shards/00000.safetensors is not a sha256 hex digest"),
        ("shards.0.sha256", "a" * 64 + "\n", r"'shards\[0\].sha256' of shards/00000.safetensors is not a sha256 hex digest"),
        ("shards.0.path", "shards/00000.zarr", r"shard 'shards/00000.zarr' has the wrong extension for the store's safetensors backend"),
        ("shards.0.splits", {"test": 1}, r"'shards\[0\].splits' of shards/00000.safetensors must map"),
        ("plan.shards", 3, r"14 shards listed but the plan has 3"),
    ],
)
def test_manifest_wrong_type_or_value(manifest_json, field, value, message):
    broken = copy.deepcopy(manifest_json)
    _set(broken, field, value)
    with pytest.raises(StoreError, match=message):
        parse_manifest(broken)


def test_manifest_complete_with_missing_shards(manifest_json):
    broken = copy.deepcopy(manifest_json)
    broken["shards"].pop()
    with pytest.raises(StoreError, match=r"marked complete with 13 of 14 planned shards listed"):
        parse_manifest(broken)


def test_manifest_newer_version_names_both(manifest_json):
    newer = copy.deepcopy(manifest_json)
    newer["format_version"] = FORMAT_VERSION + 1
    expected = (
        f"store format version {FORMAT_VERSION + 1} is newer than this package reads ({FORMAT_VERSION}); "
        "upgrade mercator-kv to read it"
    )
    with pytest.raises(StoreError, match=re.escape(expected)):
        parse_manifest(newer)


@pytest.mark.parametrize(
    "path",
    [
        "../00000.safetensors",
        "/tmp/shards/00000.safetensors",
        "shards/../../00000.safetensors",
        "shards/00000.safetensors/../../outside",
        "shards/0.safetensors",
        "shards/000000.safetensors",
        "shards/00000.bin",
        "shards/00000.safetensors.tmp",
        "shards\\00000.safetensors",
        "./shards/00000.safetensors",
        "shards/00000.safetensors\n",
        "shards/\u0660\u0660\u0660\u0660\u0660.safetensors",
    ],
)
def test_manifest_rejects_shard_path(manifest_json, path):
    broken = copy.deepcopy(manifest_json)
    broken["shards"][0]["path"] = path
    with pytest.raises(StoreError, match=r"is not of the form shards/NNNNN.safetensors\|zarr"):
        parse_manifest(broken)


def test_manifest_accepts_zarr_shard_path(manifest_json):
    zarr_store = copy.deepcopy(manifest_json)
    zarr_store["backend"] = "zarr"
    for record in zarr_store["shards"]:
        record["path"] = record["path"].replace(".safetensors", ".zarr")
    assert parse_manifest(zarr_store).shards[3].path == "shards/00003.zarr"


def test_fingerprint_ignores_times(manifest_json):
    later = copy.deepcopy(manifest_json)
    later["created"] = "2031-01-01T00:00:00+00:00"
    later["updated"] = "2031-01-02T00:00:00+00:00"
    later["package_version"] = "9.9.9"

    fingerprint = content_fingerprint(parse_manifest(manifest_json))
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
    assert content_fingerprint(parse_manifest(later)) == fingerprint


def test_fingerprint_ignores_paths(manifest_json):
    moved = copy.deepcopy(manifest_json)
    moved["teacher"]["name_or_path"] = "/elsewhere/teacher"
    for source in moved["dataset"]["sources"]:
        source["path"] = "/elsewhere/" + Path(source["path"]).name
    assert content_fingerprint(parse_manifest(moved)) == content_fingerprint(parse_manifest(manifest_json))


def test_fingerprint_changes_with_data(manifest_json):
    changed = copy.deepcopy(manifest_json)
    changed["dataset"]["sources"][1]["sha256"] = "0" * 64
    assert content_fingerprint(parse_manifest(changed)) != content_fingerprint(parse_manifest(manifest_json))


def test_fingerprint_changes_with_shard_checksum(manifest_json):
    changed = copy.deepcopy(manifest_json)
    changed["shards"][5]["sha256"] = "f" * 64
    assert content_fingerprint(parse_manifest(changed)) != content_fingerprint(parse_manifest(manifest_json))


def test_fingerprint_changes_with_layout(manifest_json):
    changed = copy.deepcopy(manifest_json)
    changed["kv"]["dtype"] = "bfloat16"
    assert content_fingerprint(parse_manifest(changed)) != content_fingerprint(parse_manifest(manifest_json))


def test_manifest_not_json(tmp_path):
    (tmp_path / "manifest.json").write_bytes(b"{not json")
    with pytest.raises(StoreError, match=r"not valid UTF-8 JSON"):
        read_manifest(tmp_path)


def test_open_store_not_a_store(tmp_path):
    with pytest.raises(StoreError, match=r"no store manifest at .*manifest.json: not a KV store"):
        open_store(tmp_path)
    with pytest.raises(StoreError, match=r"store not found: .* is not a directory"):
        open_store(tmp_path / "absent")


# Verify.


def _shard(store: Path, index: int) -> Path:
    return store / "shards" / f"{index:05d}.safetensors"


def test_verify_clean_store(small_store):
    report = verify_store(small_store)
    assert report.ok, report.problems
    manifest = read_manifest(small_store)
    assert report.shards_checked == 14
    assert report.samples_checked == 64
    assert report.bytes_checked == manifest.totals()["bytes"]


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_verify_flipped_byte(small_store, copy_store):
    store = copy_store(small_store)
    _flip_middle_byte(_shard(store, 6))

    report = verify_store(store)
    assert not report.ok
    assert any(p.startswith("shard shards/00006.safetensors: sha256 ") and "does not match" in p for p in report.problems)
    assert not any("00005" in p or "00007" in p for p in report.problems)


def test_verify_truncated_shard(small_store, copy_store):
    store = copy_store(small_store)
    shard = _shard(store, 3)
    size = shard.stat().st_size
    with open(shard, "r+b") as handle:
        handle.truncate(size - 100)

    report = verify_store(store)
    assert not report.ok
    assert f"shard shards/00003.safetensors: {size - 100} bytes, the manifest lists {size}" in report.problems


def test_verify_missing_shard(small_store, copy_store):
    store = copy_store(small_store)
    _shard(store, 13).unlink()

    report = verify_store(store)
    assert not report.ok
    assert "shard shards/00013.safetensors: missing" in report.problems


@pytest.mark.parametrize("name", ["shards/00099.safetensors", "notes.txt"])
def test_verify_extra_file(small_store, copy_store, name):
    store = copy_store(small_store)
    (store / name).write_bytes(b"extra")

    report = verify_store(store)
    assert not report.ok
    assert any(p.startswith(f"unexpected file in the store: {name}") for p in report.problems)


def test_damaged_shard_closes_own_descriptor(small_store, tmp_path):
    manifest = read_manifest(small_store)
    record = manifest.shards[0]
    damaged = tmp_path / "00000.safetensors"
    damaged.write_bytes(_shard(small_store, 0).read_bytes()[:-100])
    other = tmp_path / "other.txt"
    other.write_bytes(b"still open")

    try:
        SafetensorsShard(damaged, manifest.layout, record)
    except StoreError:
        # The failed reader's descriptor number is free again and goes to this file.
        handle = open(other, "rb")
    else:
        pytest.fail("the truncated shard opened without an error")
    gc.collect()  # the failed reader is gone; it must not have closed this file's descriptor
    with handle:
        assert handle.read() == b"still open"


def test_verify_nan_value(tmp_path):
    generator = torch.Generator().manual_seed(3)
    writer = StoreWriter.create_or_resume(tmp_path / "store", make_manifest("zarr", "float32", 1))
    contents = make_shard(*SHARD_SAMPLES[0], dtype=torch.float32, generator=generator)
    contents.kv = torch.zeros_like(contents.kv)
    contents.kv[6, 1, 0, 1, 2] = float("nan")  # sample 1 covers tokens 5..7
    writer.write_shard(0, contents)
    writer.finish()

    report = verify_store(tmp_path / "store")
    assert report.problems == ["shard shards/00000.zarr: sample 1 (input source 0 row 0) contains NaN or Inf values"]


def test_verify_cli_fails_on_damage(small_store, copy_store):
    store = copy_store(small_store)
    _flip_middle_byte(_shard(store, 2))

    damaged = run_cli("extract", "verify", str(store), "--no-progress", env={"OMP_NUM_THREADS": "1"})
    assert damaged.returncode == 1
    assert re.search(r"^FAULT: shard shards/00002.safetensors: sha256 ", damaged.stdout, re.MULTILINE)
    assert "1 faults;" in damaged.stdout
    assert "Traceback" not in damaged.stderr
