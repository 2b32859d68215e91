"""Loading teacher and student models and describing them for the manifest.

Real checkpoints and the embedded default take the same path:
``AutoConfig`` / ``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from extract.errors import UserError

logger = logging.getLogger(__name__)

COMPUTE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


@dataclass(frozen=True)
class KVGeometry:
    """The config fields that fix the shape of a model's key/value cache."""

    model_type: str
    num_hidden_layers: int
    num_key_value_heads: int
    head_dim: int
    hidden_size: int
    rope_theta: float | None

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim


def kv_geometry(config: Any) -> KVGeometry:
    """Read the KV shape from a transformers config (Qwen2 and other decoder-only models)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text_config.num_attention_heads
    kv_heads = getattr(text_config, "num_key_value_heads", None) or heads
    head_dim = getattr(text_config, "head_dim", None) or text_config.hidden_size // heads
    rope = getattr(text_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    if theta is None:
        theta = getattr(text_config, "rope_theta", None)
    return KVGeometry(
        model_type=str(text_config.model_type),
        num_hidden_layers=int(text_config.num_hidden_layers),
        num_key_value_heads=int(kv_heads),
        head_dim=int(head_dim),
        hidden_size=int(text_config.hidden_size),
        rope_theta=float(theta) if theta is not None else None,
    )


def model_identity(name_or_path: str, config: Any) -> dict[str, str]:
    """Identify a checkpoint: its hub revision when known, else a hash of its files.

    The hash covers config.json's bytes and the names and sizes of the weight files
    (hashing the weights themselves would cost minutes on a 14B checkpoint).
    """
    directory = Path(name_or_path)
    if directory.is_dir():
        digest = hashlib.sha256()
        config_file = directory / "config.json"
        digest.update(config_file.read_bytes() if config_file.is_file() else b"")
        for weight in sorted(p for p in directory.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()):
            digest.update(f"\n{weight.name}:{weight.stat().st_size}".encode())
        return {"kind": "content-hash", "value": digest.hexdigest()}
    revision = getattr(config, "_commit_hash", None)
    if revision:
        return {"kind": "hub-revision", "value": str(revision)}
    return {"kind": "name", "value": name_or_path}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash a tokenizer's vocabulary, merges and special tokens.

    Two checkpoints whose config.json ``vocab_size`` differs only by padding (as in the
    Qwen2.5 family) still get the same fingerprint when their tokenizers agree.
    """
    payload: dict[str, Any] = {}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        serialized = json.loads(backend.to_str())
        model = serialized.get("model", {})
        payload["model_type"] = model.get("type")
        payload["vocab"] = model.get("vocab")
        payload["merges"] = model.get("merges")
        payload["added_tokens"] = [
            {k: token.get(k) for k in ("id", "content", "special")} for token in serialized.get("added_tokens", [])
        ]
    else:
        payload["vocab"] = sorted(tokenizer.get_vocab().items())
    payload["special_tokens"] = {
        name: getattr(tokenizer, name, None) for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    encoded = json.dumps(payload, sort_keys=True, ensure_ascii=False).encode("utf-8")
    return "sha256:" + hashlib.sha256(encoded).hexdigest()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return resolved


def resolve_compute_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` means bf16 on a GPU and fp32 on a CPU, where bf16 matmuls are slow."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return COMPUTE_DTYPES[name]
    except KeyError:
        raise UserError(f"unknown dtype {name!r}; choose auto or one of {', '.join(COMPUTE_DTYPES)}") from None


def load_config(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a model config from {name_or_path!r}: {str(exc).splitlines()[0]}") from None


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a tokenizer from {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    return tokenizer


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: torch.dtype,
    device: torch.device,
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
) -> Any:
    from transformers import AutoModelForCausalLM

    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise UserError(
            f"--attn-implementation {attn_implementation!r} is not supported; choose one of {', '.join(ATTN_IMPLEMENTATIONS)} "
            "(FlashAttention-2 rejects the right padding both stages use)"
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path, dtype=dtype, attn_implementation=attn_implementation, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load a model from {name_or_path!r}: {str(exc).splitlines()[0]}") from None
    return model.to(device)


def geometry_dict(geometry: KVGeometry) -> dict[str, Any]:
    return asdict(geometry)


def vocab_size(config: Any) -> int:
    """Return the size of the model's output vocabulary (``vocab_size`` in config.json, padding included)."""
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text_config.vocab_size)
