"""``python -m bench.run``: run the benchmarks, print the results table and write the report page.

``make bench`` runs everything at full size and rewrites ``docs/benchmarks.md``.
``make bench-smoke`` runs everything at tiny sizes with one pair per figure. It only
checks that each benchmark executes, so it writes its report elsewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench import extraction, memory, online_offline, stall, storage, store_read
from bench.common import BenchContext, Section
from bench.fixtures import Fixtures
from bench.report import compute_ratio_table, environment, load_average, markdown, text_table
from extract.models import resolve_device

REPO = Path(__file__).resolve().parent.parent
BENCHMARKS: dict[str, Callable[[Fixtures], Section]] = {
    "extraction": extraction.run,
    "store_read": store_read.run,
    "stall": stall.run,
    "online": online_offline.run,
    "storage": storage.run,
    "memory": memory.run,
}
FULL_PAIRS = 7
DOCS_PAGE = REPO / "docs" / "benchmarks.md"
# Mean tokens per embedded problem with the template; sets the attention term of the benchmark models.
EMBEDDED_MEAN_TOKENS = 140

logger = logging.getLogger("bench")


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="Tiny sizes, one pair per figure: check that every benchmark runs.")
    parser.add_argument("--only", default="", help=f"Comma-separated benchmarks to run, from: {', '.join(BENCHMARKS)}.")
    parser.add_argument("--pairs", type=int, default=None, help=f"A/B pairs per figure [default: {FULL_PAIRS}, 1 with --smoke].")
    parser.add_argument("--out", type=Path, default=None, help=f"Report file [default: {DOCS_PAGE.relative_to(REPO)} for a full run of all benchmarks, else WORKDIR/benchmarks.md].")
    parser.add_argument("--workdir", type=Path, default=REPO / "build" / "bench", help="Scratch directory for models and stores; emptied at start and removed at the end.")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda.")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads [default: 1 on a CPU, torch's choice with a GPU].")
    parser.add_argument("--profile-dir", type=Path, default=None, help="Profile each benchmark with torch.profiler; write Chrome traces here.")
    args = parser.parse_args(argv)
    unknown = sorted(set(filter(None, args.only.split(","))) - set(BENCHMARKS))
    if unknown:
        parser.error(f"--only {args.only!r}: unknown benchmarks {unknown}; choose from {', '.join(BENCHMARKS)}")
    if args.pairs is not None and args.pairs < 1:
        parser.error(f"--pairs {args.pairs} must be at least 1")
    return args


@contextlib.contextmanager
def _profiled(directory: Path | None, name: str, cuda: bool):
    if directory is None:
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    directory.mkdir(parents=True, exist_ok=True)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as profiler:
        yield
    profiler.export_chrome_trace(str(directory / f"{name}.json"))
    logger.info("profile of %s:\n%s", name, profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("httpx", "transformers", "extract", "distill"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    device = resolve_device(args.device)
    # CPU runs default to one intra-op thread. With two threads on a 2-core machine that
    # other processes also use, step times swung by up to 10x between runs (OpenMP
    # threads waiting for a descheduled partner), which pairing cannot cancel.
    threads = args.threads or (1 if device.type == "cpu" else None)
    if threads:
        torch.set_num_threads(threads)
    selected = [name for name in BENCHMARKS if not args.only or name in args.only.split(",")]
    pairs = args.pairs or (1 if args.smoke else FULL_PAIRS)
    everything = len(selected) == len(BENCHMARKS)
    out = args.out or (DOCS_PAGE if everything and not args.smoke else args.workdir / "benchmarks.md")
    if args.smoke and out.resolve() == DOCS_PAGE.resolve():
        raise SystemExit(f"error: smoke figures do not belong in {DOCS_PAGE}; pass another --out")

    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.mkdir(parents=True)
    ctx = BenchContext(smoke=args.smoke, pairs=pairs, workdir=args.workdir, device=device)
    fixtures = Fixtures(ctx)
    command = shlex.join(["python", "-m", "bench.run", *argv])
    facts = environment(args.workdir, command)
    load_before = load_average()
    started = time.perf_counter()
    sections = []
    try:
        for name in selected:
            logger.info("benchmark %s", name)
            section_started = time.perf_counter()
            with _profiled(args.profile_dir, name, ctx.device.type == "cuda"):
                section = BENCHMARKS[name](fixtures)
            section.seconds = time.perf_counter() - section_started
            sections.append(section)
        ratio_lines = compute_ratio_table(args.smoke, EMBEDDED_MEAN_TOKENS)
    finally:
        shutil.rmtree(args.workdir, ignore_errors=True)
    seconds = time.perf_counter() - started

    print(text_table(sections))
    page = markdown(
        sections=sections, facts=facts, pairs=pairs, smoke=args.smoke, seconds=seconds,
        load_before=load_before, load_after=load_average(), ratio_lines=ratio_lines,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    print(f"bench: {sum(len(s.rows) for s in sections)} figures from {len(sections)} benchmarks in {seconds / 60:.1f} min; report in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
