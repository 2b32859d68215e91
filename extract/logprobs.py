"""The teacher's top-k next-token log-probabilities, computed from its last hidden states.

Only real tokens go through the LM head, in chunks, so memory stays bounded on a large
vocabulary: a float32 [tokens, vocab] logits matrix for a 150k-token vocabulary costs
about 600 KB per token.
"""

from __future__ import annotations

from typing import Any

import torch

from extract.errors import UserError

# Float32 logits computed at once; with 152k tokens (Qwen2.5) that is 441 tokens a chunk.
# With the log-sum-exp's temporary, the peak was about 520 MiB (measured on CPU with a
# 152,064-token head on 2,400 tokens, in float32 and in bfloat16).
LOGITS_CHUNK_BYTES = 256 * 2**20


def output_head(model: Any, config: Any) -> Any:
    """Return the LM head of a causal LM whose logits are plain ``lm_head(hidden)``; raise UserError otherwise."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    # Gemma 2 style soft-capping changes the logits after the head; this module does not apply it.
    if getattr(text_config, "final_logit_softcapping", None):
        raise UserError(
            f"--topk-logprobs does not support {text_config.model_type} models, whose logits are soft-capped "
            "after the LM head; extract with --topk-logprobs 0"
        )
    head = model.get_output_embeddings()
    if head is None:
        raise UserError(f"{type(model).__name__} has no LM head; --topk-logprobs needs a causal LM checkpoint")
    return head


def teacher_topk(head: Any, hidden: torch.Tensor, mask: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return the top-k next-token ids (int32) and log-probabilities (float32), each [batch, tokens, k].

    ``hidden`` is the base model's last hidden state [batch, tokens, hidden_size] and
    ``mask`` is True on real tokens. Log-probabilities are log_softmax of the float32
    logits over the whole vocabulary, sorted in descending order. Padded positions hold
    id 0 and log-probability 0, and the store never keeps them.
    """
    real = hidden[mask]  # [real tokens, hidden_size], batch-major
    vocab = int(head.weight.shape[0])
    chunk = max(1, LOGITS_CHUNK_BYTES // (4 * vocab))
    ids = torch.zeros((real.shape[0], k), dtype=torch.int32, device=hidden.device)
    logprobs = torch.zeros((real.shape[0], k), dtype=torch.float32, device=hidden.device)
    for start in range(0, real.shape[0], chunk):
        logits = head(real[start : start + chunk]).float()
        values, indices = logits.topk(k, dim=-1, sorted=True)
        # log_softmax(x)_i = x_i - logsumexp(x); taking it at the top-k only avoids a
        # second [chunk, vocab] buffer.
        logprobs[start : start + chunk] = values - torch.logsumexp(logits, dim=-1, keepdim=True)
        ids[start : start + chunk] = indices.to(torch.int32)
    batch_ids = torch.zeros((*mask.shape, k), dtype=torch.int32, device=hidden.device)
    batch_logprobs = torch.zeros((*mask.shape, k), dtype=torch.float32, device=hidden.device)
    batch_ids[mask] = ids
    batch_logprobs[mask] = logprobs
    return batch_ids, batch_logprobs
