"""End-to-end tests of `python -m distill sweep`, `eval` and `eval-gsm8k` on real stores and models."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from distill.config import DistillConfig
from distill.eval import evaluate_run, load_projector
from distill.sweep import TABLE_COLUMNS, load_grid, resolve_configs, run_sweep
from extract.errors import UserError
from tests.conftest import run_cli

CONFIG_DIR = Path(__file__).resolve().parent.parent / "distill" / "configs"
# Settings that keep each test run to a few seconds on a CPU.
QUICK = {"steps": 10, "log_every": 5, "num_workers": 0, "eval_samples": 8, "device": "cpu"}
LOSSES = ["mercator", "mercator_centred"]
# Keys of the CE, logit-KD and anti-collapse options that remedies.yaml sets before DistillConfig defines them.
PENDING_KEYS = {"ce_weight", "kd_weight", "kv_weight", "variance_floor", "projector_warmup_steps"}
LABELS = {"Excellent", "Good", "Acceptable", "Poor"}


def _write_grid(path: Path, grid: dict) -> Path:
    path.write_text(yaml.safe_dump(grid, sort_keys=False), encoding="utf-8")
    return path


def _table_rows(sweep_md: Path) -> list[dict[str, str]]:
    """Parse the Markdown table of sweep.md into one dict per run."""
    lines = [line for line in sweep_md.read_text(encoding="utf-8").splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert set(lines[1].strip("|").split("|")) == {"---"}
    return [dict(zip(header, (cell.strip() for cell in line.strip("|").split("|")), strict=True)) for line in lines[2:]]


@pytest.fixture(scope="module")
def two_run_sweep(tmp_path_factory, small_store):
    folder = tmp_path_factory.mktemp("sweep")
    grid = _write_grid(folder / "grid.yaml", {"base": dict(QUICK), "axes": {"loss": LOSSES}})
    out = folder / "out"
    result = run_cli("distill", "sweep", str(grid), "--store", str(small_store), "--out", str(out), "--no-progress")
    return grid, out, result


def test_sweep_runs_and_tabulates(two_run_sweep):
    _, out, result = two_run_sweep
    assert result.returncode == 0, result.stderr
    assert "2 ran, 0 skipped, 0 failed" in result.stdout
    rows = _table_rows(out / "sweep.md")
    assert [row["run"] for row in rows] == LOSSES
    assert list(rows[0]) == list(TABLE_COLUMNS)
    for row in rows:
        record = yaml.safe_load((out / row["run"] / "record.yaml").read_text(encoding="utf-8"))
        final = record["results"]["final"]
        assert row["status"] == "ran"
        assert row["loss"] == row["run"]
        assert row["projector"] == "elastic"
        assert float(row["held-out raw cos"]) == pytest.approx(final["raw_cos"], abs=5e-5)
        assert float(row["centred cos"]) == pytest.approx(final["centred_cos"], abs=5e-5)
        assert float(row["mean-vector baseline"]) == pytest.approx(final["baseline_cos"], abs=5e-5)
        assert float(row["shuffled raw cos"]) == pytest.approx(final["shuffled_raw_cos"], abs=5e-5)
        assert row["label"] in LABELS
        assert row["collapse"] in {"yes", "no"}
        assert float(row["train s"]) > 0
        assert record["training"]["steps"] == QUICK["steps"]
    assert (out / "sweep.png").stat().st_size > 0


def test_sweep_rerun_skips_finished(two_run_sweep, small_store):
    grid, out, _ = two_run_sweep
    records = {name: (out / name / "record.yaml").stat().st_mtime_ns for name in LOSSES}
    result = run_cli("distill", "sweep", str(grid), "--store", str(small_store), "--out", str(out), "--no-progress")
    assert result.returncode == 0, result.stderr
    assert "0 ran, 2 skipped, 0 failed" in result.stdout
    assert [row["status"] for row in _table_rows(out / "sweep.md")] == ["skipped", "skipped"]
    assert {name: (out / name / "record.yaml").stat().st_mtime_ns for name in LOSSES} == records


def test_eval_reproduces_record(two_run_sweep, small_store):
    _, out, _ = two_run_sweep
    run_dir = out / "mercator_centred"
    result = run_cli("distill", "eval", str(run_dir), "--store", str(small_store), "--no-progress")
    assert result.returncode == 0, result.stderr
    final = yaml.safe_load((run_dir / "record.yaml").read_text(encoding="utf-8"))["results"]["final"]
    report = json.loads((run_dir / "eval.json").read_text(encoding="utf-8"))
    for name in ("raw_cos", "centred_cos", "baseline_cos", "teacher_baseline_cos", "shuffled_raw_cos", "shuffled_centred_cos"):
        assert report["figures"][name] == pytest.approx(final[name], abs=1e-6), name
    assert report["tokens"] == final["tokens"]
    assert report["store"]["same_as_training"] is True
    expected_line = (
        f"held-out: raw {final['raw_cos']:.4f} centred {final['centred_cos']:.4f} baseline {final['baseline_cos']:.4f}"
    )
    assert expected_line in result.stdout


def test_eval_per_head_figures(two_run_sweep):
    _, out, _ = two_run_sweep
    report = json.loads((out / "mercator_centred" / "eval.json").read_text(encoding="utf-8"))
    assert list(report["per_head"]) == ["key_0", "key_1", "key_2", "value_0", "value_1", "value_2"]
    for heads in report["per_head"].values():
        assert len(heads) == 2  # the embedded student has 2 KV heads
        for head in heads:
            assert -1.0 <= head["raw_cos"] <= 1.0
            assert -1.0 <= head["centred_cos"] <= 1.0


def test_sweep_continues_after_failure(tmp_path, small_store):
    grid = _write_grid(
        tmp_path / "broken.yaml",
        {
            "base": dict(QUICK),
            "runs": [
                {"name": "missing-student", "overrides": {"student": str(tmp_path / "no-such-model")}},
                {"name": "missing-student-again", "overrides": {"student": str(tmp_path / "no-model-either")}},
            ],
        },
    )
    out = tmp_path / "out"
    result = run_cli("distill", "sweep", str(grid), "--store", str(small_store), "--out", str(out), "--no-progress")
    assert result.returncode == 1
    assert "0 ran, 0 skipped, 2 failed" in result.stdout
    assert [row["status"] for row in _table_rows(out / "sweep.md")] == ["failed", "failed"]
    assert "no-model-either" in (out / "sweep.md").read_text(encoding="utf-8")
    assert "Traceback" not in result.stderr


def test_sweep_rejects_unknown_key_first(tmp_path, small_store):
    grid = _write_grid(
        tmp_path / "grid.yaml",
        {"base": dict(QUICK), "runs": [{"name": "ok", "overrides": {}}, {"name": "bad", "overrides": {"no_such_key": 1}}]},
    )
    with pytest.raises(UserError, match=r"run 'bad' .*unknown config keys \['no_such_key'\]"):
        run_sweep(grid, tmp_path / "out", {"store": str(small_store)}, progress=False)
    assert not (tmp_path / "out").exists()


def test_eval_gsm8k_real_questions(two_run_sweep, real_gsm8k, tmp_path):
    _, out, _ = two_run_sweep
    predictions = tmp_path / "preds.jsonl"
    result = run_cli(
        "distill", "eval-gsm8k", "--student", str(out / "mercator"), "--data", str(real_gsm8k),
        "--limit", "4", "--max-new-tokens", "8", "--out", str(predictions), "--no-progress",
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 4
    assert [row["gold"] for row in rows] == ["18", "3", "70000", "540"]
    for row in rows:
        assert set(row) >= {"question", "gold", "output", "strict", "flexible", "strict_correct", "flexible_correct"}
        assert row["new_token_limit"] == 8
    summary = json.loads(predictions.with_name("preds.summary.json").read_text(encoding="utf-8"))
    assert summary["n"] == 4
    assert "gsm8k: n 4, strict" in result.stdout


# Grid parsing, in process.


def test_axes_names_and_order(tmp_path):
    grid = load_grid(_write_grid(tmp_path / "g.yaml", {"axes": {"projector": ["elastic", "linear"], "beta": [0.0, 0.01]}}))
    assert [run.name for run in grid.runs] == ["elastic-beta0.0", "elastic-beta0.01", "linear-beta0.0", "linear-beta0.01"]
    assert grid.runs[3].values == {"projector": "linear", "beta": 0.01}


def test_base_file_then_mapping_then_run(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 7\nbeta: 0.5\nname: ignored\n", encoding="utf-8")
    grid = load_grid(
        _write_grid(tmp_path / "g.yaml", {"base": {"config": "base.yaml", "beta": 0.25}, "runs": [{"name": "r", "overrides": {"steps": 9}}]})
    )
    [(run, config)] = resolve_configs(grid, tmp_path / "out", {"store": "S", "seed": 3, "loss": None})
    assert (config.steps, config.beta, config.seed, config.store) == (9, 0.25, 3, "S")
    assert config.name == "r"
    assert config.out == str(tmp_path / "out" / "r")


@pytest.mark.parametrize(
    ("grid", "message"),
    [
        ({"base": {"steps": 5}}, "has no runs"),
        ({"axes": {"loss": []}}, "non-empty list"),
        ({"runs": [{"name": "a"}, {"name": "a"}]}, "several runs named a"),
        ({"runs": [{"name": "../escape"}]}, "not usable as a folder name"),
        ({"runs": [{"name": "a", "override": {}}]}, "unknown keys ['override']"),
        ({"runs": [{"name": "a"}], "extra": 1}, "unknown keys ['extra']"),
    ],
)
def test_malformed_grids_rejected(tmp_path, grid, message):
    with pytest.raises(UserError, match=re.escape(message)):
        load_grid(_write_grid(tmp_path / "g.yaml", grid))


def test_option_may_not_override_axis(tmp_path):
    grid = load_grid(_write_grid(tmp_path / "g.yaml", {"axes": {"loss": LOSSES}}))
    with pytest.raises(UserError, match="--loss would override"):
        resolve_configs(grid, tmp_path / "out", {"store": "S", "loss": "mse"})


def test_ablation_grid_has_nine_runs(tmp_path):
    planned = resolve_configs(load_grid(CONFIG_DIR / "ablation.yaml"), tmp_path, {"store": "S"})
    combos = {(config.projector, config.loss, config.beta) for _, config in planned}
    assert len(planned) == 9
    assert {(p, loss, 0.0) for p in ("elastic", "linear") for loss in ("mercator", "mercator_centred", "mse")} <= combos
    assert {("elastic", "hybrid", 0.0), ("elastic", "mercator_centred", 0.01), ("elastic", "mercator_centred", 0.1)} <= combos


def test_remedies_grid_uses_known_keys():
    grid = load_grid(CONFIG_DIR / "remedies.yaml")
    known = {f.name for f in dataclasses.fields(DistillConfig)}
    assert len(grid.runs) == 9
    assert grid.varied_keys - known <= PENDING_KEYS


# Bad inputs to eval, in process.


def test_eval_rejects_unfinished_run(tmp_path):
    (tmp_path / "config.yaml").write_text("store: S\n", encoding="utf-8")
    with pytest.raises(UserError, match="not a finished distill run: missing student, projector.safetensors"):
        evaluate_run(tmp_path)


def test_projector_without_metadata_rejected(tmp_path):
    path = tmp_path / "projector.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UserError, match="has no projector config in its metadata"):
        load_projector(path, layer_map_seed=0)
