"""The training objective on one micro-batch: the KV loss, token losses and anti-collapse remedies.

``total = kv_weight * KV loss + ce_weight * answer cross-entropy + kd_weight * top-k KL
+ variance_floor * variance penalty``. Every active term is measured and logged; a term
joins the gradient only when its weight is above 0. With ``kv_weight = 0`` (the control
run) the KV loss is still measured, without gradient, so training alignment stays
visible.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from distill.config import DistillConfig
from distill.lm_losses import answer_cross_entropy, next_token_ids, next_token_mask, topk_kl_divergence
from distill.losses import layer_std, variance_floor_penalty
from distill.stream import KVBatch
from extract.errors import UserError

logger = logging.getLogger(__name__)

CE_ON_ANSWERS = "answer tokens"
CE_ON_ALL_TOKENS = "all real tokens (the store has no answer mask)"


class DistillObjective:
    """Weighted sum of the loss terms a config enables.

    ``kv_loss`` is one of the KV losses of ``distill.losses``. ``output_embeddings``
    is the student's LM head, applied only at the positions a token loss reads.
    ``variance_target`` (per layer) is set by ``measure_variance_target`` before
    training, or restored from a checkpoint. ``ce_targets`` records which tokens the
    cross-entropy was computed on, once a batch has shown it.
    """

    def __init__(self, config: DistillConfig, kv_loss: nn.Module, output_embeddings: nn.Module, autocast: Any) -> None:
        self.config = config
        self.kv_loss = kv_loss
        self.output_embeddings = output_embeddings
        self.autocast = autocast
        self.variance_target: Tensor | None = None
        self.ce_targets: str | None = None

    def summary(self) -> str:
        """Describe the objective that runs, for the log and the record."""
        config = self.config
        parts = [f"{config.kv_weight:g} x {config.loss}" + ("" if config.kv_weight else " (metrics only)")]
        if config.ce_weight:
            parts.append(f"{config.ce_weight:g} x answer-token cross-entropy")
        if config.kd_weight:
            parts.append(f"{config.kd_weight:g} x top-k KL (temperature {config.kd_temperature:g})")
        if config.variance_floor:
            parts.append(f"{config.variance_floor:g} x variance floor ({config.variance_target:g} x initial std)")
        summary = " + ".join(parts)
        if config.projector_warmup_steps:
            summary += f"; projector only for the first {config.projector_warmup_steps} steps"
        return summary

    def check_store(self, probe: KVBatch, store: str) -> None:
        """Reject a KD run on a store without the teacher's top-k log-probabilities, given one of its batches."""
        if getattr(probe, "topk_ids", None) is None or getattr(probe, "topk_logprobs", None) is None:
            raise UserError(
                f"--kd-weight {self.config.kd_weight} needs the teacher's top-k log-probabilities, but store "
                f"{store} has none; re-extract with --topk-logprobs K or set --kd-weight 0"
            )

    def measure_variance_target(self, student: Tensor, mask: Tensor) -> None:
        """Set the variance floor's per-layer target from the untrained student's K/V on one batch."""
        self.variance_target = self.config.variance_target * layer_std(student.detach(), mask)
        logger.info(
            "variance floor: per-layer std target %.4g to %.4g (%.2f x the student's std before training)",
            float(self.variance_target.min()), float(self.variance_target.max()), self.config.variance_target,
        )

    def __call__(
        self, batch: KVBatch, student: Tensor, teacher: Tensor, hidden: Tensor, *, student_frozen: bool
    ) -> tuple[Tensor, dict[str, float]]:
        """Return the weighted total loss and the metrics of one micro-batch.

        ``student`` and ``teacher`` are the stacked K/V, ``hidden`` the student's last
        hidden state. While ``student_frozen`` (projector warm-up), the student-side
        terms run without autograd, so only the projector learns.
        """
        config = self.config
        mask = batch.attention_mask
        with torch.set_grad_enabled(config.kv_weight > 0):
            kv_loss, kv_metrics = self.kv_loss(student, teacher, mask)
        metrics = {"kv_loss": kv_metrics.pop("loss"), **kv_metrics}
        terms = [config.kv_weight * kv_loss] if config.kv_weight > 0 else []

        with torch.set_grad_enabled(not student_frozen):
            if self.variance_target is not None:
                penalty, std = variance_floor_penalty(student, self.variance_target, mask)
                metrics["variance_penalty"] = float(penalty.detach())
                terms.append(config.variance_floor * penalty)
            else:
                std = layer_std(student.detach(), mask)
            metrics["student_std"] = float(std.mean())
            for name, (weight, value) in self._token_losses(batch, hidden).items():
                metrics[name] = float(value.detach())
                terms.append(weight * value)

        total = torch.stack([term.float() for term in terms]).sum()
        metrics["loss"] = float(total.detach())
        return total, metrics

    def _token_losses(self, batch: KVBatch, hidden: Tensor) -> dict[str, tuple[float, Tensor]]:
        """Cross-entropy and top-k KL terms that have a weight, as name -> (weight, loss)."""
        config = self.config
        if config.ce_weight == 0 and config.kd_weight == 0:
            return {}
        answer_mask = getattr(batch, "answer_mask", None)
        if self.ce_targets is None:
            self.ce_targets = CE_ON_ANSWERS if answer_mask is not None else CE_ON_ALL_TOKENS
        ce_positions = next_token_mask(batch.attention_mask, answer_mask)
        # Logits only where a loss reads them: every real token for KD, answer positions for CE.
        positions = batch.attention_mask if config.kd_weight > 0 else ce_positions
        with self.autocast:
            logits = self.output_embeddings(hidden[positions])
        terms = {}
        if config.ce_weight > 0:
            targets = next_token_ids(batch.input_ids)[ce_positions]
            terms["ce_loss"] = (config.ce_weight, answer_cross_entropy(logits[ce_positions[positions]], targets))
        if config.kd_weight > 0:
            kd = topk_kl_divergence(logits, batch.topk_ids[positions], batch.topk_logprobs[positions], config.kd_temperature)
            terms["kd_loss"] = (config.kd_weight, kd)
        return terms
