"""KV-cache distillation losses: cosine direction ("Mercator"), MSE and their blend.

Every loss compares student and teacher K/V vectors token by token and layer by layer.
One vector is a layer's whole key (or value) row, all KV heads concatenated, so its
width is ``kv_heads * head_dim``.

Accepted shapes for ``student`` and ``teacher`` (both the same):

- ``[batch, layers, tokens, dim]``, the trainer's layout. The trainer stacks K and V
  along the layer axis.
- ``[tokens, dim]`` and ``[dim]``, read as batch 1 and layers 1.

``mask`` is ``[batch, tokens]`` bool with True on real tokens, or None when every
token is real. Padded positions may contain anything, NaN and Inf included (SDPA
returns NaN on rows that are all padding). They are removed with ``torch.where``
before any arithmetic, so they reach neither the loss nor its gradient. Means run
over real tokens and layers, so every real token of the batch weighs the same.

Each loss returns ``(loss, metrics)``. ``metrics`` maps the names in ``METRIC_KEYS``
to detached Python floats, computed the same way for every loss so runs compare.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

LOSS_NAMES: tuple[str, ...] = ("mercator", "mercator_centred", "mse", "hybrid")

METRIC_KEYS: tuple[str, ...] = (
    "loss",
    "cos_sim",
    "centred_cos",
    "dir_loss",
    "mag_loss",
    "mse",
    "s_magnitude",
    "t_magnitude",
    "mag_ratio",
)

_LOW_PRECISION = (torch.float16, torch.bfloat16)


@dataclass
class KVBatch:
    """Student and teacher K/V in the 4-D layout, with padding replaced by zeros.

    ``valid`` is ``[batch, 1, tokens, 1]`` bool and broadcasts against the tensors.
    ``real_tokens`` counts the True entries of the mask, not multiplied by layers.
    """

    student: Tensor
    teacher: Tensor
    valid: Tensor
    real_tokens: int

    @property
    def num_layers(self) -> int:
        return self.student.shape[1]


def _to_4d(x: Tensor, name: str) -> Tensor:
    if x.dim() == 1:
        return x.reshape(1, 1, 1, -1)
    if x.dim() == 2:
        return x.unsqueeze(0).unsqueeze(0)
    if x.dim() == 4:
        return x
    raise ValueError(
        f"{name} must be [batch, layers, tokens, dim], [tokens, dim] or [dim]; "
        f"got shape {tuple(x.shape)}"
    )


def as_kv_batch(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> KVBatch:
    """Validate a student/teacher pair, bring it to 4-D and zero its padding.

    float16 and bfloat16 inputs are upcast to float32, because cosine sums over
    hundreds of channels lose too much precision in half precision.

    Raises:
        ValueError: on mismatched or unsupported shapes, a non-bool mask, or a mask
            with no real token.
    """
    if student.shape != teacher.shape:
        raise ValueError(
            f"student and teacher shapes differ: {tuple(student.shape)} vs "
            f"{tuple(teacher.shape)}. Project the teacher to the student's layout first"
        )
    s = _to_4d(student, "student")
    t = _to_4d(teacher, "teacher")
    if s.dtype in _LOW_PRECISION:
        s = s.float()
    if t.dtype in _LOW_PRECISION:
        t = t.float()

    batch, _, tokens, _ = s.shape
    if mask is None:
        mask = torch.ones(batch, tokens, dtype=torch.bool, device=s.device)
    else:
        if mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor (True = real token), got {mask.dtype}")
        if mask.dim() == 1 and batch == 1:
            mask = mask.unsqueeze(0)
        if tuple(mask.shape) != (batch, tokens):
            raise ValueError(
                f"mask shape {tuple(mask.shape)} does not match [batch, tokens] = {(batch, tokens)}"
            )
        mask = mask.to(s.device)

    real_tokens = int(mask.sum().item())
    if real_tokens == 0:
        raise ValueError("mask has no real token, so there is nothing to average. Drop empty batches before the loss")

    valid = mask[:, None, :, None]
    zero = s.new_zeros(())
    s = torch.where(valid, s, zero)
    t = torch.where(valid, t, zero)
    return KVBatch(student=s, teacher=t, valid=valid, real_tokens=real_tokens)


def masked_mean(values: Tensor, batch: KVBatch) -> Tensor:
    """Average ``[batch, layers, tokens]`` values over real tokens and layers."""
    kept = torch.where(batch.valid.squeeze(-1), values, values.new_zeros(()))
    return kept.sum() / (batch.real_tokens * batch.num_layers)


def layer_means(x: Tensor, batch: KVBatch) -> Tensor:
    """Return the per-layer mean vector over the batch's real tokens, ``[1, layers, 1, dim]``.

    ``x`` must already have zeros on padding, as ``KVBatch`` tensors do.
    """
    return x.sum(dim=(0, 2), keepdim=True) / batch.real_tokens


def cosine(a: Tensor, b: Tensor, epsilon: float) -> Tensor:
    """Compute cosine similarity over the last axis, with norms clamped below at ``epsilon``.

    A zero vector therefore scores 0 against anything instead of NaN.
    """
    a_unit = a / torch.linalg.vector_norm(a, dim=-1, keepdim=True).clamp_min(epsilon)
    b_unit = b / torch.linalg.vector_norm(b, dim=-1, keepdim=True).clamp_min(epsilon)
    return (a_unit * b_unit).sum(dim=-1)


def _raw_cosine(batch: KVBatch, epsilon: float) -> Tensor:
    return masked_mean(cosine(batch.student, batch.teacher, epsilon), batch)


def _centred_cosine(batch: KVBatch, epsilon: float) -> Tensor:
    # Centre with where() rather than plain subtraction, so padding stays exactly zero
    # and does not pick up minus the mean.
    zero = batch.student.new_zeros(())
    s = torch.where(batch.valid, batch.student - layer_means(batch.student, batch), zero)
    t = torch.where(batch.valid, batch.teacher - layer_means(batch.teacher, batch), zero)
    return masked_mean(cosine(s, t, epsilon), batch)


def _log_magnitude_loss(batch: KVBatch, epsilon: float) -> Tensor:
    s_norm = torch.linalg.vector_norm(batch.student, dim=-1).clamp_min(epsilon)
    t_norm = torch.linalg.vector_norm(batch.teacher, dim=-1).clamp_min(epsilon)
    return masked_mean((s_norm.log() - t_norm.log()).square(), batch)


def _mse(batch: KVBatch) -> Tensor:
    # Padding is zero on both sides, so it adds nothing to the sum.
    squared = (batch.student - batch.teacher).square().sum()
    return squared / (batch.real_tokens * batch.num_layers * batch.student.shape[-1])


def _metrics(loss: Tensor, batch: KVBatch, epsilon: float) -> dict[str, float]:
    """Compute the shared metric dict without gradients.

    ``dir_loss`` and ``mag_loss`` are the unweighted Mercator terms on raw vectors,
    reported for every loss so that MSE runs compare with cosine runs.
    """
    with torch.no_grad():
        raw = _raw_cosine(batch, epsilon)
        centred = _centred_cosine(batch, epsilon)
        mag_loss = _log_magnitude_loss(batch, epsilon)
        mse = _mse(batch)
        s_magnitude = masked_mean(torch.linalg.vector_norm(batch.student, dim=-1), batch)
        t_magnitude = masked_mean(torch.linalg.vector_norm(batch.teacher, dim=-1), batch)
        mag_ratio = s_magnitude / t_magnitude.clamp_min(epsilon)
    return {
        "loss": float(loss.detach().item()),
        "cos_sim": float(raw.item()),
        "centred_cos": float(centred.item()),
        "dir_loss": float(1.0 - raw.item()),
        "mag_loss": float(mag_loss.item()),
        "mse": float(mse.item()),
        "s_magnitude": float(s_magnitude.item()),
        "t_magnitude": float(t_magnitude.item()),
        "mag_ratio": float(mag_ratio.item()),
    }


class MercatorKVLoss(nn.Module):
    """Cosine direction loss with an optional log-magnitude term.

    ``total = alpha * (1 - cos) + beta * mean((ln|s| - ln|t|)^2)``, where ``cos`` is the
    mean over real tokens and layers of the cosine between student and teacher vectors,
    and ``epsilon`` is the lower clamp on norms used for normalising and for the log.

    With ``centred=False`` (the loss as originally designed) the cosine is taken on raw
    vectors. When both sides are trainable, that objective is minimised by nearly
    constant K/V, so it can score close to 1 while little token-specific information is
    aligned. ``centred=True`` first subtracts, per layer, the mean over the batch's real
    tokens (all samples together) from each side, which removes that shortcut. The
    magnitude term always uses the raw vectors. A centred batch with one real token has
    zero vectors after centring, and its centred cosine is 0.

    The ``dir_loss`` metric is ``1 - raw cosine`` whatever ``centred`` is. With
    ``centred=True`` the optimised direction term is ``1 - centred_cos``.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 0.0, epsilon: float = 1e-8, centred: bool = False) -> None:
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be non-negative, got alpha={alpha}, beta={beta}")
        if epsilon <= 0:
            raise ValueError(f"epsilon must be positive, got {epsilon}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.epsilon = float(epsilon)
        self.centred = bool(centred)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, beta={self.beta}, epsilon={self.epsilon}, centred={self.centred}"

    def objective(self, batch: KVBatch) -> Tensor:
        """Compute the differentiable loss on a prepared batch."""
        if self.centred:
            direction = 1.0 - _centred_cosine(batch, self.epsilon)
        else:
            direction = 1.0 - _raw_cosine(batch, self.epsilon)
        loss = self.alpha * direction
        if self.beta > 0:
            loss = loss + self.beta * _log_magnitude_loss(batch, self.epsilon)
        return loss

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        batch = as_kv_batch(student, teacher, mask)
        loss = self.objective(batch)
        return loss, _metrics(loss, batch, self.epsilon)


class MSEKVLoss(nn.Module):
    """Mean squared error over the real elements of student and teacher K/V.

    The baseline the cosine loss is compared with. Its metrics include the cosine-side
    terms (``dir_loss`` = 1 - raw cosine, ``mag_loss`` = log-magnitude error), which
    are reported but not optimised.
    """

    def __init__(self, epsilon: float = 1e-8) -> None:
        super().__init__()
        if epsilon <= 0:
            raise ValueError(f"epsilon must be positive, got {epsilon}")
        self.epsilon = float(epsilon)

    def objective(self, batch: KVBatch) -> Tensor:
        """Compute the differentiable loss on a prepared batch."""
        return _mse(batch)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        batch = as_kv_batch(student, teacher, mask)
        loss = self.objective(batch)
        return loss, _metrics(loss, batch, self.epsilon)


class HybridKVLoss(nn.Module):
    """Weighted sum ``mercator_weight * Mercator + mse_weight * MSE`` (0.8 and 0.2 by default).

    The Mercator part uses raw cosine unless ``centred=True``. The metric ``loss`` is
    the weighted total, and the other metrics are the shared ones.
    """

    def __init__(
        self,
        mercator_weight: float = 0.8,
        mse_weight: float = 0.2,
        alpha: float = 1.0,
        beta: float = 0.0,
        epsilon: float = 1e-8,
        centred: bool = False,
    ) -> None:
        super().__init__()
        if mercator_weight < 0 or mse_weight < 0:
            raise ValueError(
                f"weights must be non-negative, got mercator_weight={mercator_weight}, mse_weight={mse_weight}"
            )
        self.mercator_weight = float(mercator_weight)
        self.mse_weight = float(mse_weight)
        self.mercator = MercatorKVLoss(alpha=alpha, beta=beta, epsilon=epsilon, centred=centred)
        self.mse = MSEKVLoss(epsilon=epsilon)

    def objective(self, batch: KVBatch) -> Tensor:
        """Compute the differentiable loss on a prepared batch."""
        return self.mercator_weight * self.mercator.objective(batch) + self.mse_weight * self.mse.objective(batch)

    def forward(self, student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> tuple[Tensor, dict[str, float]]:
        batch = as_kv_batch(student, teacher, mask)
        loss = self.objective(batch)
        return loss, _metrics(loss, batch, self.mercator.epsilon)


def build_loss(name: str, *, alpha: float = 1.0, beta: float = 0.0, epsilon: float = 1e-8) -> nn.Module:
    """Build a loss by its configuration name.

    ``"mercator"`` is the cosine loss on raw vectors, as originally designed.
    ``"mercator_centred"`` centres each side per layer first and is the shipped default.
    ``"mse"`` ignores ``alpha`` and ``beta``. ``"hybrid"`` is 0.8 x raw Mercator plus
    0.2 x MSE.

    Raises:
        ValueError: if ``name`` is not one of ``LOSS_NAMES``.
    """
    if name == "mercator":
        loss: nn.Module = MercatorKVLoss(alpha=alpha, beta=beta, epsilon=epsilon, centred=False)
    elif name == "mercator_centred":
        loss = MercatorKVLoss(alpha=alpha, beta=beta, epsilon=epsilon, centred=True)
    elif name == "mse":
        loss = MSEKVLoss(epsilon=epsilon)
    elif name == "hybrid":
        loss = HybridKVLoss(alpha=alpha, beta=beta, epsilon=epsilon)
    else:
        raise ValueError(f"unknown loss {name!r}; valid names: {', '.join(LOSS_NAMES)}")
    logger.debug("built loss %s: %r", name, loss)
    return loss



def _layer_variance(x: Tensor, mask: Tensor | None) -> Tensor:
    """Mean over channels of each channel's population variance over real tokens, ``[layers]``."""
    batch = as_kv_batch(x, x.detach(), mask)
    centred = torch.where(batch.valid, batch.student - layer_means(batch.student, batch), batch.student.new_zeros(()))
    return (centred.square().sum(dim=(0, 2)) / batch.real_tokens).mean(dim=-1)


def layer_std(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Return each layer's spread of K/V over real tokens, ``[layers]``: the RMS over channels of the per-channel std.

    ``x`` is ``[batch, layers, tokens, dim]`` (or 2-D/1-D as for the losses). A layer
    whose vectors are the same for every token scores 0, which is what collapse looks
    like.
    """
    return _layer_variance(x, mask).sqrt()


def variance_floor_penalty(student: Tensor, target: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Hinge penalty on per-layer student std below ``target``, as in VICReg's variance term.

    ``target`` is ``[layers]`` (or a scalar). Returns ``(penalty, std)`` where
    ``penalty = mean_over_layers(relu(1 - std / target))``, so it is 0 while every
    layer keeps its target spread and 1 for fully constant K/V. Dividing by the target
    makes the weight independent of the model's K/V scale. The ratio is taken as
    ``sqrt(var / target^2 + 1e-4)``, which keeps the gradient finite at zero variance
    (VICReg adds the same 1e-4 under the square root). Unlike VICReg, which hinges
    every channel, the hinge here acts on the layer's RMS std, so channels that vary
    little by nature are not pushed up.
    """
    variance = _layer_variance(student, mask)
    target = torch.as_tensor(target, dtype=variance.dtype, device=variance.device)
    relative_std = torch.sqrt(variance / target.square() + 1e-4)
    penalty = torch.relu(1.0 - relative_std).mean()
    return penalty, variance.detach().sqrt()
