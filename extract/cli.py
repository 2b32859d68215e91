"""``python -m extract``: run the teacher once and write its KV cache; inspect and verify stores."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click
from tqdm.auto import tqdm

from extract import __version__
from extract.cli_support import DefaultGroup, configure_logging, run_command
from extract.data import BAD_ROW_POLICIES, LONG_SAMPLE_POLICIES
from extract.embedded import EMBEDDED_TEACHER, repo_data_dir
from extract.models import ATTN_IMPLEMENTATIONS, COMPUTE_DTYPES
from extract.store import BACKENDS, STORE_DTYPES, KVLayout, open_store, read_manifest
from extract.store.verify import verify_store

_EMBEDDED_DATA = "data/gsm8k-mini/train.jsonl"


def _default_data() -> str:
    return str(repo_data_dir() / "gsm8k-mini" / "train.jsonl")


@click.group(cls=DefaultGroup, default_command="run", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mercator-extract")
def main() -> None:
    """Extract a teacher's per-layer key/value cache into a sharded store.

    Without a subcommand, runs `run`. Rerunning the same command on the same --out
    resumes an interrupted extraction and skips finished shards.
    """


@main.command("run")
@click.option("--teacher", default=EMBEDDED_TEACHER, show_default=True, help="Teacher checkpoint: a local directory, a hub id, or 'embedded-teacher' (the tiny built-in model).")
@click.option("--data", "data", type=click.Path(path_type=Path), default=None, help=f"Input JSONL: GSM8K rows (question, answer) or rows with a 'text' field. [default: {_EMBEDDED_DATA}]")
@click.option("--heldout", type=click.Path(path_type=Path), default=None, help="Held-out JSONL stored beside the training rows; without it, --heldout-fraction of --data is held out.")
@click.option("--heldout-fraction", type=click.FloatRange(0.0, 1.0, max_open=True), default=0.05, show_default=True, help="Fraction of --data rows held out (seeded draw) when --heldout is not given.")
@click.option("--split-seed", type=int, default=0, show_default=True, help="Seed of the held-out draw.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Store directory to create or resume.")
@click.option("--format", "backend", type=click.Choice(list(BACKENDS)), default="safetensors", show_default=True, help="Shard file format.")
@click.option("--dtype", "store_dtype", type=click.Choice(["auto", *STORE_DTYPES]), default="auto", show_default=True, help="Stored dtype; auto stores the teacher's compute dtype.")
@click.option("--compute-dtype", type=click.Choice(["auto", *COMPUTE_DTYPES]), default="auto", show_default=True, help="Teacher dtype; auto is bfloat16 on CUDA and float32 on CPU.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--max-length", type=click.IntRange(1, 1 << 20), default=512, show_default=True, help="Maximum tokens per sample, EOS included.")
@click.option("--on-long", type=click.Choice(LONG_SAMPLE_POLICIES), default="truncate", show_default=True, help="What to do with samples longer than --max-length.")
@click.option("--strip-annotations", is_flag=True, help="Remove GSM8K calculator annotations <<...>> from answers.")
@click.option("--append-eos/--no-append-eos", default=True, show_default=True, help="End every sample with the tokenizer's EOS token.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N rows of --data.")
@click.option("--layers", default="all", show_default=True, help="Teacher layers to store: all, a list (0,2,4) or a range (0-11).")
@click.option("--batch-tokens", type=click.IntRange(1), default=8192, show_default=True, help="Padded tokens per teacher batch.")
@click.option("--max-batch-size", type=click.IntRange(1), default=32, show_default=True, help="Samples per teacher batch at most.")
@click.option("--shard-mb", type=click.FloatRange(0.001), default=1024.0, show_default=True, help="Target shard size in MiB; a shard always holds whole samples.")
@click.option("--attn-implementation", type=click.Choice(ATTN_IMPLEMENTATIONS), default="sdpa", show_default=True, help="Attention kernel (FlashAttention-2 rejects right padding with the cache on).")
@click.option("--trust-remote-code", is_flag=True, help="Allow a checkpoint's own modelling code to run.")
@click.option("--skip-bad-rows", is_flag=True, help="Skip and count unreadable input rows instead of stopping at the first.")
@click.option("--force", is_flag=True, help="Write even when the planned size exceeds the free disk space.")
@click.option(
    "--topk-logprobs",
    type=click.IntRange(0),
    default=0,
    show_default=True,
    help="Also store, per token, the teacher's K most likely next tokens: int32 ids and float32 log-probabilities "
    "(log_softmax of the float32 logits). Costs 8*K bytes per token on disk (K=20: 160 bytes) and, while "
    "extracting, about 0.5 GiB more memory on the teacher's device, because the LM head runs on chunks of real "
    "tokens whose float32 logits take 256 MiB. 0 stores none.",
)
@click.option("--zarr-chunk-tokens", type=click.IntRange(1), default=128, show_default=True, help="Tokens per Zarr chunk (zarr format only).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and errors only.")
def run(verbose: int, quiet: bool, no_progress: bool, skip_bad_rows: bool, data: Path | None, **kwargs: object) -> None:
    """Run the teacher over the data and write its KV cache to --out."""
    configure_logging(verbose, quiet)

    def body() -> None:
        from extract.pipeline import ExtractOptions, run_extract

        options = ExtractOptions(
            data=data or Path(_default_data()),
            progress=not no_progress and not quiet,
            on_bad_row="skip" if skip_bad_rows else "error",
            **kwargs,  # type: ignore[arg-type]
        )
        result = run_extract(options)
        totals = result.manifest.totals()
        notes = []
        if result.shards_resumed:
            notes.append(f"{result.shards_resumed} shards resumed")
        if result.truncated:
            notes.append(f"{result.truncated} samples truncated at --max-length {options.max_length}")
        if result.skipped:
            notes.append("skipped rows: " + ", ".join(f"{count} {reason}" for reason, count in result.skipped.items()))
        click.echo(
            f"extract: {options.out} holds {totals['samples']} samples ({totals['train_samples']} train, "
            f"{totals['heldout_samples']} held-out), {totals['tokens']} tokens, {totals['bytes'] / 1e6:.1f} MB "
            f"in {totals['shards']} shards; {result.tokens} tokens extracted in {result.seconds:.1f} s"
            + (f"; {'; '.join(notes)}" if notes else "")
        )

    run_command(body)


@main.command("info")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info(store: Path, as_json: bool) -> None:
    """Summarise a store: teacher, layout, data, shards and totals."""
    configure_logging(0, True)

    def body() -> None:
        manifest = read_manifest(store)
        if as_json:
            click.echo(json.dumps(manifest.to_json(), indent=2))
            return
        totals = manifest.totals()
        layout = manifest.layout
        teacher = manifest.teacher
        state = "complete" if manifest.complete else f"INCOMPLETE ({len(manifest.shards)} of {manifest.planned_shards} shards)"
        lines = [
            f"store        {store} (format v{manifest.format_version}, {manifest.backend}, {state})",
            f"teacher      {teacher.get('name_or_path')} [{teacher.get('model_type')}, {teacher.get('num_hidden_layers')} layers, "
            f"{teacher.get('num_key_value_heads')} KV heads x {teacher.get('head_dim')}, {teacher.get('identity', {}).get('kind')} "
            f"{str(teacher.get('identity', {}).get('value'))[:16]}]",
            f"kv           layers {_layer_summary(layout.layers)}, {layout.dtype}, keys {layout.key_position}, "
            f"{layout.kv_bytes_per_token} bytes per token",
            f"extras       {_extras_summary(layout)}",
            f"tokenizer    {manifest.tokenizer.get('fingerprint', '')[:23]} ({manifest.tokenizer.get('size')} tokens)",
            f"data         {', '.join(s['path'] for s in manifest.dataset.get('sources', []))}; max_length "
            f"{manifest.dataset.get('max_length')}, {manifest.dataset.get('samples_truncated')} truncated",
            f"samples      {totals['samples']} ({totals['train_samples']} train, {totals['heldout_samples']} held-out)",
            f"tokens       {totals['tokens']}",
            f"size         {totals['bytes'] / 1e6:.1f} MB in {totals['shards']} shards",
            f"created      {manifest.created} by mercator-kv {manifest.package_version}",
        ]
        click.echo("\n".join(lines))

    run_command(body)


def _extras_summary(layout: KVLayout) -> str:
    topk = f"teacher top-{layout.topk} log-probabilities, {layout.topk_bytes_per_token} bytes per token" if layout.topk else "no teacher top-k"
    answers = "answer starts" if layout.answer_starts else "no answer starts (every token counts as an answer token)"
    return f"{topk}; {answers}; {layout.bytes_per_token} bytes per token in all"


def _layer_summary(layers: tuple[int, ...]) -> str:
    if list(layers) == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


@main.command("verify")
@click.argument("store", type=click.Path(path_type=Path))
@click.option("--no-values", is_flag=True, help="Skip the NaN/Inf scan of the stored values.")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
def verify(store: Path, no_values: bool, no_progress: bool) -> None:
    """Re-check every shard's checksum, shapes and values; exit 1 on any fault."""
    configure_logging(0, True)

    def body() -> None:
        total = None
        try:
            total = read_manifest(store).totals()["bytes"]
        except Exception:  # verify_store reports the manifest fault itself
            pass
        with tqdm(total=total, unit="B", unit_scale=True, desc="verify", disable=no_progress or total is None) as bar:
            report = verify_store(store, check_values=not no_values, progress=bar.update)
        for problem in report.problems:
            click.echo(f"FAULT: {problem}")
        status = "OK" if report.ok else f"{len(report.problems)} faults"
        click.echo(
            f"verify: {store}: {status}; {report.shards_checked} shards, {report.samples_checked} samples, "
            f"{report.bytes_checked / 1e6:.1f} MB checked"
        )
        if not report.ok:
            sys.exit(1)

    run_command(body)


__all__ = ["main", "open_store"]
