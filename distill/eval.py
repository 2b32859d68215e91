"""Evaluate a finished run: held-out KV alignment from its saved files, and GSM8K accuracy.

``evaluate_run`` rebuilds the student from ``RUN/student`` and the projector from
``RUN/projector.safetensors`` and its config metadata, then measures held-out
alignment exactly as training does at its end: the same held-out samples
(``eval_samples`` from ``RUN/config.yaml``), batch size, shuffled-pair seed and
autocast. On the store the run was trained on and on a CPU, the figures therefore
equal those in ``RUN/record.yaml`` up to its rounding to 6 decimals. It adds per-head
figures, which training does not compute.

``evaluate_gsm8k`` decodes greedily from the training prompt (``GSM8K_PROMPT``) and
scores the outputs with ``distill.gsm8k``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from tqdm.auto import tqdm

from distill.alignment import AlignmentMeter, alignment_label, collapse_warning, format_alignment, kv_layer_names
from distill.config import DistillConfig, load_config
from distill.gsm8k import Problem, read_problems, score_output, summarise
from distill.projector import KVDimensionProjector
from distill.recipe import TEACHER_KEY
from distill.stream import KVBatch, KVSampleDataset, evaluation_loader
from distill.student import load_student, student_kv
from extract.data import GSM8K_PROMPT
from extract.embedded import resolve_model_path
from extract.errors import UserError
from extract.models import kv_geometry, load_causal_lm, load_tokenizer, resolve_compute_dtype, resolve_device
from extract.store import KVStore, content_fingerprint, open_store

logger = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
RUN_FILES = ("config.yaml", "student", "projector.safetensors")
PROJECTOR_KEYS = (
    "teacher_d_model", "teacher_num_layers", "student_d_model", "student_num_layers",
    "projector_type", "mlp_ratio", "dropout", "layer_map", "per_layer",
)


# ---------------------------------------------------------------------- alignment


def load_projector(path: Path, layer_map_seed: int) -> KVDimensionProjector:
    """Rebuild the projector from its safetensors file and the config stored in the file's metadata."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        state = {name: handle.get_tensor(name) for name in handle.keys()}
    try:
        config = json.loads(metadata["config"])
        settings = {key: config[key] for key in PROJECTOR_KEYS}
    except (KeyError, json.JSONDecodeError, TypeError):
        raise UserError(
            f"{path} has no projector config in its metadata (keys {', '.join(PROJECTOR_KEYS)}); "
            "it was not written by `python -m distill`"
        ) from None
    projector = KVDimensionProjector(
        {TEACHER_KEY: {"d_model": settings["teacher_d_model"], "num_layers": settings["teacher_num_layers"]}},
        student_d_model=settings["student_d_model"],
        mlp_ratio=settings["mlp_ratio"],
        dropout=settings["dropout"],
        student_num_layers=settings["student_num_layers"],
        layer_map=settings["layer_map"],
        projector_type=settings["projector_type"],
        per_layer=settings["per_layer"],
        layer_map_seed=config.get("layer_map_seed", layer_map_seed),
    )
    try:
        projector.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UserError(f"{path} does not match its own config metadata: {str(exc).splitlines()[0]}") from None
    return projector


def kv_pair(student: Any, projector: KVDimensionProjector, batch: KVBatch, autocast: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Student and projected teacher K/V of one batch, each [batch, 2 * student_layers, tokens, width], keys first."""
    with autocast:
        student_k, student_v = student_kv(student, batch.input_ids, batch.attention_mask, batch.position_ids)
        teacher_k, teacher_v = batch.teacher_vectors()
        projected_k, projected_v = projector.project_teacher_kv(TEACHER_KEY, teacher_k, teacher_v)
    return torch.cat([student_k, student_v], dim=1).float(), torch.cat([projected_k, projected_v], dim=1).float()


@torch.no_grad()
def measure_alignment(
    student: Any,
    projector: KVDimensionProjector,
    store: KVStore,
    sample_ids: list[int],
    *,
    batch_size: int,
    seed: int,
    device: torch.device,
    progress: bool = False,
) -> dict[str, Any]:
    """Run the two passes of ``AlignmentMeter`` over ``sample_ids``, with per-head figures."""
    student.eval()
    projector.eval()
    geometry = kv_geometry(student.config)
    meter = AlignmentMeter(
        seed=seed, layer_names=kv_layer_names(geometry.num_hidden_layers), num_heads=geometry.num_key_value_heads
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    loader = evaluation_loader(KVSampleDataset(store, sample_ids), batch_size=batch_size)
    for title, add in (("means", meter.add_means), ("cosines", meter.add)):
        for batch in tqdm(loader, desc=f"held-out {title}", unit="batch", disable=not progress, leave=False):
            batch = batch.to(device)
            add(*kv_pair(student, projector, batch, autocast), batch.attention_mask)
        if add == meter.add_means:
            meter.finish_means()
    return meter.result()


def check_run_dir(run_dir: Path) -> None:
    missing = [name for name in RUN_FILES if not (run_dir / name).exists()]
    if missing:
        raise UserError(
            f"{run_dir} is not a finished distill run: missing {', '.join(missing)}; "
            "pass the --out directory of a completed `python -m distill train`"
        )


def evaluate_run(
    run_dir: Path,
    *,
    store: str | None = None,
    device: str | None = None,
    eval_samples: int | None = None,
    batch_size: int | None = None,
    out: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Measure held-out alignment of a saved run, write it to ``out`` (default ``RUN/eval.json``) and return it.

    Options left None take the run's own config. Raises ``UserError`` for a directory
    that is not a finished run, a store without held-out samples, a store or student
    whose shapes do not fit the saved projector, or non-finite figures.
    """
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    overrides = {"store": store, "device": device, "eval_samples": eval_samples, "batch_size": batch_size}
    config = load_config(run_dir / "config.yaml", overrides)
    kv_store = open_store(config.store)
    sample_ids = kv_store.sample_ids("heldout")
    if not sample_ids:
        raise UserError(f"store {config.store} has no held-out samples, so there is nothing to evaluate")
    if config.eval_samples:
        sample_ids = sample_ids[: config.eval_samples]

    torch_device = resolve_device(config.device)
    student, _, _ = load_student(str(run_dir / "student"), kv_store.manifest, torch_device)
    projector = load_projector(run_dir / "projector.safetensors", config.seed).to(torch_device)
    _check_shapes(projector, kv_store, student, config)

    result = measure_alignment(
        student, projector, kv_store, sample_ids,
        batch_size=config.batch_size, seed=config.seed, device=torch_device, progress=progress,
    )
    if not all(math.isfinite(result[name]) for name in ("raw_cos", "centred_cos", "baseline_cos")):
        raise UserError(
            f"held-out cosines of {run_dir} are not finite (raw {result['raw_cos']}, centred {result['centred_cos']}); "
            "the saved student or projector contains NaN or Inf, so retrain the run"
        )
    report = _alignment_report(run_dir, config, kv_store, result, len(sample_ids))
    _write_json_atomic(Path(out) if out is not None else run_dir / EVAL_FILE, report)
    logger.info("%s", format_alignment(result))
    for name, figures in report["per_layer"].items():
        heads = " ".join(f"{head['centred_cos']:.3f}" for head in report["per_head"][name])
        logger.info("%s: raw %.4f centred %.4f baseline %.4f; centred per head %s",
                    name, figures["raw_cos"], figures["centred_cos"], figures["baseline_cos"], heads)
    return report


def _check_shapes(projector: KVDimensionProjector, store: KVStore, student: Any, config: DistillConfig) -> None:
    layout = store.manifest.layout
    trained = (projector.teacher_widths[TEACHER_KEY], projector.teacher_depths[TEACHER_KEY])
    if trained != (layout.kv_width, len(layout.layers)):
        raise UserError(
            f"store {config.store} has teacher K/V of width {layout.kv_width} in {len(layout.layers)} layers, "
            f"but the run's projector takes width {trained[0]} in {trained[1]} layers; pass the store the run was trained on"
        )
    geometry = kv_geometry(student.config)
    if (projector.student_d_model, projector.student_num_layers) != (geometry.kv_width, geometry.num_hidden_layers):
        raise UserError(
            f"the run's student has K/V width {geometry.kv_width} in {geometry.num_hidden_layers} layers, but its "
            f"projector outputs width {projector.student_d_model} in {projector.student_num_layers} layers"
        )


def _alignment_report(
    run_dir: Path, config: DistillConfig, store: KVStore, result: dict[str, Any], samples: int
) -> dict[str, Any]:
    fingerprint = content_fingerprint(store.manifest)
    trained_on = _recorded_store_fingerprint(run_dir)
    if trained_on is not None and trained_on != fingerprint:
        logger.warning(
            "store %s differs from the store the run was trained on (content fingerprint %s, record %s), "
            "so these figures are not comparable with record.yaml", config.store, fingerprint[:19], trained_on[:19],
        )
    metrics = ("raw_cos", "centred_cos", "baseline_cos", "teacher_baseline_cos", "shuffled_raw_cos", "shuffled_centred_cos")
    names = result["layer_names"]
    return {
        "run": str(run_dir),
        "store": {
            "path": str(config.store),
            "fingerprint": fingerprint,
            "same_as_training": None if trained_on is None else trained_on == fingerprint,
        },
        "samples": samples,
        "tokens": result["tokens"],
        "figures": {name: _finite_or_none(result[name]) for name in metrics},
        "label": f"{alignment_label(result['centred_cos'])} (on held-out centred cosine)",
        "collapse_warning": collapse_warning(result["raw_cos"], result["baseline_cos"], centred_cos=result["centred_cos"]),
        "per_layer": {
            layer: {name: _finite_or_none(result["per_layer"][name][i]) for name in metrics} for i, layer in enumerate(names)
        },
        "per_head": {
            layer: [
                {name: _finite_or_none(result["per_head"][name][i][head]) for name in metrics}
                for head in range(result["num_heads"])
            ]
            for i, layer in enumerate(names)
        },
    }


def _recorded_store_fingerprint(run_dir: Path) -> str | None:
    record_path = run_dir / "record.yaml"
    if not record_path.is_file():
        return None
    record = yaml.safe_load(record_path.read_text(encoding="utf-8")) or {}
    return (record.get("store") or {}).get("fingerprint")


def _finite_or_none(value: float) -> float | None:
    """JSON has no NaN: a shuffled baseline that saw no token pairs is written as null."""
    return float(value) if math.isfinite(value) else None


def heldout_line(report: dict[str, Any]) -> str:
    """Format the held-out figures as the one-line summary that ``train`` prints."""
    figures = report["figures"]
    return (
        f"held-out: raw {figures['raw_cos']:.4f} centred {figures['centred_cos']:.4f} "
        f"baseline {figures['baseline_cos']:.4f} ({report['label']})"
    )


def _write_json_atomic(path: Path, payload: Any) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write to a temporary file beside ``path`` and rename it, so a reader never sees a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        # mkstemp creates the file private (0600), and results are meant to be shared.
        os.fchmod(handle, 0o644)
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# ---------------------------------------------------------------------- GSM8K


def resolve_student(name_or_run: str) -> str:
    """Return a model directory: ``RUN/student`` for a run directory, else the checkpoint, hub id or embedded name."""
    run_student = Path(name_or_run) / "student"
    if (run_student / "config.json").is_file():
        return str(run_student)
    return resolve_model_path(name_or_run, role="student")


@torch.no_grad()
def generate_greedy(
    model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, batch_size: int, progress: bool = False
) -> list[tuple[str, int]]:
    """Decode each prompt greedily; return (continuation, new-token limit used) per prompt, in input order.

    Prompts are batched by length with left padding, so every continuation starts at
    the same column. ``generate`` derives position ids from the attention mask, so the
    padding does not shift RoPE positions: on transformers 5.25 with the embedded
    teacher, left-padded and unpadded logits agree within 3e-7. Decoding stops at EOS
    or at ``Question:``.
    A batch whose longest prompt leaves fewer than ``max_new_tokens`` positions in the
    model's context gets the smaller limit.
    """
    context = getattr(model.config, "max_position_embeddings", None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    encoded = [tokenizer(prompt, add_special_tokens=True)["input_ids"] for prompt in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    results: list[tuple[str, int] | None] = [None] * len(prompts)
    shortened = 0
    device = next(model.parameters()).device

    for start in tqdm(range(0, len(order), batch_size), desc="generate", unit="batch", disable=not progress):
        indices = order[start : start + batch_size]
        longest = max(len(encoded[i]) for i in indices)
        limit = max_new_tokens if context is None else min(max_new_tokens, context - longest)
        if limit < 1:
            raise UserError(
                f"question row {indices[-1]} has a {longest}-token prompt, which fills the student's "
                f"{context}-position context; use a student with a longer context or drop the question"
            )
        shortened += len(indices) if limit < max_new_tokens else 0

        input_ids = torch.full((len(indices), longest), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(indices), longest), dtype=torch.long)
        for row, i in enumerate(indices):
            input_ids[row, longest - len(encoded[i]) :] = torch.tensor(encoded[i])
            attention_mask[row, longest - len(encoded[i]) :] = 1
        generated = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=limit,
            do_sample=False,
            pad_token_id=pad_id,
            stop_strings=["Question:"],
            tokenizer=tokenizer,
        )
        texts = tokenizer.batch_decode(generated[:, longest:], skip_special_tokens=True)
        for i, text in zip(indices, texts):
            results[i] = (text, limit)

    if shortened:
        logger.warning(
            "%d prompts leave fewer than %d positions in the student's %s-position context, so their outputs were cut shorter",
            shortened, max_new_tokens, context,
        )
    return [result for result in results if result is not None]


def evaluate_gsm8k(
    student: str,
    data: Path,
    *,
    out: Path,
    limit: int | None = None,
    max_new_tokens: int = 256,
    batch_size: int = 16,
    device: str = "auto",
    dtype: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Score greedy answers to GSM8K questions; write per-question JSONL to ``out`` and return the summary.

    The summary (also written to ``out`` with the suffix ``.summary.json``) has n,
    strict and flexible accuracy with 95% Wilson intervals, and the settings used.
    """
    for name, value in (("--limit", limit), ("--max-new-tokens", max_new_tokens), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UserError(f"{name} {value} must be at least 1")
    problems = read_problems(data, limit)
    model_path = resolve_student(student)
    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(model_path)
    model = load_causal_lm(model_path, dtype=resolve_compute_dtype(dtype, torch_device), device=torch_device)
    model.eval()

    prompts = [GSM8K_PROMPT.format(question=problem.question.strip()) for problem in problems]
    outputs = generate_greedy(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)
    rows = [_scored_row(problem, text, used) for problem, (text, used) in zip(problems, outputs)]
    summary = {
        **summarise(rows),
        "student": model_path,
        "data": str(data),
        "max_new_tokens": max_new_tokens,
        "device": str(torch_device),
        "predictions": str(out),
    }
    write_text_atomic(Path(out), "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
    _write_json_atomic(summary_path(Path(out)), summary)
    return summary


def _scored_row(problem: Problem, text: str, new_token_limit: int) -> dict[str, Any]:
    return {**score_output(problem, text), "new_token_limit": new_token_limit}


def summary_path(predictions: Path) -> Path:
    """``preds.jsonl`` -> ``preds.summary.json``."""
    return predictions.with_name(predictions.stem + ".summary.json")
