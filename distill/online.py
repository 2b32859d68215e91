"""Online-teacher mode: the teacher runs in the training loop instead of being read from the store.

Token ids and the train/held-out split still come from the store. Only the teacher K/V
are computed, batch by batch, with the forward pass extraction uses
(``extract.capture.teacher_kv``): the store's layers, its compute dtype, and the result
cast to its store dtype, so a batch gets the K/V the store holds for it. The teacher
must be the one that wrote the store, so its identity, KV geometry and tokenizer are
checked against the manifest first. The mode measures what the offline store saves
(``make bench``), and trains without the store's disk space at the price of a teacher
forward pass per step.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from distill.stream import KVBatch
from extract.capture import teacher_kv
from extract.embedded import resolve_model_path
from extract.errors import UserError
from extract.models import geometry_dict, kv_geometry, load_causal_lm, load_config, load_tokenizer, model_identity, tokenizer_fingerprint
from extract.store import Manifest
from extract.store.shards import STORE_DTYPES, torch_dtype

logger = logging.getLogger(__name__)


def check_teacher_matches(name: str, teacher_path: str, config: Any, tokenizer: Any, manifest: Manifest) -> None:
    """Raise UserError unless the teacher at ``teacher_path`` is the one the store's manifest describes."""
    stored = manifest.teacher
    where = f"the store's teacher {stored.get('name_or_path')!r}"
    identity = model_identity(teacher_path, config)
    if identity != stored.get("identity"):
        raise UserError(
            f"online teacher {name!r} is not {where}: identity {identity} differs from the store's {stored.get('identity')}; "
            "pass the teacher checkpoint that wrote the store"
        )
    for key, value in geometry_dict(kv_geometry(config)).items():
        if stored.get(key) != value:
            raise UserError(
                f"online teacher {name!r} has {key}={value!r} but {where} has {stored.get(key)!r}; "
                "pass the teacher checkpoint that wrote the store"
            )
    fingerprint = tokenizer_fingerprint(tokenizer)
    if fingerprint != manifest.tokenizer.get("fingerprint"):
        raise UserError(
            f"online teacher {name!r} has tokenizer {fingerprint[:23]} but the store was written with "
            f"{str(manifest.tokenizer.get('fingerprint'))[:23]}; pass the teacher checkpoint that wrote the store"
        )


class OnlineTeacher:
    """A teacher in memory that produces, for a store batch, the K/V the store holds for it."""

    def __init__(self, model: Any, manifest: Manifest) -> None:
        self.model = model.eval().requires_grad_(False)
        self.base = model.base_model
        self.layers = manifest.layout.layers
        self.store_dtype = torch_dtype(manifest.layout.dtype)

    @classmethod
    def load(cls, name_or_path: str, manifest: Manifest, device: torch.device) -> "OnlineTeacher":
        """Load and check the teacher ``name_or_path`` (a directory, a hub id or ``embedded-teacher``)."""
        path = resolve_model_path(name_or_path, role="teacher")
        config = load_config(path)
        tokenizer = load_tokenizer(path)
        check_teacher_matches(name_or_path, path, config, tokenizer, manifest)
        compute = manifest.teacher.get("compute_dtype")
        if compute not in STORE_DTYPES:
            raise UserError(f"the store's manifest names teacher compute dtype {compute!r}; expected one of {', '.join(STORE_DTYPES)}")
        model = load_causal_lm(
            path,
            dtype=STORE_DTYPES[compute],
            device=device,
            attn_implementation=manifest.teacher.get("attn_implementation", "sdpa"),
        )
        logger.info("online teacher %s on %s in %s; layers %s", name_or_path, device, compute, list(manifest.layout.layers))
        return cls(model, manifest)

    @torch.no_grad()
    def kv(self, batch: KVBatch) -> torch.Tensor:
        """Teacher K/V of the batch as [batch, tokens, layers, 2, kv_heads, head_dim] in the store dtype; padding is zero.

        ``no_grad`` and not ``inference_mode``: the projector saves its input for the
        backward pass, which inference tensors do not allow.
        """
        mask = batch.attention_mask
        kv = teacher_kv(self.base, batch.input_ids, mask.long(), batch.position_ids, self.layers).to(self.store_dtype)
        return kv.masked_fill(~mask[:, :, None, None, None, None], 0)

    def vectors(self, batch: KVBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher keys and values as ``KVBatch.teacher_vectors`` returns them for a store batch."""
        return dataclasses.replace(batch, teacher_kv=self.kv(batch)).teacher_vectors()


def load_online_teacher(name_or_path: str, manifest: Manifest, device: torch.device) -> OnlineTeacher | None:
    """Return the online teacher for config key ``online_teacher``, or None when it is empty (off)."""
    if not name_or_path:
        return None
    return OnlineTeacher.load(name_or_path, manifest, device)
