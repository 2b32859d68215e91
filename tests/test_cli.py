"""End-to-end tests of ``python -m extract`` and ``python -m distill`` on real files."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from conftest import CliResult, run_cli
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from distill.cli import main as distill_main
from distill.config import load_config
from distill.recipe import DistillRecipe
from extract.cli import main as extract_main
from extract.errors import UserError
from extract.models import tokenizer_fingerprint
from extract.store import content_fingerprint, read_manifest
from extract.store.manifest import parse_manifest
from extract.store.verify import verify_store

HELDOUT_LINE = re.compile(r"^held-out: raw (-?[0-9.]+) centred (-?[0-9.]+) baseline (-?[0-9.]+) \((\w+)")
# Every record section and key that an experiment record must carry.
RECORD_FIELDS = {
    "experiment": ("name", "date"),
    "teacher": ("name", "kv_width", "layers"),
    "student": ("name", "kv_width", "layers"),
    "projector": ("type", "mlp_ratio", "dropout", "parameters"),
    "loss": ("type", "alpha", "beta"),
    "training": ("student_lr", "projector_lr", "batch_size", "steps"),
    "results": ("initial", "final", "improvement", "target_reached", "first_step_train_centred_cos_above_0_9"),
}


def cli(*args: str) -> CliResult:
    """Run a tool with one OpenMP thread, which is enough for the embedded models.

    On a 2-core machine shared with other jobs, a 20-step distill run took 33 s with two
    OpenMP threads, which wait for each other, and 3 s with one.
    """
    return run_cli(*args, env={"OMP_NUM_THREADS": "1"})


def assert_ok(result: CliResult) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr


def assert_user_error(result: CliResult, *fragments: str) -> str:
    """Check a bad-input exit: code 2, one ``error:`` line containing ``fragments``, no traceback."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


def extract_args(data: Path, out: Path, *extra: str) -> list[str]:
    return ["extract", "--data", str(data), "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def distill_args(store: Path, out: Path, *extra: str) -> list[str]:
    return ["distill", "--store", str(store), "--out", str(out), "--device", "cpu", "--no-progress", *extra]


def heldout_figures(output: str) -> dict[str, float]:
    lines = [line for line in output.splitlines() if line.startswith("held-out:")]
    assert len(lines) == 1, output
    match = HELDOUT_LINE.match(lines[0])
    assert match, lines[0]
    raw, centred, baseline, label = match.groups()
    return {"raw": float(raw), "centred": float(centred), "baseline": float(baseline), "label": label}


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, small_data) -> tuple[Path, CliResult]:
    out = tmp_path_factory.mktemp("cli") / "store"
    result = cli(*extract_args(small_data[0], out, "--heldout", str(small_data[1]), "--shard-mb", "4"))
    return out, result


@pytest.fixture(scope="module")
def zarr_cli_store(tmp_path_factory, small_data) -> tuple[Path, CliResult]:
    out = tmp_path_factory.mktemp("cli") / "zarr-store"
    result = cli(*extract_args(small_data[0], out, "--heldout", str(small_data[1]), "--shard-mb", "4", "--format", "zarr"))
    return out, result


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, cli_store) -> tuple[Path, CliResult]:
    out = tmp_path_factory.mktemp("cli") / "run"
    result = cli(*distill_args(cli_store[0], out, "--steps", "20", "--log-every", "10"))
    return out, result


# Extract, then distill.


def test_extract_cli_writes_store(cli_store):
    store, result = cli_store
    assert_ok(result)
    manifest = read_manifest(store)
    assert manifest.complete
    assert manifest.backend == "safetensors"
    assert manifest.totals()["train_samples"] == 48
    assert manifest.totals()["heldout_samples"] == 16
    summary = [line for line in result.stdout.splitlines() if line.startswith("extract: ")]
    assert len(summary) == 1
    assert f"holds 64 samples (48 train, 16 held-out), {manifest.totals()['tokens']} tokens" in summary[0]
    assert f"in {len(manifest.shards)} shards" in summary[0]


def test_distill_cli_outputs(cli_run, cli_store):
    run, result = cli_run
    assert_ok(result)
    for name in ("student", "projector.safetensors", "metrics.jsonl", "record.yaml", "config.yaml"):
        assert (run / name).exists(), name

    student = AutoModelForCausalLM.from_pretrained(run / "student")
    assert student.config.num_hidden_layers == 3
    tokenizer = AutoTokenizer.from_pretrained(run / "student")
    assert len(tokenizer) == read_manifest(cli_store[0]).tokenizer["size"]

    projector = load_file(str(run / "projector.safetensors"))
    record = yaml.safe_load((run / "record.yaml").read_text(encoding="utf-8"))
    assert sum(t.numel() for t in projector.values()) == record["projector"]["parameters"]


def test_distill_cli_metrics(cli_run):
    run, _ = cli_run
    entries = [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    evals = [e for e in entries if "eval" in e]
    steps = [e for e in entries if "step" in e]

    assert [e["eval"] for e in evals] == ["initial held-out", "held-out"]
    assert [e["step"] for e in steps] == [10, 20]
    for entry in steps:
        for key in ("loss", "cos_sim", "centred_cos", "mag_ratio", "grad_norm", "student_lr", "projector_lr"):
            assert isinstance(entry[key], float), key
    # Cosine annealing ends at zero after exactly --steps steps.
    assert steps[-1]["student_lr"] == pytest.approx(0.0, abs=1e-12)
    assert evals[-1]["tokens"] > 0


def test_distill_cli_record(cli_run, cli_store):
    run, result = cli_run
    record = yaml.safe_load((run / "record.yaml").read_text(encoding="utf-8"))
    for section, keys in RECORD_FIELDS.items():
        for key in keys:
            assert key in record[section], f"{section}.{key}"
    assert "notes" in record

    # Embedded teacher: 6 layers of 4 KV heads x 32; embedded student: 3 layers of 2 x 16.
    assert (record["teacher"]["kv_width"], record["teacher"]["layers"]) == (128, 6)
    assert (record["student"]["kv_width"], record["student"]["layers"]) == (32, 3)
    # Elastic Bottleneck per K and per V: LayerNorm(128), Linear(128, 128), Linear(128, 32).
    assert record["projector"]["parameters"] == 2 * (2 * 128 + 128 * 128 + 128 + 128 * 32 + 32)
    assert record["training"]["steps"] == 20
    assert record["training"]["batch_size"] == 4
    assert record["loss"] == {"type": "mercator_centred", "alpha": 1.0, "beta": 0.0}

    results = record["results"]
    improvement = results["improvement"]["centred_cos"]
    assert improvement == pytest.approx(results["final"]["centred_cos"] - results["initial"]["centred_cos"], abs=2e-6)
    manifest = read_manifest(cli_store[0])
    assert record["store"]["fingerprint"] == content_fingerprint(manifest)

    figures = heldout_figures(result.stdout)
    final = results["final"]
    assert figures["raw"] == pytest.approx(final["raw_cos"], abs=5e-5)
    assert figures["centred"] == pytest.approx(final["centred_cos"], abs=5e-5)
    assert figures["baseline"] == pytest.approx(final["baseline_cos"], abs=5e-5)


def test_extract_info(cli_store):
    store, _ = cli_store
    result = cli("extract", "info", str(store))
    assert_ok(result)
    manifest = read_manifest(store)
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert lines["store"] == f"{store} (format v1, safetensors, complete)"
    assert lines["kv"] == "layers 0-5, float32, keys post-rope, 6144 bytes per token"
    assert lines["samples"] == "64 (48 train, 16 held-out)"
    assert lines["tokens"] == str(manifest.totals()["tokens"])
    assert lines["size"].endswith(f"in {len(manifest.shards)} shards")
    assert lines["teacher"].startswith("embedded-teacher [qwen2, 6 layers, 4 KV heads x 32")


def test_extract_info_json(cli_store):
    store, _ = cli_store
    result = cli("extract", "info", str(store), "--json")
    assert_ok(result)
    printed = json.loads(result.stdout)
    assert printed == json.loads((store / "manifest.json").read_text(encoding="utf-8"))
    assert parse_manifest(printed) == read_manifest(store)


# Help.


@pytest.mark.parametrize("module", ["extract", "distill"])
def test_help_of_module(module):
    result = cli(module, "--help")
    assert_ok(result)
    assert result.stdout.startswith("Usage: ")
    commands = {"extract": ("run", "info", "verify"), "distill": ("train", "configs")}[module]
    for command in commands:
        assert re.search(rf"^  {command}\s+\S", result.stdout, re.MULTILINE), command


@pytest.mark.parametrize(
    ("main", "command", "expected"),
    [
        (extract_main, "run", ("--teacher", "--data", "--heldout-fraction", "--out", "--format", "--dtype", "--max-length", "--shard-mb")),
        (extract_main, "info", ("STORE", "--json")),
        (extract_main, "verify", ("STORE", "--no-values")),
        (distill_main, "train", ("--config", "--store", "--student", "--out", "--loss", "--steps", "--student-lr", "--overwrite")),
        (distill_main, "configs", ("List the shipped YAML configs",)),
    ],
)
def test_help_of_command(main, command, expected):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Usage: ")
    for text in expected:
        assert text in result.output, text


def test_distill_configs_lists_yaml():
    result = CliRunner().invoke(distill_main, ["configs"])
    assert result.exit_code == 0
    names = {Path(line).name for line in result.output.splitlines()}
    assert {"default.yaml", "embedded.yaml"} <= names


# Real data and the Zarr backend.


def test_extract_real_gsm8k_rows(real_gsm8k, tmp_path):
    data = tmp_path / "gsm8k-20.jsonl"
    data.write_text("".join(real_gsm8k.read_text(encoding="utf-8").splitlines(keepends=True)[:20]), encoding="utf-8")
    store = tmp_path / "store"

    result = cli(*extract_args(data, store, "--heldout-fraction", "0.2"))
    assert_ok(result)
    report = verify_store(store)
    assert report.ok, report.problems
    assert report.samples_checked == 20

    manifest = read_manifest(store)
    assert manifest.totals()["train_samples"] == 16
    assert manifest.totals()["heldout_samples"] == 4
    assert manifest.dataset["heldout_fraction"] == 0.2
    assert manifest.dataset["rows_read"] == 20
    assert [source["split"] for source in manifest.dataset["sources"]] == ["mixed"]


def test_extract_cli_zarr_store(zarr_cli_store, cli_store):
    store, result = zarr_cli_store
    assert_ok(result)
    manifest = read_manifest(store)
    assert manifest.backend == "zarr"
    assert manifest.complete
    assert all(record.path.endswith(".zarr") and (store / record.path).is_dir() for record in manifest.shards)
    totals, safetensors_totals = manifest.totals(), read_manifest(cli_store[0]).totals()
    for key in ("samples", "tokens", "shards", "train_samples", "heldout_samples"):
        assert totals[key] == safetensors_totals[key], key
    report = verify_store(store)
    assert report.ok, report.problems


def test_distill_mercator_warns_on_collapse(zarr_cli_store, tmp_path):
    # Raw cosine as the objective, with learning rates that make the student's K/V
    # nearly constant within 30 steps on this store.
    result = cli(
        *distill_args(
            zarr_cli_store[0], tmp_path / "run", "--loss", "mercator", "--steps", "30", "--log-every", "30",
            "--student-lr", "1e-2", "--projector-lr", "1e-2", "--dropout", "0",
        )
    )
    assert_ok(result)
    figures = heldout_figures(result.stdout)
    assert figures["baseline"] > 0.9, figures
    assert abs(figures["raw"] - figures["baseline"]) <= 0.05, figures
    notes = [line for line in result.stdout.splitlines() if line.startswith("note: raw cosine")]
    assert len(notes) == 1
    assert "within 0.05 of the mean-vector baseline" in notes[0]
    assert "warning: raw cosine" in result.stderr


# Bad input.


def test_missing_data_file(tmp_path):
    out = tmp_path / "store"
    result = cli(*extract_args(tmp_path / "absent.jsonl", out))
    assert_user_error(result, "data file not found:", "absent.jsonl")
    assert not out.exists()


def test_invalid_json_names_line(small_data, tmp_path):
    data = tmp_path / "bad.jsonl"
    good = small_data[0].read_text(encoding="utf-8").splitlines()[:2]
    data.write_text("\n".join([*good, '{"question": "Q?", "answer": ', good[0]]) + "\n", encoding="utf-8")
    out = tmp_path / "store"

    result = cli(*extract_args(data, out))
    assert_user_error(result, f"{data} line 3: invalid JSON", "pass --skip-bad-rows")
    assert not out.exists()


def test_row_without_fields(tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"text": "fine"}\n{"prompt": "Q?", "completion": "A"}\n', encoding="utf-8")
    out = tmp_path / "store"

    result = cli(*extract_args(data, out))
    assert_user_error(result, "line 2: no 'question'/'answer' or 'text' field (keys: ['completion', 'prompt'])")
    assert not out.exists()


def test_student_with_other_tokenizer(small_store, student_path, tmp_path):
    student = tmp_path / "student"
    shutil.copytree(student_path, student)
    tokenizer = AutoTokenizer.from_pretrained(student)
    tokenizer.add_tokens(["<extra-token>"])
    tokenizer.save_pretrained(student)
    changed = tokenizer_fingerprint(AutoTokenizer.from_pretrained(student))
    stored = read_manifest(small_store).tokenizer["fingerprint"]
    assert changed != stored
    # An earlier run in --out must survive the rejected one, even with --overwrite.
    out = tmp_path / "run"
    out.mkdir()
    (out / "record.yaml").write_text("earlier run\n", encoding="utf-8")

    result = cli(*distill_args(small_store, out, "--student", str(student), "--steps", "2", "--overwrite"))
    assert_user_error(result, f"student tokenizer {student}", changed[:23], stored[:23])
    assert (out / "record.yaml").read_text(encoding="utf-8") == "earlier run\n"


def test_store_that_is_not_a_store(tmp_path):
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a store", encoding="utf-8")
    out = tmp_path / "run"

    result = cli(*distill_args(folder, out, "--steps", "2"))
    assert_user_error(result, f"no store manifest at {folder / 'manifest.json'}: not a KV store")
    assert not out.exists()


@pytest.mark.parametrize("module", ["extract", "distill"])
def test_out_that_is_a_file(module, small_data, small_store, tmp_path):
    out = tmp_path / "taken"
    out.write_text("a file", encoding="utf-8")
    args = extract_args(small_data[0], out) if module == "extract" else distill_args(small_store, out, "--steps", "2")

    result = cli(*args)
    assert_user_error(result, f"--out {out}: {out} is a file, not a directory")
    assert out.read_text(encoding="utf-8") == "a file"


@pytest.mark.parametrize("place", ["store", "inside-store", "above-store"])
def test_out_overlapping_store(place, small_store, copy_store):
    store = copy_store(small_store)
    out = {"store": store, "inside-store": store / "run", "above-store": store.parent}[place]
    config = load_config(None, {"store": str(store), "out": str(out), "overwrite": True, "device": "cpu"})

    # The check runs first in setup, before anything is loaded or deleted.
    with pytest.raises(UserError, match=r"--out .* and --store .* overlap; write the run outside the store"):
        DistillRecipe(config, progress=False).setup()
    assert verify_store(store).ok


def test_unknown_config_key(small_store, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("steps: 2\nlearning_rate: 0.1\n", encoding="utf-8")

    result = cli(*distill_args(small_store, tmp_path / "run", "--config", str(config)))
    assert_user_error(result, "unknown config keys ['learning_rate']", str(config), "valid keys: store,")


def test_negative_steps(small_store, tmp_path):
    result = cli(*distill_args(small_store, tmp_path / "run", "--steps", "-5"))
    assert_user_error(result, "--steps -5 must be at least 1")
    assert not (tmp_path / "run").exists()


def test_extract_rejects_heldout_equal_to_data(small_data, tmp_path):
    result = run_cli(
        "extract", "--data", str(small_data[0]), "--heldout", str(small_data[0]),
        "--out", str(tmp_path / "store"), "--device", "cpu", "--no-progress",
    )
    assert result.returncode == 2
    assert "has the same content as --data" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "store" / "manifest.json").exists()
