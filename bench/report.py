"""The benchmark report: machine and library facts, the results table, and the Markdown page."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import os
import platform
import shutil
from pathlib import Path

import torch

from bench.common import Row, Section
from bench.models import (
    BENCH_STUDENT, BENCH_TEACHER, QWEN25_1_5B, QWEN25_14B, REAL_MEAN_TOKENS, SMOKE_STUDENT, SMOKE_TEACHER,
    Shapes, qwen2_config, student_flops_per_byte, teacher_flops_per_byte,
)

LIBRARIES = ("torch", "transformers", "safetensors", "zarr", "numcodecs", "numpy", "tokenizers")
PROFILE_COMMANDS = """\
Where a target is missed, profile the benchmark alone. py-spy samples Python and native
frames without changing the code (`pip install py-spy` into the environment first):

```
.venv/bin/py-spy record --native -o store-read.svg -- .venv/bin/python -m bench.run --only store_read --pairs 1
.venv/bin/py-spy top -- .venv/bin/python -m bench.run --only stall --pairs 1
```

`--profile-dir DIR` wraps each selected benchmark in `torch.profiler` and writes a
Chrome trace per benchmark plus the top operators to the log:

```
.venv/bin/python -m bench.run --only online --pairs 1 --profile-dir build/profiles
```
"""


def environment(workdir: Path, command: str) -> list[tuple[str, str]]:
    """(name, value) facts about this machine and run, for the report header."""
    facts = [("command", f"`{command}`"), ("date (UTC)", _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M"))]
    facts.append(("CPU", f"{_cpu_model()}, {os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable)"))
    facts.append(("RAM", f"{_mem_total_gib():.1f} GiB"))
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        facts.append(("GPU", f"{properties.name}, {properties.total_memory / 2**30:.0f} GiB, CUDA {torch.version.cuda}"))
    else:
        facts.append(("GPU", "none"))
    facts.append(("disk", f"{workdir} ({shutil.disk_usage(workdir).free / 2**30:.0f} GiB free at start)"))
    facts.append(("Python", platform.python_version()))
    facts.append(("libraries", ", ".join(f"{name} {importlib.metadata.version(name)}" for name in LIBRARIES)))
    facts.append(("torch threads", str(torch.get_num_threads())))
    return facts


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total_gib() -> float:
    with open("/proc/meminfo", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    return 0.0


def counted_forward_flops(shapes: dict, tokens: int) -> float:
    """Forward FLOP per token of the decoder stack as ``torch.utils.flop_counter`` counts it.

    The count runs on the meta device (no memory, no arithmetic) on a copy with two
    layers, scaled to the full depth: every decoder layer has the same shapes.
    """
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import Qwen2ForCausalLM

    counted_layers = min(2, shapes["num_hidden_layers"])
    with torch.device("meta"):
        model = Qwen2ForCausalLM(qwen2_config(dict(shapes, num_hidden_layers=counted_layers), shapes.get("vocab_size", 1024)))
        input_ids = torch.zeros((1, tokens), dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.model(input_ids=input_ids, use_cache=True)
    return counter.get_total_flops() / tokens * shapes["num_hidden_layers"] / counted_layers


def compute_ratio_table(smoke: bool, bench_tokens: float) -> list[str]:
    """Markdown rows: each model's forward FLOP per token and FLOP per stored (or consumed) KV byte."""
    teacher, student = (SMOKE_TEACHER, SMOKE_STUDENT) if smoke else (BENCH_TEACHER, BENCH_STUDENT)
    prefix = "smoke" if smoke else "benchmark"
    real_t, real_s, bench_t, bench_s = (Shapes.of(c) for c in (QWEN25_14B, QWEN25_1_5B, teacher, student))
    lines = [
        "| model | role | forward GFLOP/token (formula) | counted by torch | KV bytes/token (bf16) | FLOP per KV byte |",
        "|---|---|---|---|---|---|",
    ]
    entries = (
        ("Qwen2.5-14B", "teacher", QWEN25_14B, real_t, REAL_MEAN_TOKENS, teacher_flops_per_byte(real_t, REAL_MEAN_TOKENS), real_t),
        (f"{prefix} teacher", "teacher", teacher, bench_t, bench_tokens, teacher_flops_per_byte(bench_t, bench_tokens), bench_t),
        ("Qwen2.5-1.5B", "student on the 14B store", QWEN25_1_5B, real_s, REAL_MEAN_TOKENS, student_flops_per_byte(real_t, real_s, REAL_MEAN_TOKENS), real_t),
        (f"{prefix} student", f"student on the {prefix} store", student, bench_s, bench_tokens, student_flops_per_byte(bench_t, bench_s, bench_tokens), bench_t),
    )
    for name, role, config, shapes, tokens, ratio, kv_source in entries:
        tokens = max(1, round(tokens))
        formula = shapes.forward_flops_per_token(tokens) / 1e9
        counted = counted_forward_flops(config, tokens) / 1e9
        lines.append(
            f"| {name} | {role} | {formula:.4g} | {counted:.4g} | {kv_source.kv_bytes_per_token():,} | {ratio:.3g} |"
        )
    return lines


def shapes_line(name: str, config: dict) -> str:
    keys = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim")
    return f"- {name}: " + ", ".join(f"{key} {config[key]}" for key in keys)


def text_table(sections: list[Section]) -> str:
    """Format the results as a fixed-width table for the terminal."""
    rows = [("benchmark", "case", "measured", "reference", "ratio median [min, max]", "target", "result")]
    for section in sections:
        for row in section.rows:
            rows.append((row.benchmark, row.case, row.measured, row.reference, row.ratio, str(row.target or "-"), row.verdict))
    widths = [min(60, max(len(r[i]) for r in rows)) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell[:60].ljust(width) for cell, width in zip(row, widths)) for row in rows)


def _markdown_row(row: Row) -> str:
    cells = (row.benchmark, row.case, row.measured, row.reference, row.ratio, str(row.target or "-"), row.verdict, row.note)
    return "| " + " | ".join(cell.replace("|", "/") for cell in cells) + " |"


def markdown(
    *, sections: list[Section], facts: list[tuple[str, str]], pairs: int, smoke: bool, seconds: float,
    load_before: str, load_after: str, ratio_lines: list[str],
) -> str:
    teacher, student = (SMOKE_TEACHER, SMOKE_STUDENT) if smoke else (BENCH_TEACHER, BENCH_STUDENT)
    out = ["# Benchmarks", ""]
    out.append(
        "Written by `make bench` (`python -m bench.run`) from its own measurements; every figure below "
        "comes from that run, none is typed by hand. Rerun it to refresh the page."
    )
    if smoke:
        out += ["", "**Smoke mode**: tiny sizes and one pair per figure; the figures only show that each benchmark runs."]
    out += ["", "## Method", ""]
    out.append(
        f"Each figure is a ratio of two sides measured in the same run: the measured side (A) and a reference (B). "
        f"The sides alternate, A B A B ..., for {pairs} pairs, and the table gives the median of the {pairs} paired "
        "ratios with the minimum and maximum in brackets. Throughput ratios are A/B (higher is better); time and "
        "memory ratios are A/B too (lower is better). A target applies to the median. On a CPU, torch runs "
        "with one intra-op thread unless `--threads` says otherwise: with two threads on a machine shared "
        "with other processes, step times swung by up to 10x, which pairing cannot cancel."
    )
    out += ["", "## Machine and run", ""]
    out += [f"- {name}: {value}" for name, value in facts]
    out.append(f"- load average (1/5/15 min) at start: {load_before}; at end: {load_after}")
    out.append(f"- wall time of the whole run: {seconds / 60:.1f} min")
    out += ["", "## Models and compute per stored byte", ""]
    out.append(
        "The CPU benchmarks cannot run the real models, so they use random-initialised Qwen2 models built "
        "from configs whose compute per KV byte is close to the real pair's. Forward FLOP per token covers the "
        "decoder layers (extraction and the student loss use the base model without the LM head); the "
        "formula counts causal attention, torch's counter counts the full attention square. Student FLOP per "
        "byte is training (3x forward, projector included) per teacher KV byte consumed."
    )
    out += [""] + ratio_lines + [""]
    out += [shapes_line("benchmark teacher", teacher), shapes_line("benchmark student", student)]
    out.append(shapes_line("Qwen2.5-14B", QWEN25_14B))
    out.append(shapes_line("Qwen2.5-1.5B", QWEN25_1_5B))
    out += ["", "## Results", ""]
    out.append("| benchmark | case | measured (A, median) | reference (B, median) | ratio A/B median [min, max] | target | result | note |")
    out.append("|---|---|---|---|---|---|---|---|")
    for section in sections:
        out += [_markdown_row(row) for row in section.rows]
    for section in sections:
        out += ["", f"### {section.title}", ""]
        out += [f"- {fact}" for fact in section.facts]
        out.append(f"- benchmark wall time: {section.seconds:.0f} s")
    missed = [row for section in sections for row in section.rows if row.verdict == "MISSED"]
    out += ["", "## Targets missed", ""]
    if missed:
        for row in missed:
            out.append(f"- {row.benchmark}, {row.case}: {row.ratio} against the target {row.target}.")
            out.append(f"  What limits it: {row.limit or 'not profiled yet.'}")
    else:
        out.append("None in this run.")
    out += ["", "## Profiling", "", PROFILE_COMMANDS]
    return "\n".join(out).rstrip() + "\n"
