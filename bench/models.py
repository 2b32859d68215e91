"""Benchmark models built from Qwen2 configs, and their compute per stored KV byte.

The ratio that decides whether store writes can hide behind the teacher, and store
reads behind the student, is compute per stored byte. The real pair is Qwen2.5-14B
(teacher) and Qwen2.5-1.5B (student). They cannot run on a CPU, so the CPU benchmarks
use small random-initialised Qwen2 models whose ratios are close to the real ones. The
ratios are computed here from the shapes and printed beside each other in the report.
No weights are downloaded: every model is random-initialised from its config.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from extract.embedded import repo_data_dir
from extract.store import KVLayout

# Shapes from the models' published config.json files.
QWEN25_14B = dict(
    hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
    num_key_value_heads=8, head_dim=128, vocab_size=152064, max_position_embeddings=32768,
    rope_theta=1_000_000.0, tie_word_embeddings=False,
)
QWEN25_1_5B = dict(
    hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
    num_key_value_heads=2, head_dim=128, vocab_size=151936, max_position_embeddings=32768,
    rope_theta=1_000_000.0, tie_word_embeddings=True,
)
# CPU stand-ins. The teacher keeps the 14B's forward FLOP per stored KV byte (about
# 1.3e5) at about 1/200 of its work per token. The student keeps the 1.5B's training
# FLOP per consumed teacher KV byte (about 4e4).
BENCH_TEACHER = dict(
    hidden_size=1280, intermediate_size=3456, num_hidden_layers=4, num_attention_heads=20,
    num_key_value_heads=1, head_dim=64, max_position_embeddings=512, rope_theta=1_000_000.0,
    tie_word_embeddings=False,
)
BENCH_STUDENT = dict(
    hidden_size=512, intermediate_size=1280, num_hidden_layers=3, num_attention_heads=8,
    num_key_value_heads=2, head_dim=64, max_position_embeddings=512, rope_theta=1_000_000.0,
    tie_word_embeddings=True,
)
# Smoke mode only checks that every benchmark runs, so it uses much smaller models.
SMOKE_TEACHER = dict(BENCH_TEACHER, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4)
SMOKE_STUDENT = dict(BENCH_STUDENT, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)

# Mean tokens per GSM8K train problem with its solution (about 1.9 M tokens over 7,473
# problems), used for the attention term of the real models.
REAL_MEAN_TOKENS = 250
STORE_BYTES = 2  # bfloat16, the dtype a GPU extraction stores


@dataclass(frozen=True)
class Shapes:
    """The config fields that fix a decoder's compute and KV size."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @classmethod
    def of(cls, config: dict[str, Any]) -> "Shapes":
        return cls(
            config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"],
            config["num_attention_heads"], config["num_key_value_heads"], config["head_dim"],
        )

    @property
    def kv_width(self) -> int:
        return self.kv_heads * self.head_dim

    def kv_bytes_per_token(self, itemsize: int = STORE_BYTES) -> int:
        """Bytes of one token's stored K and V over all layers."""
        return self.layers * 2 * self.kv_width * itemsize

    def forward_flops_per_token(self, mean_tokens: float) -> float:
        """Forward FLOP per token of the decoder stack (no LM head, as extraction runs it).

        Per layer: 2 FLOP per weight of the q, k, v, o and three MLP projections. The
        attention scores and the weighted sum add 2 x 2 x context x heads x head_dim,
        where a causal token attends on average to (mean_tokens + 1) / 2 positions.
        """
        h, q_width = self.hidden, self.heads * self.head_dim
        weights = h * q_width + 2 * h * self.kv_width + q_width * h + 3 * h * self.intermediate
        context = (mean_tokens + 1) / 2
        return self.layers * (2 * weights + 4 * context * q_width)


def projector_flops_per_token(teacher: Shapes, student: Shapes, mlp_ratio: float = 1.0) -> float:
    """Forward FLOP per token of the Elastic Bottleneck projector: K and V adapters per student layer."""
    d_t, d_s = teacher.kv_width, student.kv_width
    bottleneck = int(d_t * mlp_ratio)
    per_adapter = 2 * (d_t * bottleneck + bottleneck * d_s)
    return 2 * student.layers * per_adapter


def teacher_flops_per_byte(teacher: Shapes, mean_tokens: float) -> float:
    """Teacher forward FLOP per stored KV byte (bf16)."""
    return teacher.forward_flops_per_token(mean_tokens) / teacher.kv_bytes_per_token()


def student_flops_per_byte(teacher: Shapes, student: Shapes, mean_tokens: float) -> float:
    """Student training FLOP (forward and backward, 3x forward) per consumed teacher KV byte (bf16)."""
    train = 3 * (student.forward_flops_per_token(mean_tokens) + projector_flops_per_token(teacher, student))
    return train / teacher.kv_bytes_per_token()


def qwen14b_layout(dtype: str = "bfloat16") -> KVLayout:
    """Return the store layout of Qwen2.5-14B's K/V, all layers."""
    shapes = Shapes.of(QWEN25_14B)
    return KVLayout(layers=tuple(range(shapes.layers)), num_kv_heads=shapes.kv_heads, head_dim=shapes.head_dim, dtype=dtype)


def qwen2_config(shapes: dict[str, Any], vocab_size: int, pad_token_id: int = 0) -> Any:
    from transformers import Qwen2Config

    values = dict(shapes)
    values["vocab_size"] = vocab_size
    theta = values.pop("rope_theta")
    return Qwen2Config(
        **values,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
        pad_token_id=pad_token_id,
        bos_token_id=pad_token_id,
        eos_token_id=pad_token_id,
        use_sliding_window=False,
    )


def tokenizer_dir() -> Path:
    """Return the embedded tokenizer's directory; every benchmark model uses it, so stores and students agree."""
    return repo_data_dir() / "tokenizer"


def tokenizer_files() -> list[Path]:
    return sorted(p for p in tokenizer_dir().iterdir() if p.is_file())


def tokenizer_vocab_size() -> int:
    config = json.loads((repo_data_dir() / "tokenizer" / "tokenizer.json").read_text(encoding="utf-8"))
    return len(config["model"]["vocab"]) + len(config.get("added_tokens", []))


def build_model_dir(out: Path, shapes: dict[str, Any], *, seed: int, vocab_size: int | None = None) -> Path:
    """Write a random-initialised Qwen2 checkpoint with the embedded tokenizer to ``out``."""
    from transformers import Qwen2ForCausalLM

    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    config = qwen2_config(shapes, vocab_size or tokenizer_vocab_size())
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.save_pretrained(out)
    for file in tokenizer_files():
        shutil.copy(file, out / file.name)
    return out


def build_on_device(shapes: dict[str, Any], *, seed: int, device: torch.device, dtype: torch.dtype) -> Any:
    """Random-initialise a Qwen2 model directly on ``device`` (for real-size shapes on a GPU)."""
    from transformers import Qwen2ForCausalLM

    config = qwen2_config(shapes, shapes["vocab_size"])
    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Qwen2ForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def write_config_dir(out: Path, shapes: dict[str, Any]) -> Path:
    """Write only config.json and the embedded tokenizer: enough to describe a model built in memory."""
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    qwen2_config(shapes, shapes["vocab_size"]).save_pretrained(out)
    for file in tokenizer_files():
        shutil.copy(file, out / file.name)
    return out
