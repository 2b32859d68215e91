"""Distillation recipe: train a student's K/V to point where the projected teacher K/V point.

One class, read top to bottom: ``setup()`` builds everything from a ``DistillConfig``,
``train()`` runs the loop, ``evaluate()`` measures held-out alignment, ``save()`` writes
the outputs. Features and the config keys that drive them:

- store streaming (``store``, ``batch_size``, ``num_workers``, ``seed``), shard
  checksums checked first (``verify_store``);
- projector (``projector``, ``mlp_ratio``, ``dropout``, ``layer_map``, ``per_layer``)
  sized from the store's manifest and the student's config;
- loss (``loss``, ``alpha``, ``beta``, ``epsilon``); the default centres both sides per
  layer, because 1 - raw cosine is minimised by a nearly constant student;
- AdamW with a student group (``student_lr``) and a projector group
  (``projector_lr``), cosine annealing over ``steps``, clipping at ``grad_clip``;
- held-out evaluation with raw cosine, centred cosine and the mean-vector baseline;
- online-teacher mode (``online_teacher``): the teacher runs on each batch instead of
  the store's K/V being read (see ``distill.online``).

Outputs in ``out``: ``student/`` (Hugging Face format), ``projector.safetensors``,
``metrics.jsonl``, ``record.yaml`` and ``config.yaml``.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import save_file
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from distill.alignment import AlignmentMeter, alignment_label, collapse_warning, kv_layer_names
from distill.config import DistillConfig
from distill.losses import build_loss
from distill.online import load_online_teacher
from distill.projector import KVDimensionProjector
from distill.record import build_record
from distill.stream import KVBatch, KVSampleDataset, evaluation_loader, training_loader
from distill.student import load_student, student_geometry, student_kv
from extract.errors import UserError
from extract.models import resolve_device
from extract.store import open_store
from extract.store.verify import verify_store

logger = logging.getLogger(__name__)

TEACHER_KEY = "teacher"
# Training centred cosine that the record reports the first crossing of.
RECORD_THRESHOLD = 0.9


class DistillRecipe:
    def __init__(self, config: DistillConfig, *, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.out = Path(config.out)
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        config = self.config
        self._prepare_output()
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)

        self.store = open_store(config.store)
        if config.verify_store:
            self._verify_store()
        manifest = self.store.manifest
        self.train_ids = self.store.sample_ids("train")
        self.heldout_ids = self.store.sample_ids("heldout")
        if not self.train_ids:
            raise UserError(f"store {config.store} has no training samples")
        if not self.heldout_ids:
            logger.warning("store %s has no held-out samples, so no held-out figures will be reported", config.store)
        if config.eval_samples:
            self.heldout_ids = self.heldout_ids[: config.eval_samples]

        self.online_teacher = load_online_teacher(config.online_teacher, manifest, self.device)
        self.student, self.tokenizer, self.student_path = load_student(config.student, manifest, self.device)
        self.student_layers, self.student_width = student_geometry(self.student)
        layout = manifest.layout
        self.projector = KVDimensionProjector(
            {TEACHER_KEY: {"d_model": layout.kv_width, "num_layers": len(layout.layers)}},
            student_d_model=self.student_width,
            mlp_ratio=config.mlp_ratio,
            dropout=config.dropout,
            student_num_layers=self.student_layers,
            layer_map=config.layer_map,
            projector_type=config.projector,
            per_layer=config.per_layer,
            layer_map_seed=config.seed,
        ).to(self.device)
        self.loss_fn = build_loss(config.loss, alpha=config.alpha, beta=config.beta, epsilon=config.epsilon)

        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.student.parameters(), "lr": config.student_lr, "name": "student"},
                {"params": self.projector.parameters(), "lr": config.projector_lr, "name": "projector"},
            ],
            weight_decay=config.weight_decay,
        )
        # Cosine annealing to zero over the run: late-training oscillation comes from a
        # learning rate that stays high after alignment has formed.
        self.scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, T_max=config.steps)
        self.autocast = torch.autocast("cuda", dtype=torch.bfloat16) if self.device.type == "cuda" else torch.autocast("cpu", enabled=False)

        pin = self.device.type == "cuda"
        self.train_loader = training_loader(
            KVSampleDataset(self.store, self.train_ids, with_kv=self.online_teacher is None),
            batch_size=config.batch_size,
            steps=config.steps,
            seed=config.seed,
            num_workers=config.num_workers,
            pin_memory=pin,
        )
        logger.info(
            "distill: %d train / %d held-out samples; teacher %d layers x %d -> student %d layers x %d; "
            "%s projector with %d parameters; loss %s",
            len(self.train_ids), len(self.heldout_ids), len(layout.layers), layout.kv_width, self.student_layers,
            self.student_width, config.projector, self.projector.num_parameters(), config.loss,
        )

    def _prepare_output(self) -> None:
        if self.out.exists() and any(self.out.iterdir()):
            if not self.config.overwrite:
                raise UserError(f"output directory {self.out} is not empty; pass --overwrite or choose another --out")
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def _verify_store(self) -> None:
        total = self.store.manifest.totals()["bytes"]
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify store", disable=not self.progress, leave=False) as bar:
            report = verify_store(self.store.path, check_values=False, progress=bar.update)
        if not report.ok:
            raise UserError(f"store {self.store.path} failed verification: {report.problems[0]}")

    # ------------------------------------------------------------------ one step

    def _kv_pair(self, batch: KVBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and projected teacher K/V, each [batch, 2 * student_layers, tokens, width] (keys first)."""
        with self.autocast:
            student_k, student_v = student_kv(self.student, batch.input_ids, batch.attention_mask, batch.position_ids)
            teacher_k, teacher_v = self.online_teacher.vectors(batch) if self.online_teacher else batch.teacher_vectors()
            projected_k, projected_v = self.projector.project_teacher_kv(TEACHER_KEY, teacher_k, teacher_v)
        student = torch.cat([student_k, student_v], dim=1).float()
        teacher = torch.cat([projected_k, projected_v], dim=1).float()
        return student, teacher

    # ------------------------------------------------------------------ training

    def train(self) -> None:
        config = self.config
        self.metrics_file = open(self.out / "metrics.jsonl", "w", encoding="utf-8")
        self.initial = self.evaluate() if self.heldout_ids else None
        if self.initial:
            self._log_heldout("initial held-out", self.initial)
        self.first_step_above = None
        self.student.train()
        self.projector.train()
        started = time.perf_counter()
        bar = tqdm(total=config.steps, desc="distill", unit="step", disable=not self.progress, dynamic_ncols=True)
        with logging_redirect_tqdm():
            for step, batch in enumerate(self.train_loader, start=1):
                batch = batch.to(self.device)

                student, teacher = self._kv_pair(batch)
                loss, metrics = self.loss_fn(student, teacher, batch.attention_mask)

                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    [p for group in self.optimizer.param_groups for p in group["params"]],
                    config.grad_clip if config.grad_clip > 0 else math.inf,
                )
                if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
                    raise UserError(
                        f"non-finite loss or gradient at step {step} (samples {batch.sample_ids.tolist()}); "
                        "lower the learning rates or check the store with `python -m extract verify`"
                    )
                self.optimizer.step()
                self.scheduler.step()

                if self.first_step_above is None and metrics["centred_cos"] > RECORD_THRESHOLD:
                    self.first_step_above = step
                bar.update(1)
                if step % config.log_every == 0 or step == config.steps:
                    self._log_step(step, metrics, float(grad_norm), time.perf_counter() - started)
                    bar.set_postfix_str(f"loss {metrics['loss']:.4f} centred {metrics['centred_cos']:.3f}", refresh=False)
        bar.close()
        self.train_seconds = time.perf_counter() - started
        self.final = self.evaluate() if self.heldout_ids else None
        if self.final:
            self._log_heldout("held-out", self.final)

    def _log_step(self, step: int, metrics: dict[str, float], grad_norm: float, elapsed: float) -> None:
        student_lr, projector_lr = (group["lr"] for group in self.optimizer.param_groups)
        label = alignment_label(metrics["centred_cos"]) if math.isfinite(metrics["centred_cos"]) else "non-finite"
        entry = {
            "step": step,
            **{k: round(v, 6) for k, v in metrics.items()},
            "grad_norm": round(grad_norm, 6),
            "student_lr": student_lr,
            "projector_lr": projector_lr,
            "label": label,
            "seconds": round(elapsed, 3),
        }
        self.history.append(entry)
        self.metrics_file.write(json.dumps(entry) + "\n")
        self.metrics_file.flush()
        logger.info(
            "step %d/%d loss %.4f raw cos %.4f centred cos %.4f mag_ratio %.3f lr %.2e/%.2e %s (centred)",
            step, self.config.steps, metrics["loss"], metrics["cos_sim"], metrics["centred_cos"],
            metrics["mag_ratio"], student_lr, projector_lr, label,
        )

    def _log_heldout(self, title: str, result: dict[str, Any]) -> None:
        logger.info(
            "%s: raw %.4f centred %.4f baseline %.4f (label %s on centred cosine; %d tokens)",
            title, result["raw_cos"], result["centred_cos"], result["baseline_cos"],
            alignment_label(result["centred_cos"]), result["tokens"],
        )
        warning = collapse_warning(result["raw_cos"], result["baseline_cos"])
        if warning:
            logger.warning("warning: %s", warning)
        self.metrics_file.write(json.dumps({"eval": title, **{k: v for k, v in result.items() if k != "per_layer"}}) + "\n")
        self.metrics_file.flush()

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, Any]:
        """Measure held-out alignment in two passes (per-layer means, then cosines), in eval mode."""
        was_training = self.student.training
        self.student.eval()
        self.projector.eval()
        meter = AlignmentMeter(seed=self.config.seed, layer_names=kv_layer_names(self.student_layers))
        loader = evaluation_loader(
            KVSampleDataset(self.store, self.heldout_ids, with_kv=self.online_teacher is None), batch_size=self.config.batch_size
        )
        for add in (meter.add_means, meter.add):
            for batch in loader:
                batch = batch.to(self.device)
                student, teacher = self._kv_pair(batch)
                add(student, teacher, batch.attention_mask)
            if add == meter.add_means:
                meter.finish_means()
        if was_training:
            self.student.train()
            self.projector.train()
        return meter.result()

    # ------------------------------------------------------------------ outputs

    def save(self) -> dict[str, Any]:
        student_dir = self.out / "student"
        self.student.save_pretrained(student_dir)
        self.tokenizer.save_pretrained(student_dir)
        state = {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()}
        save_file(state, str(self.out / "projector.safetensors"), metadata={"config": json.dumps(self._projector_config())})
        with open(self.out / "config.yaml", "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.config.to_dict(), handle, sort_keys=False)
        record = build_record(self)
        with open(self.out / "record.yaml", "w", encoding="utf-8") as handle:
            yaml.safe_dump(record, handle, sort_keys=False)
        self.metrics_file.close()
        return record

    def _projector_config(self) -> dict[str, Any]:
        layout = self.store.manifest.layout
        return {
            "teacher_d_model": layout.kv_width,
            "teacher_num_layers": len(layout.layers),
            "student_d_model": self.student_width,
            "student_num_layers": self.student_layers,
            "projector_type": self.config.projector,
            "mlp_ratio": self.config.mlp_ratio,
            "dropout": self.config.dropout,
            "layer_map": self.config.layer_map,
            "per_layer": self.config.per_layer,
        }
