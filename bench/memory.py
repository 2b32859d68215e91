"""Benchmark 6, memory: peak anonymous memory of ``python -m distill`` on a store and on one 4x larger.

The distill command runs in a child process. Its ``RssAnon`` from /proc/PID/status is
sampled every few milliseconds and the peak kept. RssAnon counts private memory only,
so pages of the mapped store and model files do not count. Both stores hold random K/V in the
benchmark teacher's layout; the larger has 4x the samples, so anything that grows
with the store (sample index, batch order, verification) shows as a difference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import Row, Section, Target, logger, measure_pairs
from bench.fixtures import Fixtures
from bench.models import Shapes
from bench.stores import sample_lengths, write_random_store
from extract.models import load_tokenizer, tokenizer_fingerprint
from extract.store import KVLayout

REPO = Path(__file__).resolve().parent.parent
MIB = 2**20
SAMPLES, SMOKE_SAMPLES = 4000, 200
STEPS, SMOKE_STEPS = 3, 1
ABSOLUTE_ALLOWANCE = 64 * MIB
RELATIVE_ALLOWANCE = 0.10
_POLL_SECONDS = 0.005


def rss_anon(pid: int) -> int:
    """RssAnon of a process in bytes, 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def peak_rss_anon(command: list[str], log: Path) -> int:
    """Run ``command`` and return the peak RssAnon sampled while it ran; raise if it fails.

    The child gets this process's torch thread count, so ``--threads`` applies to it too.
    """
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    with open(log, "w", encoding="utf-8") as output:
        process = subprocess.Popen(command, cwd=REPO, stdout=output, stderr=subprocess.STDOUT, env=env)
        peak = 0
        while process.poll() is None:
            peak = max(peak, rss_anon(process.pid))
            time.sleep(_POLL_SECONDS)
    if process.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-2000:]
        raise RuntimeError(f"{' '.join(command)} exited with {process.returncode}:\n{tail}")
    return peak


def run(fixtures: Fixtures) -> Section:
    ctx = fixtures.ctx
    section = Section("6. Memory: peak RssAnon of distill on a store and a 4x larger one")
    shapes = Shapes.of(fixtures.teacher_shapes)
    layout = KVLayout(layers=tuple(range(shapes.layers)), num_kv_heads=shapes.kv_heads, head_dim=shapes.head_dim, dtype="bfloat16")
    tokenizer = load_tokenizer(str(fixtures.teacher_dir()))
    root = ctx.scratch("memory")
    samples = SMOKE_SAMPLES if ctx.smoke else SAMPLES
    steps = SMOKE_STEPS if ctx.smoke else STEPS
    stores = {}
    for name, count in (("small", samples), ("large", 4 * samples)):
        lengths = sample_lengths(count, 16, 64, seed=6)
        stores[name] = write_random_store(
            root / name, layout=layout, lengths=lengths, backend="safetensors", shard_bytes=64 * MIB,
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer), vocab_size=len(tokenizer), seed=6,
        )
        logger.info("memory benchmark: %s store with %d samples", name, count)
    student = fixtures.student_dir()

    def distill(name: str) -> float:
        command = [
            sys.executable, "-m", "distill", "--store", str(stores[name]), "--student", str(student),
            "--steps", str(steps), "--log-every", str(steps), "--eval-samples", "4", "--out", str(root / f"run-{name}"),
            "--overwrite", "--device", "cpu", "--no-progress", "--num-workers", "1",
        ]
        return peak_rss_anon(command, root / f"{name}.log") / MIB

    paired = measure_pairs(lambda: distill("large"), lambda: distill("small"), ctx.pairs, label="memory")
    allowance = max(RELATIVE_ALLOWANCE, ABSOLUTE_ALLOWANCE / MIB / paired.median_b)
    section.rows.append(
        Row(
            benchmark="6 memory",
            case=f"{samples} vs {4 * samples} samples, cpu, {steps} steps",
            measured=f"{paired.median_a:,.0f} MiB peak RssAnon, 4x store",
            reference=f"{paired.median_b:,.0f} MiB, 1x store",
            paired=paired,
            target=Target("<=", round(1 + allowance, 3)),
            note=f"difference {paired.median_a - paired.median_b:+.0f} MiB; allowed max(10%, 64 MiB)",
            limit=(
                "memory that grows with the store: the reader keeps one SampleRef per sample and the sampler "
                "one permutation of the training samples per epoch, in the training process"
            ),
        )
    )
    section.facts.append(
        f"stores: samples of 16-64 tokens, {layout.bytes_per_token} bytes per token; distill with the benchmark student, "
        f"batch 4, 1 reader thread, store verification on; RssAnon sampled every {_POLL_SECONDS * 1e3:.0f} ms"
    )
    shutil.rmtree(root)
    return section
