"""Benchmark 3, distill input stall: training steps fed from the store against the same batches in RAM.

Streamed: the training loader reads ahead in its background thread, from a store whose
pages were evicted first (cold), as in a run over a store far larger than memory. In
RAM: the same batches (same seed) read beforehand into a list. The ratio of seconds
per step is the stall the store adds.
"""

from __future__ import annotations

import gc

import torch

from bench.common import Row, Section, Target, drop_page_cache, files_under, measure_pairs, resident_fraction
from bench.fixtures import Fixtures
from bench.training import StepTimer

STALL_LIMIT = (
    "the reader thread needs CPU time for each batch (pread, page faults, zero-filled padding), which on a "
    "2-core machine the training step would otherwise use; when reads take longer than a step, the step waits."
)
WARMUP_STEPS = 2
TIMED_STEPS = 8
SMOKE_TIMED_STEPS = 2


def paired_stall(fixtures: Fixtures, timer: StepTimer, label: str, timed: int) -> tuple:
    files = files_under([timer.recipe.store.path / "shards"])
    cached: list[float] = []
    pair = [0]

    def streamed() -> float:
        drop_page_cache(files)
        cached.append(resident_fraction(files))
        return timer.seconds_per_step(timer.loader(WARMUP_STEPS + timed, seed=pair[0], background=True), WARMUP_STEPS)

    def in_ram() -> float:
        batches = list(timer.loader(WARMUP_STEPS + timed, seed=pair[0], background=False))
        seconds = timer.seconds_per_step(batches, WARMUP_STEPS)
        pair[0] += 1
        return seconds

    paired = measure_pairs(streamed, in_ram, fixtures.ctx.pairs, label=f"stall {label}")
    return paired, max(cached)


def run(fixtures: Fixtures) -> Section:
    ctx = fixtures.ctx
    section = Section("3. Distill input stall: batches streamed from the store vs already in RAM")
    store, _ = fixtures.distill_store()
    timer = StepTimer(ctx, store, fixtures.student_dir(), "stall")
    timed = SMOKE_TIMED_STEPS if ctx.smoke else TIMED_STEPS
    paired, cached = paired_stall(fixtures, timer, "benchmark models", timed)
    timer.close()
    name = "smoke models" if ctx.smoke else "benchmark teacher store, benchmark student"
    section.rows.append(
        Row(
            benchmark="3 input stall",
            case=f"{name}, {ctx.device.type}, cold store ({cached:.0%} cached)",
            measured=f"{paired.median_a * 1e3:.0f} ms/step streamed",
            reference=f"{paired.median_b * 1e3:.0f} ms/step in RAM",
            paired=paired,
            target=Target("<=", 1.05 if ctx.device.type == "cuda" else 1.15),
            limit=STALL_LIMIT,
        )
    )
    section.facts.append(f"{WARMUP_STEPS} untimed then {timed} timed steps per side, batch 4, store pages evicted before each streamed side")
    if ctx.device.type == "cuda" and not ctx.smoke:
        section.rows.append(_real_shapes_row(fixtures))
    return section


def _real_shapes_row(fixtures: Fixtures) -> Row:
    """Time a random Qwen2.5-14B-shaped store feeding a random-initialised Qwen2.5-1.5B-shaped student on the GPU."""
    # NOTE: written for CUDA machines but not yet run on one.
    store, student = fixtures.real_shapes_inputs()
    timer = StepTimer(fixtures.ctx, store, student, "stall-real")
    try:
        paired, cached = paired_stall(fixtures, timer, "real shapes", TIMED_STEPS)
    finally:
        timer.close()
        del timer
        gc.collect()
        torch.cuda.empty_cache()
    return Row(
        benchmark="3 input stall",
        case=f"Qwen2.5-14B-shaped random store, Qwen2.5-1.5B shapes (random init), cuda, cold ({cached:.0%} cached)",
        measured=f"{paired.median_a * 1e3:.0f} ms/step streamed",
        reference=f"{paired.median_b * 1e3:.0f} ms/step in RAM",
        paired=paired,
        target=Target("<=", 1.05),
        limit=STALL_LIMIT,
    )
