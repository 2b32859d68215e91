"""One accessor for the per-layer key/value cache of a Hugging Face causal LM.

transformers 5.x returns a ``DynamicCache`` whose ``layers[i].keys`` and ``.values`` are
shaped [batch, kv_heads, tokens, head_dim]; keys are cached after RoPE. The output field
is ``cache`` from transformers 5.25 on and ``past_key_values`` before it (5.25 still
answers the old name, with a deprecation warning). Both stages read the cache through
this module only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def output_cache(output: Any) -> Any:
    """Return the cache object of a model output, whichever name this transformers version uses."""
    keys = output.keys() if hasattr(output, "keys") else ()
    for name in ("cache", "past_key_values"):
        if name in keys and output[name] is not None:
            return output[name]
    raise RuntimeError("the model output has no key/value cache; call the model with use_cache=True")


def layer_kv(cache: Any, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (keys, values) of one layer, each [batch, kv_heads, tokens, head_dim]."""
    try:
        entry = cache.layers[layer]
    except AttributeError:
        raise RuntimeError(
            f"unsupported cache type {type(cache).__name__}: expected a transformers 5.x Cache with .layers"
        ) from None
    return entry.keys, entry.values


def stacked_kv(cache: Any, layers: Sequence[int]) -> torch.Tensor:
    """Stack the selected layers' keys and values as [batch, tokens, layers, 2, kv_heads, head_dim]."""
    per_layer = [torch.stack(layer_kv(cache, i), dim=0) for i in layers]  # each [2, B, H, T, D]
    stacked = torch.stack(per_layer, dim=0)  # [L, 2, B, H, T, D]
    return stacked.permute(2, 4, 0, 1, 3, 5)


def teacher_kv(
    base: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, layers: Sequence[int]
) -> torch.Tensor:
    """Run a teacher's base model with the cache on; return the selected layers as ``stacked_kv`` does.

    Extraction and the online-teacher mode of distill both call this, so the two see the
    same K/V for the same right-padded batch. Padding rows of the result are not zeroed.
    """
    output = base(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=True)
    return stacked_kv(output_cache(output), layers)


def kv_vectors(cache: Any, num_layers: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return keys and values as per-layer row vectors [batch, layers, tokens, kv_heads * head_dim].

    This is the shape the projector and the losses compare: all KV heads of a layer
    concatenated. The result keeps the autograd graph, so a student trained through it
    receives gradients.
    """
    keys, values = [], []
    for i in range(num_layers):
        k, v = layer_kv(cache, i)
        batch, heads, tokens, head_dim = k.shape
        keys.append(k.transpose(1, 2).reshape(batch, tokens, heads * head_dim))
        values.append(v.transpose(1, 2).reshape(batch, tokens, heads * head_dim))
    return torch.stack(keys, dim=1), torch.stack(values, dim=1)


def right_padded_batch(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Build (input_ids, attention_mask, position_ids) for right-padded sequences.

    Both stages pad on the right and pass explicit positions 0..n-1, so every real token
    sees the same positions as in an unbatched forward pass. Left padding without
    positions would shift RoPE, and FlashAttention-2 rejects right padding with the cache
    on, which is why extraction defaults to SDPA.
    """
    longest = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), longest), dtype=torch.long)
    for i, sequence in enumerate(sequences):
        input_ids[i, : len(sequence)] = torch.as_tensor(sequence, dtype=torch.long)
        attention_mask[i, : len(sequence)] = 1
    position_ids = torch.arange(longest).unsqueeze(0).expand(len(sequences), -1)
    return input_ids, attention_mask, position_ids
