"""Held-out alignment metrics for student and projected-teacher K/V, with baselines.

Raw cosine between K/V vectors can be high for trivial reasons: shared biases, large
fixed channels, or a student whose K/V barely change from token to token. The metrics
here separate real alignment from those effects. All of them are means over the real
tokens of the evaluated set, per layer, and then over layers:

- raw cosine: cos(s, t).
- centred cosine: cos(s - mean(s), t - mean(t)), with each side's per-layer mean over
  all evaluated real tokens (the whole set, not one batch). The alignment labels are
  meant for this value.
- mean-vector baseline: cos(s, mean(s)), the student against its own per-layer mean.
  It is what a constant predictor scores, and a value near 1 means the student's K/V
  are nearly constant.
- teacher mean-vector baseline: cos(t, mean(t)), the same for the projected teacher.
- shuffled pairs: raw and centred cosine of each student vector against the teacher
  vector of another token (see ``AlignmentMeter.add``), the score of no alignment.

Inputs follow the loss's conventions: ``[batch, layers, tokens, dim]`` (or
``[tokens, dim]``, ``[dim]``) with a ``[batch, tokens]`` bool mask. The trainer stacks
K then V on the layer axis, and ``kv_layer_names`` names those rows.

Given the number of KV heads, the meter also reports every metric per head: the
layer's vector is split into ``num_heads`` equal slices of ``head_dim`` channels, in
the order the model concatenates its heads, and each slice is scored on its own. The
loss compares whole rows, so per-head figures are a diagnostic, for example of a
single collapsed head that the layer mean hides.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from distill.losses import as_kv_batch, cosine

logger = logging.getLogger(__name__)

METRIC_NAMES: tuple[str, ...] = (
    "raw_cos",
    "centred_cos",
    "baseline_cos",
    "teacher_baseline_cos",
    "shuffled_raw_cos",
    "shuffled_centred_cos",
)

_LABELS: tuple[tuple[float, str], ...] = ((0.95, "Excellent"), (0.80, "Good"), (0.50, "Acceptable"))


def kv_layer_names(num_student_layers: int) -> list[str]:
    """Name the rows of a K-then-V stacked layer axis: ``key_0 .. key_{L-1}, value_0 ..``."""
    return [f"key_{i}" for i in range(num_student_layers)] + [f"value_{i}" for i in range(num_student_layers)]


def _real_vectors(student: Tensor, teacher: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Return the real-token vectors of both sides as ``[layers, real_tokens, dim]``."""
    batch = as_kv_batch(student, teacher, mask)
    keep = batch.valid.reshape(-1)  # [batch * tokens], batch-major like the reshape below
    layers, dim = batch.num_layers, batch.student.shape[-1]
    s = batch.student.transpose(0, 1).reshape(layers, -1, dim)[:, keep]
    t = batch.teacher.transpose(0, 1).reshape(layers, -1, dim)[:, keep]
    return s, t


class AlignmentMeter:
    """Two-pass streaming accumulator of the alignment metrics.

    Pass 1 feeds every evaluation batch to ``add_means`` and then calls
    ``finish_means``. Pass 2 feeds the same batches, in any order, to ``add``, and
    ``result`` returns the metrics. Memory holds only per-layer sums in float64, so the
    evaluated set can be of any size. ``result`` raises if the two passes saw different
    numbers of tokens.

    ``seed`` fixes the shuffled pairing. ``layer_names``, if given, must have one name
    per row of the layer axis and is returned with the per-layer results.
    ``num_heads``, if given, must divide the vector width and adds per-head results.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        epsilon: float = 1e-8,
        layer_names: Sequence[str] | None = None,
        num_heads: int | None = None,
    ) -> None:
        if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
            raise ValueError(f"num_heads must be a positive integer or None, got {num_heads!r}")
        self.epsilon = epsilon
        self.layer_names = list(layer_names) if layer_names is not None else None
        self.num_heads = num_heads
        self._generator = torch.Generator().manual_seed(seed)
        self._student_sum: Tensor | None = None
        self._teacher_sum: Tensor | None = None
        self._mean_tokens = 0
        self._student_mean: Tensor | None = None
        self._teacher_mean: Tensor | None = None
        self._sums: dict[str, Tensor] = {}
        self._head_sums: dict[str, Tensor] = {}
        self._tokens = 0
        self._shuffled_tokens = 0

    def _check_layout(self, s: Tensor, reference: Tensor | None) -> None:
        layers, _, dim = s.shape
        if self.layer_names is not None and len(self.layer_names) != layers:
            raise ValueError(f"{len(self.layer_names)} layer_names given but the input has {layers} layers")
        if self.num_heads is not None and dim % self.num_heads:
            raise ValueError(f"vector width {dim} is not divisible by num_heads {self.num_heads}")
        if reference is not None and tuple(reference.shape) != (layers, dim):
            raise ValueError(
                f"input has {layers} layers of width {dim}, but earlier batches had "
                f"{reference.shape[0]} layers of width {reference.shape[1]}"
            )

    def add_means(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate one batch into the per-layer means (pass 1)."""
        if self._student_mean is not None:
            raise RuntimeError("finish_means() was already called, so pass 1 is closed. Feed batches to add()")
        s, t = _real_vectors(student, teacher, mask)
        self._check_layout(s, self._student_sum)
        s_sum = s.sum(dim=1, dtype=torch.float64)
        t_sum = t.sum(dim=1, dtype=torch.float64)
        if self._student_sum is None or self._teacher_sum is None:
            self._student_sum, self._teacher_sum = s_sum, t_sum
        else:
            self._student_sum += s_sum
            self._teacher_sum += t_sum
        self._mean_tokens += s.shape[1]

    def finish_means(self) -> None:
        """Close pass 1 and fix the per-layer means used by ``add``."""
        if self._student_sum is None or self._teacher_sum is None or self._mean_tokens == 0:
            raise RuntimeError("no tokens were passed to add_means(), so the evaluation set is empty")
        if self._student_mean is not None:
            raise RuntimeError("finish_means() was already called")
        self._student_mean = self._student_sum / self._mean_tokens
        self._teacher_mean = self._teacher_sum / self._mean_tokens

    def _accumulate(self, name: str, a: Tensor, b: Tensor) -> None:
        """Add the token sums of cos(a, b), ``[layers, tokens, dim]`` inputs, per layer and per head."""
        for sums, per_token_cos in self._cosines(a, b):
            total = per_token_cos.sum(dim=1, dtype=torch.float64)
            sums[name] = sums[name] + total if name in sums else total

    def _cosines(self, a: Tensor, b: Tensor) -> list[tuple[dict[str, Tensor], Tensor]]:
        pairs = [(self._sums, cosine(a, b, self.epsilon))]
        if self.num_heads is not None:
            # [layers, tokens, dim] -> [layers, tokens, heads, head_dim]; cosine gives [layers, tokens, heads].
            head_shape = (self.num_heads, a.shape[-1] // self.num_heads)
            pairs.append((self._head_sums, cosine(a.unflatten(-1, head_shape), b.unflatten(-1, head_shape), self.epsilon)))
        return pairs

    def add(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> None:
        """Accumulate the cosine sums of one batch (pass 2).

        Shuffled pairs stay inside the batch because the stream cannot reach other
        batches. The batch's real tokens are put in a random cyclic order, and each
        student vector is compared with the teacher vector of the next token in that
        cycle, in every layer. No token is paired with itself. A batch with a single
        real token adds nothing to the shuffled sums.
        """
        if self._student_mean is None or self._teacher_mean is None:
            raise RuntimeError("call finish_means() after pass 1 before add()")
        s, t = _real_vectors(student, teacher, mask)
        self._check_layout(s, self._student_mean)

        s_mean = self._student_mean.to(s.dtype)[:, None, :]
        t_mean = self._teacher_mean.to(t.dtype)[:, None, :]
        s_centred = s - s_mean
        t_centred = t - t_mean

        self._accumulate("raw_cos", s, t)
        self._accumulate("centred_cos", s_centred, t_centred)
        self._accumulate("baseline_cos", s, s_mean.expand_as(s))
        self._accumulate("teacher_baseline_cos", t, t_mean.expand_as(t))
        self._tokens += s.shape[1]

        count = s.shape[1]
        if count < 2:
            return
        order = torch.randperm(count, generator=self._generator)
        partner = torch.empty_like(order)
        partner[order] = torch.roll(order, -1)
        partner = partner.to(s.device)
        self._accumulate("shuffled_raw_cos", s, t[:, partner])
        self._accumulate("shuffled_centred_cos", s_centred, t_centred[:, partner])
        self._shuffled_tokens += count

    def result(self) -> dict[str, Any]:
        """Return the metrics over the evaluated set.

        Keys: each name in ``METRIC_NAMES`` (mean over layers, a float), ``tokens``
        (real tokens, not multiplied by layers), ``shuffled_tokens``, ``layer_names``,
        and ``per_layer``, a dict from each metric name to a list with one float per
        layer. With ``num_heads`` set, also ``num_heads`` and ``per_head``, a dict from
        each metric name to one list per layer with one float per head. The shuffled
        metrics are NaN when no batch had two real tokens.

        Raises:
            RuntimeError: before ``add`` has seen any token.
            ValueError: when pass 2 saw a different number of tokens than pass 1.
        """
        if self._tokens == 0:
            raise RuntimeError("no tokens were passed to add(). Run pass 2 before result()")
        if self._tokens != self._mean_tokens:
            raise ValueError(
                f"pass 1 saw {self._mean_tokens} real tokens but pass 2 saw {self._tokens}. "
                "Feed the same evaluation batches to add_means() and add()"
            )
        if self._shuffled_tokens == 0:
            logger.warning("no batch had two real tokens, so the shuffled-pairs baseline is NaN")
        num_layers = self._sums["raw_cos"].shape[0]
        per_layer = {name: self._means(self._sums, name, (num_layers,)).tolist() for name in METRIC_NAMES}
        overall = {name: float(torch.tensor(values, dtype=torch.float64).mean()) for name, values in per_layer.items()}

        names = self.layer_names or [f"layer_{i}" for i in range(num_layers)]
        result: dict[str, Any] = {
            **overall,
            "tokens": self._tokens,
            "shuffled_tokens": self._shuffled_tokens,
            "layer_names": names,
            "per_layer": per_layer,
        }
        if self.num_heads is not None:
            shape = (num_layers, self.num_heads)
            result["num_heads"] = self.num_heads
            result["per_head"] = {name: self._means(self._head_sums, name, shape).tolist() for name in METRIC_NAMES}
        return result

    def _means(self, sums: dict[str, Tensor], name: str, shape: tuple[int, ...]) -> Tensor:
        """Divide one metric's sums by its token count; NaN when a shuffled metric saw no pairs."""
        count = self._shuffled_tokens if name.startswith("shuffled_") else self._tokens
        if count == 0:
            return torch.full(shape, math.nan, dtype=torch.float64)
        return sums[name].cpu() / count


def alignment_label(cos: float) -> str:
    """Label a mean cosine: above 0.95 Excellent, above 0.80 Good, above 0.50 Acceptable, else Poor.

    The thresholds are meant for centred cosine. On raw cosine a collapsed student can
    score Excellent.

    Raises:
        ValueError: for NaN or infinite input, which signals a broken run.
    """
    if not math.isfinite(cos):
        raise ValueError(f"cannot label a non-finite cosine ({cos}). Check the run for NaN or Inf")
    for threshold, label in _LABELS:
        if cos > threshold:
            return label
    return "Poor"


def collapse_warning(
    raw_cos: float, baseline_cos: float, margin: float = 0.05, *, centred_cos: float | None = None, gap: float = 0.3
) -> str | None:
    """Return a one-line warning when raw cosine overstates alignment, else None.

    It warns when raw cosine is within ``margin`` of the mean-vector baseline: a constant
    student would score about as well, so the raw cosine reflects nearly constant K/V.
    Given ``centred_cos``, it also warns when raw cosine exceeds centred cosine by more
    than ``gap``: the student has kept some token-specific variation, but most of the raw
    agreement comes from the shared per-layer mean direction.
    """
    if abs(raw_cos - baseline_cos) <= margin:
        return (
            f"raw cosine {raw_cos:.3f} is within {margin:g} of the mean-vector baseline {baseline_cos:.3f}, "
            "so the student's K/V are close to constant (collapse, not alignment). Judge by centred cosine"
        )
    if centred_cos is not None and raw_cos - centred_cos > gap:
        return (
            f"raw cosine {raw_cos:.3f} exceeds centred cosine {centred_cos:.3f} by more than {gap:g} "
            f"(mean-vector baseline {baseline_cos:.3f}), so most of the raw agreement is the shared mean "
            "direction, a partial collapse. Judge by centred cosine"
        )
    return None


def format_alignment(metrics: Mapping[str, Any]) -> str:
    """Format ``AlignmentMeter.result()`` as one log line, labelled by centred cosine."""
    centred = float(metrics["centred_cos"])
    label = alignment_label(centred) if math.isfinite(centred) else "non-finite"
    return (
        f"centred cos {centred:.4f} ({label}, label on centred cosine) | "
        f"raw cos {float(metrics['raw_cos']):.4f} | "
        f"mean-vector baseline {float(metrics['baseline_cos']):.4f} | "
        f"shuffled raw/centred {float(metrics['shuffled_raw_cos']):.4f}/"
        f"{float(metrics['shuffled_centred_cos']):.4f} | "
        f"tokens {metrics['tokens']}"
    )
