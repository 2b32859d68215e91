"""Tests for training runs: checkpoints and exact resumption, the non-finite guard, the extra
objectives and remedies, and what a run leaves behind (record, plots, metrics).

Runs are 8-20 steps on the small store, on CPU in fp32, so each takes about a second
after the models load.
"""

from __future__ import annotations

import json
import math
import shutil
import struct
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file

from distill.checkpoint import COMPLETE_MARKER, STATE_FILE, TRAINER_STATE_FILE, complete_checkpoints
from distill.config import load_config
from distill.losses import layer_std
from distill.recipe import DistillRecipe
from distill.stream import KVSampleDataset, collate_samples
from distill.student import load_student, student_kv
from extract.errors import UserError
from extract.store import open_store
from extract.store.shards import hash_shard

STEPS = 20
HALF = STEPS // 2
# The uninterrupted run of the resume tests: dropout on (the default 0.1), two
# micro-batches per step, a checkpoint every 5 steps and three kept.
RESUME_ARGS = (
    "--steps", str(STEPS), "--batch-size", "2", "--grad-accum", "2", "--log-every", "2", "--dropout", "0.1",
    "--checkpoint-every", "5", "--keep-checkpoints", "3", "--device", "cpu", "--no-progress",
)


# One intra-op thread: these models are tiny, and on a loaded 2-core machine two
# spinning OpenMP threads per process took a 20-step run from 1.5 s to 29 s.
SINGLE_THREAD = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def distill_cli(store: Path, out: Path, *args: str):
    return run_cli("distill", "--store", str(store), "--out", str(out), *args, env=SINGLE_THREAD)


def training_entries(path: Path) -> dict[int, dict]:
    """Training metrics of a metrics.jsonl by step, without the wall-clock field."""
    entries = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if "step" in entry and "event" not in entry:
            entry.pop("seconds")
            entries[entry["step"]] = entry
    return entries


def read_record(out: Path) -> dict:
    return yaml.safe_load((out / "record.yaml").read_text(encoding="utf-8"))


def make_recipe(store: Path, out: Path, **overrides) -> DistillRecipe:
    values = {"store": str(store), "out": str(out), "device": "cpu", "num_workers": 0, "log_every": 1, **overrides}
    recipe = DistillRecipe(load_config(None, values), progress=False)
    recipe.setup()
    return recipe


def poke_nan(store: Path, sample_id: int) -> None:
    """Overwrite the first key value of one sample with NaN in its safetensors shard, and change nothing else."""
    with open_store(store) as reader:
        ref = reader.samples[sample_id]
        shard = store / reader.manifest.shards[ref.shard].path
    with open(shard, "r+b") as handle:
        (header_size,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(header_size))
        entry = header["kv"]
        nan = {"F32": struct.pack("<f", math.nan), "F16": struct.pack("<e", math.nan), "BF16": b"\xc0\x7f"}[entry["dtype"]]
        row_values = math.prod(entry["shape"][1:])
        handle.seek(8 + header_size + entry["data_offsets"][0] + ref.start * row_values * len(nan))
        handle.write(nan)


# ----------------------------------------------------------------------------- checkpoints and resume


@pytest.fixture(scope="module")
def uninterrupted_run(small_store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = distill_cli(small_store, out, *RESUME_ARGS, "--num-workers", "0")
    assert result.returncode == 0, result.stderr
    (out.parent / "stderr.txt").write_text(result.stderr, encoding="utf-8")
    return out


def test_checkpoints_complete_and_pruned(uninterrupted_run):
    checkpoints = complete_checkpoints(uninterrupted_run)
    assert [c.step for c in checkpoints] == [10, 15, 20]
    for checkpoint in checkpoints:
        assert json.loads((checkpoint.path / COMPLETE_MARKER).read_text()) == {"step": checkpoint.step}
        assert (checkpoint.path / "student" / "model.safetensors").is_file()
        assert (checkpoint.path / "projector.safetensors").is_file()
        state = json.loads((checkpoint.path / STATE_FILE).read_text())
        assert state["step"] == checkpoint.step
        trainer_state = torch.load(checkpoint.path / TRAINER_STATE_FILE, weights_only=True)
        assert trainer_state["scheduler"]["last_epoch"] == checkpoint.step
        assert set(trainer_state["optimizer"]["state"]), "optimizer moments were not saved"
    leftovers = [p.name for p in (uninterrupted_run / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("num_workers", ["0", "1"])
def test_resume_matches_uninterrupted(uninterrupted_run, small_store, tmp_path, num_workers):
    # An interruption after step 10: the later checkpoints and final outputs never happened.
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted_run, resumed)
    for name in ("step-0000015", "step-0000020"):
        shutil.rmtree(resumed / "checkpoints" / name)

    result = distill_cli(small_store, resumed, *RESUME_ARGS, "--num-workers", num_workers, "--resume")
    assert result.returncode == 0, result.stderr
    assert "resuming at step 10 of 20" in result.stderr

    expected = training_entries(uninterrupted_run / "metrics.jsonl")
    actual = training_entries(resumed / "metrics.jsonl")
    assert sorted(actual) == sorted(expected)
    for step in range(HALF, STEPS + 1, 2):
        for key, value in expected[step].items():
            if isinstance(value, float):
                assert actual[step][key] == pytest.approx(value, abs=1e-6), (step, key)
            else:
                assert actual[step][key] == value, (step, key)
    final, resumed_final = read_record(uninterrupted_run)["results"]["final"], read_record(resumed)["results"]["final"]
    for key in ("raw_cos", "centred_cos", "baseline_cos"):
        assert resumed_final[key] == pytest.approx(final[key], abs=1e-6)
    assert read_record(resumed)["training"]["resumed_from"].endswith("step-0000010")


def test_resume_without_rng_restore_differs(uninterrupted_run, small_store, tmp_path, monkeypatch):
    # Guards the test above: dropout makes the trajectory depend on the restored RNG.
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted_run, resumed)
    for name in ("step-0000015", "step-0000020"):
        shutil.rmtree(resumed / "checkpoints" / name)
    monkeypatch.setattr("distill.recipe.restore_rng", lambda *states: None)
    recipe = make_recipe(
        small_store, resumed, steps=STEPS, batch_size=2, grad_accum=2, log_every=2, checkpoint_every=5,
        keep_checkpoints=3, resume=True,
    )
    recipe.train()
    expected = training_entries(uninterrupted_run / "metrics.jsonl")
    actual = training_entries(resumed / "metrics.jsonl")
    assert abs(actual[STEPS]["loss"] - expected[STEPS]["loss"]) > 1e-6


def test_resume_rejects_changed_config(uninterrupted_run, small_store, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted_run, resumed)
    result = distill_cli(small_store, resumed, *RESUME_ARGS, "--student-lr", "0.001", "--resume")
    assert result.returncode == 2
    assert "student_lr: now 0.001, checkpoint 5e-05" in result.stderr
    assert "Traceback" not in result.stderr
    assert (resumed / "record.yaml").is_file(), "a rejected resume must leave the finished run's record"


def test_resume_rejects_other_store(uninterrupted_run, small_store, tmp_path):
    # A valid store with other content: one value changed and its checksum updated.
    other = tmp_path / "other-store"
    shutil.copytree(small_store, other)
    poke_nan(other, 0)
    manifest_path = other / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    with open_store(small_store) as reader:
        shard_path = reader.manifest.shards[reader.samples[0].shard].path
    for record in manifest["shards"]:
        if record["path"] == shard_path:
            record["bytes"], record["sha256"] = hash_shard(other / shard_path)
    manifest_path.write_text(json.dumps(manifest))

    resumed = tmp_path / "resumed"
    shutil.copytree(uninterrupted_run, resumed)
    config = dict(steps=STEPS, batch_size=2, grad_accum=2, checkpoint_every=5, keep_checkpoints=3, resume=True)
    with pytest.raises(UserError, match="content fingerprint sha256:.* but the checkpoint was trained on sha256:"):
        make_recipe(other, resumed, **config)


def test_resume_needs_checkpoint(small_store, tmp_path):
    with pytest.raises(UserError, match="--resume found no complete checkpoint"):
        make_recipe(small_store, tmp_path / "empty", steps=4, resume=True)


def test_config_rejects_empty_objective():
    with pytest.raises(UserError, match="nothing would be trained"):
        load_config(None, {"store": "x", "kv_weight": 0.0})
    with pytest.raises(UserError, match="--resume continues the run"):
        load_config(None, {"store": "x", "resume": True, "overwrite": True})
    with pytest.raises(UserError, match="--kv-weight is 0"):
        load_config(None, {"store": "x", "kv_weight": 0.0, "ce_weight": 1.0, "projector_warmup_steps": 2})


# ----------------------------------------------------------------------------- non-finite guard


def test_nan_in_store_stops_naming_sample(small_store, copy_store, tmp_path):
    store = copy_store(small_store)
    with open_store(store) as reader:
        train_ids = reader.sample_ids("train")
    poisoned = train_ids[5]
    poke_nan(store, poisoned)

    # The shard's checksum no longer matches, so the default verification rejects the store.
    with pytest.raises(UserError, match="failed verification"):
        make_recipe(store, tmp_path / "verified", steps=2)

    # Without verification, the first batch holding the sample stops the run: damaged
    # teacher data is an input error, not a numerical accident to skip over.
    out = tmp_path / "run"
    result = distill_cli(
        store, out, "--no-verify-store", "--steps", str(STEPS), "--batch-size", "2", "--grad-accum", "2",
        "--num-workers", "0", "--device", "cpu", "--no-progress",
    )
    assert result.returncode == 2
    assert f"store sample {poisoned} contain NaN or Inf" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (out / "student").exists()


def test_diverging_run_stops(small_store, tmp_path):
    out = tmp_path / "run"
    recipe = make_recipe(small_store, out, steps=STEPS, student_lr=1e30, projector_lr=1e30, max_nonfinite=3)
    with pytest.raises(UserError, match="training stopped at step 4: 3 optimizer steps in a row had a non-finite loss"):
        recipe.train()

    record = read_record(out)
    assert record["results"]["status"] == "stopped"
    assert record["results"]["stop_reason"].startswith("training stopped at step 4")
    assert record["results"]["skipped_steps"] == {"count": 3, "steps": [2, 3, 4]}
    assert record["results"]["final"] is None
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "event" in line]
    assert [e["step"] for e in events] == [2, 3, 4]
    assert all(len(e["sample_ids"]) == 4 for e in events)
    assert not (out / "student").exists()


# ----------------------------------------------------------------------------- objectives and remedies


def test_ce_only_control_keeps_projector(small_store, tmp_path):
    recipe = make_recipe(small_store, tmp_path / "run", steps=12, kv_weight=0.0, ce_weight=1.0, student_lr=1e-3)
    projector_before = {k: v.clone() for k, v in recipe.projector.state_dict().items()}
    recipe.train()
    record = recipe.save()

    for name, tensor in recipe.projector.state_dict().items():
        assert torch.equal(tensor, projector_before[name]), name
    ce = [entry["ce_loss"] for entry in recipe.history]
    assert ce[-1] < ce[0] - 0.5
    assert record["results"]["final"]["centred_cos"] == pytest.approx(recipe.final["centred_cos"], abs=1e-6)
    probe = collate_samples([KVSampleDataset(recipe.store, recipe.train_ids[:1])[0]])
    targets = "answer tokens" if getattr(probe, "answer_mask", None) is not None else "all real tokens (the store has no answer mask)"
    assert record["objective"]["ce_targets"] == targets
    assert record["objective"]["summary"].startswith("0 x mercator_centred (metrics only) + 1 x answer-token cross-entropy")


def test_projector_warmup_freezes_student(small_store, tmp_path):
    out = tmp_path / "run"
    recipe = make_recipe(small_store, out, steps=8, projector_warmup_steps=4, checkpoint_every=4, student_lr=1e-3)
    student_before = {k: v.clone() for k, v in recipe.student.state_dict().items()}
    recipe.train()

    at_warmup_end = load_file(str(out / "checkpoints" / "step-0000004" / "student" / "model.safetensors"))
    for name, tensor in at_warmup_end.items():
        assert torch.equal(tensor, student_before[name]), name
    changed = [name for name, tensor in recipe.student.state_dict().items() if not torch.equal(tensor, student_before[name])]
    assert changed, "the student never trained after the warm-up"


def test_variance_floor_target_is_measured(small_store, student_path, tmp_path):
    recipe = make_recipe(small_store, tmp_path / "run", steps=8, loss="mercator", variance_floor=1.0, variance_target=0.5)
    recipe.train()
    record = recipe.save()

    # The target, measured again here: half the untrained student's per-layer std on
    # the first batch_size training samples.
    student, _, _ = load_student(student_path, recipe.store.manifest, torch.device("cpu"))
    student.eval()
    dataset = KVSampleDataset(recipe.store, recipe.train_ids[:4])
    batch = collate_samples([dataset[i] for i in range(4)])
    with torch.no_grad():
        keys, values = student_kv(student, batch.input_ids, batch.attention_mask, batch.position_ids)
    expected = 0.5 * layer_std(torch.cat([keys, values], dim=1), batch.attention_mask)
    assert record["objective"]["variance_target_std"] == pytest.approx(expected.tolist(), rel=1e-5)
    assert record["objective"]["remedies"] == ["variance floor"]
    assert all(0.0 <= entry["variance_penalty"] <= 1.0 for entry in recipe.history)


def test_kd_needs_topk_store(small_store, tmp_path):
    probe = collate_samples([KVSampleDataset(open_store(small_store), [0])[0]])
    if getattr(probe, "topk_ids", None) is not None:
        pytest.skip("the small store has top-k log-probabilities")
    with pytest.raises(UserError, match=r"re-extract with --topk-logprobs K"):
        make_recipe(small_store, tmp_path / "run", steps=4, kd_weight=1.0)


# ----------------------------------------------------------------------------- outputs


def test_run_outputs(uninterrupted_run):
    for name in ("curves.png", "layers.png"):
        assert (uninterrupted_run / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    record = read_record(uninterrupted_run)
    results = record["results"]
    assert results["status"] == "completed"
    assert results["skipped_steps"] == {"count": 0, "steps": []}
    assert set(results["final"]) >= {"raw_cos", "centred_cos", "baseline_cos"}
    assert record["objective"]["remedies"] == ["centred cosine"]
    assert record["training"]["grad_accum"] == 2
    entries = training_entries(uninterrupted_run / "metrics.jsonl")
    assert sorted(entries) == list(range(2, STEPS + 1, 2))
    assert all(math.isfinite(entry["grad_norm"]) for entry in entries.values())
    first = results["first_step_train_centred_cos_above_0_9"]
    crossed = [step for step, entry in entries.items() if entry["centred_cos"] > 0.9]
    assert first is None or first <= min(crossed, default=first)


def test_tensorboard_or_notice(uninterrupted_run):
    stderr = (uninterrupted_run.parent / "stderr.txt").read_text(encoding="utf-8")
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        assert stderr.count("TensorBoard logging is off") == 1
    else:
        assert any((uninterrupted_run / "tensorboard").iterdir())
