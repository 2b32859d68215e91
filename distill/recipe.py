"""Distillation recipe: train a student's K/V to point where the projected teacher K/V point.

One class, read top to bottom: ``setup()`` builds everything from a ``DistillConfig``,
``train()`` runs the loop, ``evaluate()`` measures held-out alignment, ``save()`` writes
the outputs. Features and the config keys that drive them:

- store streaming (``store``, ``batch_size``, ``num_workers``, ``seed``), shard
  checksums checked first (``verify_store``);
- projector (``projector``, ``mlp_ratio``, ``dropout``, ``layer_map``, ``per_layer``)
  sized from the store's manifest and the student's config;
- KV loss (``loss``, ``alpha``, ``beta``, ``epsilon``, ``kv_weight``); the default
  centres both sides per layer, because 1 - raw cosine is minimised by a nearly
  constant student;
- token losses on the student's logits: cross-entropy on answer tokens
  (``ce_weight``) and KL to the teacher's stored top-k (``kd_weight``,
  ``kd_temperature``);
- anti-collapse remedies: a variance floor on the student's K/V (``variance_floor``,
  ``variance_target``) and a projector-only warm-up (``projector_warmup_steps``);
- AdamW with a student group (``student_lr``) and a projector group
  (``projector_lr``), cosine annealing over ``steps``, ``grad_accum`` micro-batches per
  step, clipping at ``grad_clip``, bf16 autocast on CUDA;
- a guard that skips the update of a step with a NaN/Inf loss or gradient (the
  learning-rate schedule still advances) and stops after ``max_nonfinite`` in a row;
- checkpoints (``checkpoint_every``, ``keep_checkpoints``) and exact resumption
  (``resume``);
- held-out evaluation with raw cosine, centred cosine and the mean-vector baseline;
- online-teacher mode (``online_teacher``): the teacher runs on each batch instead of
  the store's K/V being read (see ``distill.online``).

Outputs in ``out``: ``student/`` (Hugging Face format), ``projector.safetensors``,
``metrics.jsonl``, ``config.yaml``, ``curves.png``, ``layers.png``, ``checkpoints/``,
``tensorboard/`` (when installed) and ``record.yaml``, written last.
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
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from distill.alignment import AlignmentMeter, kv_layer_names
from distill.checkpoint import (
    PROJECTOR_FILE,
    STUDENT_DIR,
    Checkpoint,
    latest_checkpoint,
    restore_rng,
    rng_json,
    rng_tensors,
    write_checkpoint,
    write_training_files,
)
from distill.config import DistillConfig
from distill.losses import build_loss
from distill.monitor import INITIAL_EVAL, MetricsLog
from distill.objective import DistillObjective
from distill.online import load_online_teacher
from distill.plots import save_plots
from distill.projector import KVDimensionProjector
from distill.record import build_record
from distill.stream import KVBatch, KVSampleDataset, collate_samples, evaluation_loader, training_loader
from distill.student import load_student, student_forward, student_geometry
from extract.errors import UserError, check_output_directory
from extract.models import resolve_device
from extract.store import content_fingerprint, open_store
from extract.store.verify import verify_store

logger = logging.getLogger(__name__)

TEACHER_KEY = "teacher"
# Training centred cosine that the record reports the first crossing of.
RECORD_THRESHOLD = 0.9
RECORD_FILE = "record.yaml"


class DistillRecipe:
    def __init__(self, config: DistillConfig, *, progress: bool = True) -> None:
        self.config = config
        self.progress = progress
        self.out = Path(config.out)
        self.history: list[dict[str, Any]] = []
        # Run state that a checkpoint carries over to a resumed run.
        self.start_step = 0
        self.first_step_above: int | None = None
        self.skipped_steps: list[int] = []
        self.nonfinite_in_a_row = 0
        self.seconds_before = 0.0
        self.initial: dict[str, Any] | None = None
        self.final: dict[str, Any] | None = None
        self.resumed_from: Checkpoint | None = None
        self.stopped: str | None = None
        self._rng_to_restore: tuple[dict[str, Any], dict[str, Any]] | None = None

    # ------------------------------------------------------------------ setup

    def setup(self) -> None:
        config = self.config
        checkpoint = self._check_output()
        torch.manual_seed(config.seed)
        self.device = resolve_device(config.device)

        self.store = open_store(config.store)
        if config.verify_store:
            self._verify_store()
        manifest = self.store.manifest
        self.fingerprint = content_fingerprint(manifest)
        state = checkpoint.read_state() if checkpoint else None
        if checkpoint and state:
            checkpoint.check_resumable(state, self.config, self.fingerprint)
            # record.yaml marks a finished run, so a resumed run has none until it finishes.
            (self.out / RECORD_FILE).unlink(missing_ok=True)
        self.train_ids = self.store.sample_ids("train")
        self.heldout_ids = self.store.sample_ids("heldout")
        if not self.train_ids:
            raise UserError(f"store {config.store} has no training samples")
        if not self.heldout_ids:
            logger.warning("store %s has no held-out samples, so no held-out figures will be reported", config.store)
        if config.eval_samples:
            self.heldout_ids = self.heldout_ids[: config.eval_samples]

        self.online_teacher = load_online_teacher(config.online_teacher, manifest, self.device)
        # A resumed run loads the student saved in the checkpoint, so its weights match bit for bit.
        student_source = str(checkpoint.path / STUDENT_DIR) if checkpoint else config.student
        self.student, self.tokenizer, self.student_path = load_student(student_source, manifest, self.device)
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
        self.objective = DistillObjective(config, self.loss_fn, self.student.get_output_embeddings(), self.autocast)
        if config.kd_weight > 0:
            self.objective.check_store(self._first_training_batch(), config.store)
        if checkpoint and state:
            self._restore(checkpoint, state)
        elif config.variance_floor > 0:
            first_batch = self._first_training_batch()
            self.student.eval()
            with torch.no_grad():
                student, _ = self._student_outputs(first_batch)
            self.student.train()
            self.objective.measure_variance_target(student, first_batch.attention_mask)

        # The sampler is indexed by micro-batch, so a resumed run reads exactly the
        # batches the uninterrupted run would have read from its step on.
        self.train_loader = training_loader(
            KVSampleDataset(self.store, self.train_ids, with_kv=self.online_teacher is None),
            batch_size=config.batch_size,
            steps=config.steps * config.grad_accum,
            seed=config.seed,
            num_workers=config.num_workers,
            start_step=self.start_step * config.grad_accum,
            pin_memory=self.device.type == "cuda",
        )
        self._prepare_output()
        logger.info(
            "distill: %d train / %d held-out samples; teacher %d layers x %d -> student %d layers x %d; "
            "%s projector with %d parameters; objective %s",
            len(self.train_ids), len(self.heldout_ids), len(layout.layers), layout.kv_width, self.student_layers,
            self.student_width, config.projector, self.projector.num_parameters(), self.objective.summary(),
        )

    def _check_output(self) -> Checkpoint | None:
        """Check --out before anything loads; return the checkpoint to resume from, if any."""
        check_output_directory(self.out)
        store, out = Path(self.config.store).resolve(), self.out.resolve()
        if store == out or out in store.parents or store in out.parents:
            raise UserError(f"--out {self.out} and --store {self.config.store} overlap; write the run outside the store")
        if self.config.resume:
            return latest_checkpoint(self.out)
        if self.out.is_dir() and any(self.out.iterdir()) and not self.config.overwrite:
            raise UserError(
                f"output directory {self.out} is not empty; pass --resume to continue its run, "
                "--overwrite to replace it, or choose another --out"
            )
        return None

    def _prepare_output(self) -> None:
        """Empty --out (with --overwrite) after setup has checked every input, so a bad input never deletes the previous run."""
        if not self.config.resume and self.out.exists() and any(self.out.iterdir()):
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True, exist_ok=True)

    def _verify_store(self) -> None:
        total = self.store.manifest.totals()["bytes"]
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify store", disable=not self.progress, leave=False) as bar:
            report = verify_store(self.store.path, check_values=False, progress=bar.update)
        if not report.ok:
            raise UserError(f"store {self.store.path} failed verification: {report.problems[0]}")

    @torch.no_grad()
    def _first_training_batch(self) -> KVBatch:
        """Read the first ``batch_size`` training samples in store order, without a DataLoader, so no RNG is drawn."""
        dataset = KVSampleDataset(self.store, self.train_ids[: self.config.batch_size])
        return collate_samples([dataset[i] for i in range(len(dataset))]).to(self.device)

    # ------------------------------------------------------------------ checkpoints

    def _restore(self, checkpoint: Checkpoint, state: dict[str, Any]) -> None:
        """Load the projector, optimizer, scheduler and run counters of a checkpoint (the student is already loaded)."""
        trainer_state = checkpoint.read_trainer_state()
        self.projector.load_state_dict(load_file(str(checkpoint.path / PROJECTOR_FILE), device=str(self.device)))
        self.optimizer.load_state_dict(trainer_state["optimizer"])
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        self._rng_to_restore = (trainer_state["rng"], state["rng"])
        self.start_step = state["step"]
        self.first_step_above = state["first_step_above"]
        self.skipped_steps = list(state["skipped_steps"])
        self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
        self.seconds_before = state["seconds"]
        self.initial = state["initial"]
        self.objective.ce_targets = state["ce_targets"]
        if state["variance_target"] is not None:
            self.objective.variance_target = torch.tensor(state["variance_target"], device=self.device)
        self.resumed_from = checkpoint
        logger.info("resuming at step %d of %d from %s", self.start_step, self.config.steps, checkpoint.path)

    def _save_checkpoint(self, step: int, seconds: float) -> None:
        state = {
            "step": step,
            "config": self.config.to_dict(),
            "store_fingerprint": self.fingerprint,
            "seconds": seconds,
            "first_step_above": self.first_step_above,
            "skipped_steps": self.skipped_steps,
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "initial": self.initial,
            "ce_targets": self.objective.ce_targets,
            "variance_target": None if self.objective.variance_target is None else self.objective.variance_target.tolist(),
            "rng": rng_json(),
        }
        trainer_state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(), "rng": rng_tensors()}

        def write_files(folder: Path) -> None:
            write_training_files(folder, self.student, self.tokenizer, self._projector_state(), trainer_state, state)

        write_checkpoint(self.out, step, write_files, keep=self.config.keep_checkpoints)

    # ------------------------------------------------------------------ one step

    def _student_outputs(self, batch: KVBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Student K/V [batch, 2 * student_layers, tokens, width] (keys first) and its last hidden state."""
        with self.autocast:
            student_k, student_v, hidden = student_forward(self.student, batch.input_ids, batch.attention_mask, batch.position_ids)
        return torch.cat([student_k, student_v], dim=1).float(), hidden

    def _projected_teacher(self, batch: KVBatch) -> torch.Tensor:
        """Projected teacher K/V, [batch, 2 * student_layers, tokens, width] (keys first)."""
        with self.autocast:
            teacher_k, teacher_v = self.online_teacher.vectors(batch) if self.online_teacher else batch.teacher_vectors()
            projected_k, projected_v = self.projector.project_teacher_kv(TEACHER_KEY, teacher_k, teacher_v)
        return torch.cat([projected_k, projected_v], dim=1).float()

    def _kv_pair(self, batch: KVBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Student and projected teacher K/V, each [batch, 2 * student_layers, tokens, width] (keys first)."""
        student, _ = self._student_outputs(batch)
        return student, self._projected_teacher(batch)

    def _accumulate_gradients(self, step: int, batches: Any) -> tuple[float, dict[str, float], list[int]]:
        """Run ``grad_accum`` micro-batches forward and backward; return the total loss, mean metrics and sample ids."""
        accumulation = self.config.grad_accum
        frozen = step <= self.config.projector_warmup_steps
        summed: dict[str, float] = {}
        sample_ids: list[int] = []
        for _ in range(accumulation):
            batch = next(batches).to(self.device)
            with torch.set_grad_enabled(not frozen):
                student, hidden = self._student_outputs(batch)
            with torch.set_grad_enabled(self.config.kv_weight > 0):
                teacher = self._projected_teacher(batch)
            loss, metrics = self.objective(batch, student, teacher, hidden, student_frozen=frozen)
            if loss.requires_grad:
                (loss / accumulation).backward()
            for name, value in metrics.items():
                summed[name] = summed.get(name, 0.0) + value / accumulation
            sample_ids.extend(batch.sample_ids.tolist())
        return summed["loss"], summed, sample_ids

    # ------------------------------------------------------------------ training

    def train(self) -> None:
        config = self.config
        self.log = MetricsLog(self.out, resume_step=self.start_step if self.resumed_from else None)
        self.history = self.log.history
        if self.resumed_from is None and self.heldout_ids:
            self.initial = self.evaluate()
            self.log.log_heldout(INITIAL_EVAL, self.initial, at_step=0)
        batches = iter(self.train_loader)
        if self._rng_to_restore is not None:
            # Restored after the loader's iterator exists, because creating it draws a
            # worker seed from the global RNG, which the uninterrupted run did before
            # its first step.
            restore_rng(*self._rng_to_restore)
        self.student.train()
        self.projector.train()
        self.optimizer.zero_grad(set_to_none=True)
        started = time.perf_counter()
        bar = tqdm(total=config.steps, initial=self.start_step, desc="distill", unit="step", disable=not self.progress, dynamic_ncols=True)
        with bar, logging_redirect_tqdm():
            for step in range(self.start_step + 1, config.steps + 1):
                loss, metrics, sample_ids = self._accumulate_gradients(step, batches)

                grad_norm = float(torch.nn.utils.clip_grad_norm_(
                    [p for group in self.optimizer.param_groups for p in group["params"]],
                    config.grad_clip if config.grad_clip > 0 else math.inf,
                ))
                finite = math.isfinite(loss) and math.isfinite(grad_norm)
                if finite:
                    self.optimizer.step()
                    self.nonfinite_in_a_row = 0
                    if self.first_step_above is None and metrics["centred_cos"] > RECORD_THRESHOLD:
                        self.first_step_above = step
                else:
                    self._skip_step(step, loss, grad_norm, sample_ids, started)
                self.optimizer.zero_grad(set_to_none=True)
                # A skipped step still advances the schedule, so the learning rate stays
                # a function of the step and the run ends at the planned cosine minimum.
                self.scheduler.step()

                bar.update(1)
                elapsed = self.seconds_before + time.perf_counter() - started
                if finite and (step % config.log_every == 0 or step == config.steps):
                    learning_rates = [group["lr"] for group in self.optimizer.param_groups]
                    self.log.log_step(step, config.steps, metrics, grad_norm, learning_rates, len(self.skipped_steps), elapsed)
                    bar.set_postfix_str(f"loss {metrics['loss']:.4f} centred {metrics['centred_cos']:.3f}", refresh=False)
                if step == config.steps or (config.checkpoint_every and step % config.checkpoint_every == 0):
                    self._save_checkpoint(step, elapsed)
        self.train_seconds = self.seconds_before + time.perf_counter() - started
        self.final = self.evaluate() if self.heldout_ids else None
        if self.final:
            self.log.log_heldout("held-out", self.final, at_step=config.steps)

    def _skip_step(self, step: int, loss: float, grad_norm: float, sample_ids: list[int], started: float) -> None:
        """Count a step whose loss or gradient is NaN/Inf; its update is dropped. Stop after too many in a row."""
        self.skipped_steps.append(step)
        self.nonfinite_in_a_row += 1
        logger.warning(
            "step %d: non-finite loss %s or gradient norm %s on samples %s; update skipped (%d in a row, %d in total)",
            step, loss, grad_norm, sample_ids, self.nonfinite_in_a_row, len(self.skipped_steps),
        )
        self.log.write({
            "step": step, "event": "nonfinite_skipped", "loss": str(loss), "grad_norm": str(grad_norm),
            "sample_ids": sample_ids, "in_a_row": self.nonfinite_in_a_row,
        })
        if self.nonfinite_in_a_row < self.config.max_nonfinite:
            return
        self.stopped = (
            f"training stopped at step {step}: {self.nonfinite_in_a_row} optimizer steps in a row had a non-finite "
            f"loss or gradient (--max-nonfinite {self.config.max_nonfinite}), last on samples {sample_ids}; "
            f"lower --student-lr/--projector-lr, or check the store with `python -m extract verify {self.config.store}`"
        )
        self.train_seconds = self.seconds_before + time.perf_counter() - started
        self._write_record()
        self.log.close()
        raise UserError(self.stopped)

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
        save_file(self._projector_state(), str(self.out / "projector.safetensors"), metadata={"config": json.dumps(self._projector_config())})
        with open(self.out / "config.yaml", "w", encoding="utf-8") as handle:
            yaml.safe_dump(self.config.to_dict(), handle, sort_keys=False)
        save_plots(self.out, self.history, self.final)
        record = self._write_record()
        self.log.close()
        return record

    def _write_record(self) -> dict[str, Any]:
        record = build_record(self)
        with open(self.out / RECORD_FILE, "w", encoding="utf-8") as handle:
            yaml.safe_dump(record, handle, sort_keys=False)
        return record

    def _projector_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().contiguous().cpu() for k, v in self.projector.state_dict().items()}

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
