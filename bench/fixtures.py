"""Models and stores that several benchmarks use, built once per invocation on first request."""

from __future__ import annotations

import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import BenchContext
from bench.models import BENCH_STUDENT, BENCH_TEACHER, QWEN25_1_5B, SMOKE_STUDENT, SMOKE_TEACHER, build_model_dir, qwen14b_layout
from bench.stores import lengths_for_bytes, write_random_store
from extract.embedded import embedded_problems_path
from extract.models import load_tokenizer, tokenizer_fingerprint
from extract.pipeline import ExtractOptions, ExtractResult, run_extract

logger = logging.getLogger("bench")

# Size of the random Qwen2.5-14B-shaped store that GPU runs train the 1.5B-shaped student on.
REAL_SHAPES_STORE_BYTES = 4 * 2**30
# Problems extracted into the store that the distill benchmarks (stall, online) train on.
DISTILL_STORE_SAMPLES = 96
SMOKE_DISTILL_STORE_SAMPLES = 24


@dataclass
class Fixtures:
    """Lazily built shared inputs, and figures one benchmark measures for another (``measured``)."""

    ctx: BenchContext
    measured: dict[str, float] = field(default_factory=dict)
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def teacher_shapes(self) -> dict[str, Any]:
        return SMOKE_TEACHER if self.ctx.smoke else BENCH_TEACHER

    @property
    def student_shapes(self) -> dict[str, Any]:
        return SMOKE_STUDENT if self.ctx.smoke else BENCH_STUDENT

    def teacher_dir(self) -> Path:
        if "teacher" not in self._cache:
            self._cache["teacher"] = build_model_dir(self.ctx.workdir / "models" / "teacher", self.teacher_shapes, seed=11)
        return self._cache["teacher"]

    def student_dir(self) -> Path:
        if "student" not in self._cache:
            self._cache["student"] = build_model_dir(self.ctx.workdir / "models" / "student", self.student_shapes, seed=12)
        return self._cache["student"]

    def extract_options(self, out: Path, samples: int, **overrides: Any) -> ExtractOptions:
        """Return options to extract the first ``samples`` embedded problems with the benchmark teacher into a bf16 store."""
        options = dict(
            teacher=str(self.teacher_dir()),
            data=embedded_problems_path("train"),
            out=out,
            heldout_fraction=0.1,
            limit=samples,
            device=self.ctx.device.type,
            store_dtype="bfloat16",
            progress=False,
            force=True,
        )
        options.update(overrides)
        return ExtractOptions(**options)

    def distill_store(self) -> tuple[Path, ExtractResult]:
        """Return (path, extract result) of a store extracted by the benchmark teacher, for the distill benchmarks."""
        if "distill_store" not in self._cache:
            out = self.ctx.workdir / "stores" / "distill"
            if out.exists():
                shutil.rmtree(out)
            samples = SMOKE_DISTILL_STORE_SAMPLES if self.ctx.smoke else DISTILL_STORE_SAMPLES
            result = run_extract(self.extract_options(out, samples, shard_mb=4))
            logger.info("extracted the distill benchmark store: %d samples, %d tokens in %.1f s", result.samples, result.tokens, result.loop_seconds)
            self._cache["distill_store"] = (out, result)
        return self._cache["distill_store"]

    def real_shapes_inputs(self) -> tuple[Path, Path]:
        """Return a random Qwen2.5-14B-shaped store and a random-initialised Qwen2.5-1.5B-shaped student, for GPU runs."""
        if "real_shapes" not in self._cache:
            root = self.ctx.workdir / "real-shapes"
            layout = qwen14b_layout()
            tokenizer = load_tokenizer(str(self.teacher_dir()))
            store = write_random_store(
                root / "store", layout=layout,
                lengths=lengths_for_bytes(REAL_SHAPES_STORE_BYTES, layout.bytes_per_token, 150, 350, seed=3),
                backend="safetensors", shard_bytes=2**30,
                tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer), seed=3,
            )
            student = build_model_dir(root / "student", QWEN25_1_5B, seed=15, vocab_size=QWEN25_1_5B["vocab_size"])
            self._cache["real_shapes"] = (store, student)
        return self._cache["real_shapes"]
