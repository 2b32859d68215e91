"""Token-level losses on the student's output distribution: answer-token cross-entropy and top-k KD.

Both work on logits of selected positions only (``[positions, vocab]``), because the
full ``[batch, tokens, vocab]`` logits of a 150k-token vocabulary cost far more memory
than the K/V losses. ``next_token_mask`` and ``next_token_ids`` pick the positions and
targets from a right-padded batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def next_token_mask(attention_mask: Tensor, answer_mask: Tensor | None = None) -> Tensor:
    """Return ``[batch, tokens]`` bool: True at position t when token t + 1 is a target.

    The logits at position t predict token t + 1, so a position is selected when the
    token after it is real and, given ``answer_mask``, an answer token. Without
    ``answer_mask`` every real token after the first is a target. The last position
    has no next token and is never selected.
    """
    targets = attention_mask if answer_mask is None else attention_mask & answer_mask
    selected = torch.zeros_like(attention_mask)
    selected[:, :-1] = targets[:, 1:]
    return selected


def next_token_ids(input_ids: Tensor) -> Tensor:
    """Shift ``[batch, tokens]`` ids left by one, so entry t is the token that follows position t.

    The last column is filled with 0. ``next_token_mask`` never selects it.
    """
    shifted = torch.zeros_like(input_ids)
    shifted[:, :-1] = input_ids[:, 1:]
    return shifted


def answer_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy in nats over ``[positions, vocab]`` logits and ``[positions]`` targets.

    Computed in float32. With no position it returns 0, so a batch without answer
    tokens adds nothing instead of NaN.
    """
    if logits.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return F.cross_entropy(logits.float(), targets)


def topk_kl_divergence(
    student_logits: Tensor, teacher_ids: Tensor, teacher_logprobs: Tensor, temperature: float = 1.0
) -> Tensor:
    """KL(teacher top-k || student), averaged over positions and scaled by ``temperature ** 2``.

    ``student_logits`` is ``[positions, vocab]``; ``teacher_ids`` and
    ``teacher_logprobs`` are ``[positions, k]``, the teacher's k most likely next tokens
    and their log-probabilities at the same positions.

    The stored top-k mass is below 1, so the teacher side is renormalised over its k
    tokens: ``p = softmax(teacher_logprobs / T)``. Since log-probabilities differ from
    logits by a per-position constant, this equals the teacher's tempered softmax
    restricted to its top k. The student side is its full-vocabulary
    ``log_softmax(logits / T)`` read at the teacher's k ids, not renormalised. The
    result is still non-negative, and it is 0 only when the student puts all its mass
    on those k tokens in the teacher's proportions, so probability the student leaves
    outside the top k is penalised. The gradient of a tempered KL scales as
    ``1 / T ** 2``, so the ``T ** 2`` factor keeps its size comparable across
    temperatures, the usual convention in knowledge distillation. Teacher entries of ``-inf``
    (fewer than k candidates) get probability 0 and add nothing.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if teacher_ids.shape != teacher_logprobs.shape or teacher_ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"teacher_ids {tuple(teacher_ids.shape)} and teacher_logprobs {tuple(teacher_logprobs.shape)} must both be "
            f"[positions, k] with the {student_logits.shape[0]} positions of student_logits"
        )
    if student_logits.shape[0] == 0:
        return student_logits.new_zeros((), dtype=torch.float32)
    teacher_log_p = torch.log_softmax(teacher_logprobs.float() / temperature, dim=-1)
    teacher_p = teacher_log_p.exp()
    student_log_q = torch.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    terms = torch.where(teacher_p > 0, teacher_p * (teacher_log_p - student_log_q), teacher_p.new_zeros(()))
    return terms.sum(dim=-1).mean() * temperature**2
