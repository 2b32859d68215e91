"""Tests for the extract stage: stored K/V against the teacher itself, dtypes, backends, resume."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import extract_small_store
from transformers import AutoModelForCausalLM, AutoTokenizer

from extract.data import format_row
from extract.errors import StoreError
from extract.store import open_store, read_manifest
from extract.store.verify import verify_store

# fp32 agreement between a right-padded batched forward pass and an unbatched one.
ATOL = 1e-5


@pytest.fixture(scope="module")
def teacher(teacher_path):
    model = AutoModelForCausalLM.from_pretrained(teacher_path, dtype=torch.float32, attn_implementation="sdpa")
    return model.eval()


@pytest.fixture(scope="module")
def zarr_store(tmp_path_factory, small_data, teacher_path) -> Path:
    return extract_small_store(tmp_path_factory.mktemp("zarr") / "store", small_data, teacher_path, backend="zarr")


@pytest.fixture(params=["safetensors", "zarr"])
def store_path(request) -> Path:
    return request.getfixturevalue("small_store" if request.param == "safetensors" else "zarr_store")


def unbatched_forward(model, token_ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run the teacher on one sample alone, with default positions and no mask.

    Returns the cached keys and values and the k_proj/v_proj outputs (keys before RoPE),
    each [tokens, layers, kv_heads, head_dim] in the model's layer order.
    """
    config = model.config
    heads, head_dim = config.num_key_value_heads, config.head_dim
    projections: dict[str, list[torch.Tensor]] = {"k_proj": [], "v_proj": []}
    hooks = []
    for layer in model.model.layers:
        for name, outputs in projections.items():
            module = getattr(layer.self_attn, name)
            hooks.append(module.register_forward_hook(lambda _m, _i, out, outputs=outputs: outputs.append(out[0])))
    try:
        with torch.no_grad():
            output = model(input_ids=token_ids[None].long(), use_cache=True)
    finally:
        for hook in hooks:
            hook.remove()
    cache = output["cache"] if "cache" in output else output["past_key_values"]
    layers = range(config.num_hidden_layers)
    tokens = token_ids.shape[0]
    return {
        "keys": torch.stack([cache.layers[i].keys[0] for i in layers]).permute(2, 0, 1, 3),
        "values": torch.stack([cache.layers[i].values[0] for i in layers]).permute(2, 0, 1, 3),
        "k_proj": torch.stack(projections["k_proj"]).reshape(len(layers), tokens, heads, head_dim).transpose(0, 1),
        "v_proj": torch.stack(projections["v_proj"]).reshape(len(layers), tokens, heads, head_dim).transpose(0, 1),
    }


def padded_samples(store, shards=(0, 6, 13)) -> list[int]:
    """The shortest sample of each given shard: it ran padded beside longer samples.

    A shard of the small store contains about 700 tokens, within one teacher batch of the
    default --batch-tokens, so the shard's samples ran as one right-padded batch.
    """
    chosen = []
    for shard in shards:
        ids = [i for i, ref in enumerate(store.samples) if ref.shard == shard]
        assert store.samples[ids[0]].length > store.samples[ids[-1]].length
        chosen.append(ids[-1])
    return chosen


def input_texts(small_data) -> dict[tuple[int, int], str]:
    """(source, row) -> the template text of every row of the small data files."""
    texts = {}
    for source, path in enumerate(small_data):
        for row, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            texts[(source, row)] = format_row(json.loads(line), strip=False)
    return texts


def kv_by_row(store) -> dict[tuple[int, int], torch.Tensor]:
    return {(ref.source, ref.row): store.read_kv(i) for i, ref in enumerate(store.samples)}


# Stored K/V against the teacher.


def test_stored_kv_equals_unbatched_teacher(store_path, teacher):
    with open_store(store_path) as store:
        for sample_id in padded_samples(store):
            token_ids = store.read_token_ids(sample_id)
            stored = store.read_kv(sample_id)
            reference = unbatched_forward(teacher, token_ids)

            assert stored.shape == (token_ids.shape[0], 6, 2, 4, 32)
            torch.testing.assert_close(stored[:, :, 0], reference["keys"], atol=ATOL, rtol=0)
            torch.testing.assert_close(stored[:, :, 1], reference["values"], atol=ATOL, rtol=0)


def test_stored_keys_are_post_rope(small_store, teacher):
    with open_store(small_store) as store:
        sample_id = padded_samples(store, shards=(2,))[0]
        stored = store.read_kv(sample_id)
        reference = unbatched_forward(teacher, store.read_token_ids(sample_id))
    keys, pre_rope = stored[:, :, 0], reference["k_proj"]

    # RoPE rotates pairs of channels by a position-dependent angle: the identity at
    # position 0, a norm-preserving change at every later position.
    torch.testing.assert_close(keys[0], pre_rope[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(keys.norm(dim=-1), pre_rope.norm(dim=-1), atol=1e-4, rtol=1e-5)
    assert (keys[1:] - pre_rope[1:]).abs().amax(dim=(1, 2, 3)).min() > 1e-3
    torch.testing.assert_close(stored[:, :, 1], reference["v_proj"], atol=ATOL, rtol=0)


def test_layer_subset_keeps_teacher_order(tmp_path, small_data, teacher_path, teacher):
    store_dir = extract_small_store(tmp_path / "store", small_data, teacher_path, layers="5,1,3", limit=6)
    with open_store(store_dir) as store:
        assert store.manifest.layout.layers == (1, 3, 5)
        sample_id = len(store) - 1
        stored = store.read_kv(sample_id)
        reference = unbatched_forward(teacher, store.read_token_ids(sample_id))
    torch.testing.assert_close(stored[:, :, 0], reference["keys"][:, [1, 3, 5]], atol=ATOL, rtol=0)
    torch.testing.assert_close(stored[:, :, 1], reference["values"][:, [1, 3, 5]], atol=ATOL, rtol=0)


def test_token_ids_without_padding(store_path, small_data, teacher_path):
    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    texts = input_texts(small_data)
    with open_store(store_path) as store:
        assert len(store) == len(texts) == 64
        total = 0
        for sample_id, ref in enumerate(store.samples):
            expected = tokenizer(texts[(ref.source, ref.row)])["input_ids"] + [tokenizer.eos_token_id]
            stored = store.read_token_ids(sample_id)
            assert stored.tolist() == expected, (ref.source, ref.row)
            assert ref.length == len(expected)
            assert store.read_kv(sample_id).shape[0] == len(expected)
            total += len(expected)
        manifest = store.manifest
    assert manifest.totals()["tokens"] == manifest.plan["tokens"] == total
    assert {(ref.source, ref.row) for ref in store.samples} == set(texts)


def test_splits_follow_source_files(small_store):
    with open_store(small_store) as store:
        assert {ref.split for ref in store.samples if ref.source == 0} == {"train"}
        assert {ref.split for ref in store.samples if ref.source == 1} == {"heldout"}
        assert len(store.sample_ids("train")) == 48
        assert len(store.sample_ids("heldout")) == 16


# Dtypes and backends.


def test_zarr_store_equals_safetensors_store(small_store, zarr_store):
    with open_store(small_store) as safetensors, open_store(zarr_store) as zarr:
        assert zarr.manifest.backend == "zarr"
        assert [ref.row for ref in zarr.samples] == [ref.row for ref in safetensors.samples]
        for sample_id in range(len(safetensors)):
            assert torch.equal(zarr.read_kv(sample_id).view(torch.int32), safetensors.read_kv(sample_id).view(torch.int32))
            assert torch.equal(zarr.read_token_ids(sample_id), safetensors.read_token_ids(sample_id))
    assert verify_store(zarr_store).ok


def test_bfloat16_store_casts_float32(tmp_path, small_data, teacher_path, small_store):
    # Half the bytes per token in half the shard size reproduces the float32 store's plan,
    # so every sample runs in the same teacher batch. Another batch composition changes
    # fp32 results in the last bits, which can flip a bfloat16 rounding.
    bf16_dir = extract_small_store(tmp_path / "bf16", small_data, teacher_path, store_dtype="bfloat16", shard_mb=2)
    with open_store(bf16_dir) as bf16, open_store(small_store) as fp32:
        assert bf16.manifest.layout.dtype == "bfloat16"
        assert bf16.manifest.layout.bytes_per_token * 2 == fp32.manifest.layout.bytes_per_token
        narrow, wide = kv_by_row(bf16), kv_by_row(fp32)
    assert narrow.keys() == wide.keys()
    for key, kv in narrow.items():
        assert kv.dtype == torch.bfloat16
        assert torch.equal(kv.view(torch.int16), wide[key].to(torch.bfloat16).view(torch.int16)), key


# Resume.


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    return int(done.stdout)


def simulate_crash(store: Path, keep_shards: int) -> None:
    """Leave ``store`` as a crash after ``keep_shards`` listed shards would leave it.

    The manifest lists the first shards only and is not complete. The next shard was
    renamed into place but not yet listed, the one after it is a partial temporary file,
    a manifest temporary file is left over, and the lock names a process that is gone.
    """
    manifest = json.loads((store / "manifest.json").read_text(encoding="utf-8"))
    dropped = [record["path"] for record in manifest["shards"][keep_shards:]]
    manifest["shards"] = manifest["shards"][:keep_shards]
    manifest["complete"] = False
    (store / "manifest.json").write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    for path in dropped[1:]:
        (store / path).unlink()
    partial = store / (dropped[1] + ".tmp")
    partial.write_bytes(b"partial shard")
    (store / "manifest.json.tmp").write_text("{", encoding="utf-8")
    (store / "extract.lock").write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "x"}))


def test_resumed_store_equals_fresh(small_store, copy_store, small_data, teacher_path):
    store = copy_store(small_store)
    simulate_crash(store, keep_shards=10)
    with pytest.raises(StoreError, match=r"incomplete: 10 of 14 shards written"):
        open_store(store)

    result = run_resume(store, small_data, teacher_path)

    assert result.shards_resumed == 10
    assert result.samples == sum(record.samples for record in read_manifest(small_store).shards[10:])
    fresh, resumed = read_manifest(small_store), read_manifest(store)
    assert resumed.complete
    assert [(r.path, r.sha256, r.bytes) for r in resumed.shards] == [(r.path, r.sha256, r.bytes) for r in fresh.shards]
    assert sorted(p.name for p in store.iterdir()) == ["manifest.json", "shards"]
    report = verify_store(store)
    assert report.ok, report.problems


def run_resume(store: Path, small_data, teacher_path):
    from extract.pipeline import ExtractOptions, run_extract

    options = dict(teacher=teacher_path, data=small_data[0], heldout=small_data[1], out=store, device="cpu", shard_mb=4, progress=False)
    return run_extract(ExtractOptions(**options))


def test_resume_with_moved_data(small_store, copy_store, small_data, teacher_path, tmp_path):
    moved = (tmp_path / "moved-train.jsonl", tmp_path / "moved-heldout.jsonl")
    for source, target in zip(small_data, moved):
        shutil.copyfile(source, target)
    store = copy_store(small_store)
    simulate_crash(store, keep_shards=12)

    result = run_resume(store, moved, teacher_path)
    assert result.shards_resumed == 12
    assert [r.sha256 for r in read_manifest(store).shards] == [r.sha256 for r in read_manifest(small_store).shards]


def test_rerun_complete_store_noop(small_store, copy_store, small_data, teacher_path):
    store = copy_store(small_store)
    result = run_resume(store, small_data, teacher_path)
    assert result.shards_resumed == 14
    assert result.samples == 0
    assert [r.sha256 for r in read_manifest(store).shards] == [r.sha256 for r in read_manifest(small_store).shards]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_length": 256}, "written with dataset.max_length=512 but this run has 256"),
        ({"layers": "0-2"}, "written with layout.layers=[0, 1, 2, 3, 4, 5] but this run has [0, 1, 2]"),
        ({"backend": "zarr"}, 'written with backend="safetensors" but this run has "zarr"'),
        ({"teacher": "student"}, "written with layout.head_dim=32 but this run has 16"),
    ],
)
def test_resume_other_config_fails(small_store, copy_store, small_data, teacher_path, student_path, overrides, message):
    store = copy_store(small_store)
    simulate_crash(store, keep_shards=3)
    before = (store / "manifest.json").read_bytes()
    if overrides.get("teacher") == "student":
        overrides = {"teacher": student_path}

    with pytest.raises(StoreError) as caught:
        extract_small_store(store, small_data, overrides.pop("teacher", teacher_path), **overrides)
    assert message in str(caught.value)
    assert "write to a new --out directory or rerun with the store's options" in str(caught.value)
    assert (store / "manifest.json").read_bytes() == before
