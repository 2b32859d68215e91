"""The experiment record: one YAML file per run, every value measured or read from the run."""

from __future__ import annotations

import datetime as _dt
from typing import TYPE_CHECKING, Any

from distill.alignment import alignment_label, collapse_warning
from extract.store import content_fingerprint

if TYPE_CHECKING:
    from distill.recipe import DistillRecipe

TARGET_CENTRED_COS = 0.95


def _figures(result: dict[str, Any] | None) -> dict[str, float] | None:
    if result is None:
        return None
    names = ("raw_cos", "centred_cos", "baseline_cos", "teacher_baseline_cos", "shuffled_raw_cos", "shuffled_centred_cos")
    figures = {name: round(float(result[name]), 6) for name in names if name in result}
    figures["tokens"] = int(result["tokens"])
    return figures


def _objective(recipe: "DistillRecipe") -> dict[str, Any]:
    """Describe the loss terms and remedies that ran, with their weights, and the measured variance and CE targets."""
    config = recipe.config

    remedies = []
    if config.loss == "mercator_centred":
        remedies.append("centred cosine")
    if config.variance_floor > 0:
        remedies.append("variance floor")
    if config.projector_warmup_steps > 0:
        remedies.append("projector warm-up")
    if config.layer_map == "random":
        remedies.append("random layer map (control)")

    objective: dict[str, Any] = {
        "summary": recipe.objective.summary(),
        "kv_loss": config.loss,
        "kv_weight": config.kv_weight,
        "ce_weight": config.ce_weight,
        "kd_weight": config.kd_weight,
        "remedies": remedies,
    }

    if config.ce_weight > 0:
        objective["ce_targets"] = recipe.objective.ce_targets
    if config.kd_weight > 0:
        objective["kd_temperature"] = config.kd_temperature
    if config.variance_floor > 0:
        objective["variance_floor"] = config.variance_floor
        objective["variance_target_fraction"] = config.variance_target
        if recipe.objective.variance_target is not None:
            objective["variance_target_std"] = [round(float(v), 6) for v in recipe.objective.variance_target.cpu()]
    if config.projector_warmup_steps > 0:
        objective["projector_warmup_steps"] = config.projector_warmup_steps
    return objective


def build_record(recipe: "DistillRecipe") -> dict[str, Any]:
    config = recipe.config
    manifest = recipe.store.manifest
    initial, final = _figures(recipe.initial), _figures(recipe.final)
    notes = []
    results: dict[str, Any] = {"initial": initial, "final": final}
    if initial and final:
        results["improvement"] = {
            "centred_cos": round(final["centred_cos"] - initial["centred_cos"], 6),
            "raw_cos": round(final["raw_cos"] - initial["raw_cos"], 6),
        }
    if final:
        results["label"] = f"{alignment_label(final['centred_cos'])} (on held-out centred cosine)"
        results["target_reached"] = bool(final["centred_cos"] > TARGET_CENTRED_COS)
        warning = collapse_warning(final["raw_cos"], final["baseline_cos"], centred_cos=final["centred_cos"])
        if warning:
            notes.append(warning)
        if recipe.final and "per_layer" in recipe.final:
            per_layer = recipe.final["per_layer"]
            results["per_layer"] = {
                name: {metric: round(per_layer[metric][i], 6) for metric in ("raw_cos", "centred_cos", "baseline_cos")}
                for i, name in enumerate(recipe.final["layer_names"])
            }
    elif recipe.stopped:
        notes.append("the run stopped before the final held-out evaluation")
    else:
        notes.append("the store has no held-out samples, so no held-out figures were measured")
    results["first_step_train_centred_cos_above_0_9"] = recipe.first_step_above
    results["skipped_steps"] = {"count": len(recipe.skipped_steps), "steps": list(recipe.skipped_steps)}
    if recipe.skipped_steps:
        notes.append(
            f"skipped {len(recipe.skipped_steps)} of {config.steps} steps because their loss or gradient was NaN/Inf"
        )
    results["status"] = "stopped" if recipe.stopped else "completed"
    if recipe.stopped:
        results["stop_reason"] = recipe.stopped
    last = recipe.history[-1] if recipe.history else {}
    results["last_logged_step"] = {k: last[k] for k in ("step", "loss", "cos_sim", "centred_cos", "mag_ratio") if k in last}
    if last and not 0.5 <= last.get("mag_ratio", 1.0) <= 2.0:
        notes.append(f"training magnitude ratio {last['mag_ratio']:.3f} is outside 0.5-2.0")

    return {
        "experiment": {
            "name": config.name,
            "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            "output": str(recipe.out),
        },
        "store": {"path": str(recipe.store.path), "fingerprint": content_fingerprint(manifest)},
        "teacher": {
            "name": manifest.teacher.get("name_or_path"),
            "kv_width": manifest.layout.kv_width,
            "layers": len(manifest.layout.layers),
            "captured_layers": list(manifest.layout.layers),
            "key_position": manifest.layout.key_position,
        },
        "student": {"name": config.student, "kv_width": recipe.student_width, "layers": recipe.student_layers},
        "projector": {
            "type": config.projector,
            "mlp_ratio": config.mlp_ratio,
            "dropout": config.dropout,
            "layer_map": config.layer_map,
            "per_layer": config.per_layer,
            "parameters": recipe.projector.num_parameters(),
        },
        "loss": {"type": config.loss, "alpha": config.alpha, "beta": config.beta},
        "objective": _objective(recipe),
        "training": {
            "student_lr": config.student_lr,
            "projector_lr": config.projector_lr,
            "batch_size": config.batch_size,
            "grad_accum": config.grad_accum,
            "steps": config.steps,
            "seed": config.seed,
            "seconds": round(recipe.train_seconds, 2),
            "device": str(recipe.device),
            "resumed_from": None if recipe.resumed_from is None else str(recipe.resumed_from.path),
        },
        "results": results,
        "notes": notes,
    }

