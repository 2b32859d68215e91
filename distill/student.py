"""The student side: loading it, checking it against the store, reading its K/V with gradients."""

from __future__ import annotations

import logging
from typing import Any

import torch

from extract.capture import kv_vectors, output_cache
from extract.embedded import resolve_model_path
from extract.errors import UserError
from extract.models import kv_geometry, load_causal_lm, load_tokenizer, tokenizer_fingerprint
from extract.store import Manifest

logger = logging.getLogger(__name__)


def load_student(name_or_path: str, manifest: Manifest, device: torch.device) -> tuple[Any, Any, str]:
    """Load the student in fp32 and check that it reads the store's token ids the same way.

    Returns (model, tokenizer, resolved path). Raises ``UserError`` when the student's
    tokenizer fingerprint differs from the store's or its context is too short.
    """
    path = resolve_model_path(name_or_path)
    tokenizer = load_tokenizer(path)
    stored = manifest.tokenizer.get("fingerprint")
    actual = tokenizer_fingerprint(tokenizer)
    if stored != actual:
        raise UserError(
            f"student tokenizer {name_or_path} (fingerprint {actual[:23]}) differs from the store's teacher tokenizer "
            f"({str(stored)[:23]}); both stages must see the same token ids, so use a student that shares the teacher's tokenizer"
        )
    # fp32 master weights; on a GPU the forward pass runs under bf16 autocast.
    model = load_causal_lm(path, dtype=torch.float32, device=device)
    longest = int(manifest.dataset.get("max_length") or 0)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and longest > context:
        raise UserError(
            f"the store's samples may have {longest} tokens but student {name_or_path} supports {context} positions; "
            "re-extract with a smaller --max-length or use a student with a longer context"
        )
    return model, tokenizer, path


def student_geometry(model: Any) -> tuple[int, int]:
    """Return (layers, KV width) of the student."""
    geometry = kv_geometry(model.config)
    return geometry.num_hidden_layers, geometry.kv_width


def student_forward(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run the student's base model with the cache on; return (keys, values, last hidden state).

    Keys and values are [batch, layers, tokens, kv_width]; the hidden state is
    [batch, tokens, hidden]. The LM head is not applied, so callers that need logits
    apply ``model.get_output_embeddings()`` to the positions they use. The cached
    tensors keep their autograd graph.
    """
    output = model.base_model(
        input_ids=input_ids,
        attention_mask=attention_mask.long(),
        position_ids=position_ids,
        use_cache=True,
    )
    keys, values = kv_vectors(output_cache(output), model.config.num_hidden_layers)
    return keys, values, output.last_hidden_state


def student_kv(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the student with the cache on; return its keys and values as [batch, layers, tokens, kv_width]."""
    keys, values, _ = student_forward(model, input_ids, attention_mask, position_ids)
    return keys, values
