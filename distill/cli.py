"""``python -m distill``: train a student from a KV store."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import click

from distill.config import CONFIG_DIR, DistillConfig, load_config
from extract import __version__
from extract.cli_support import DefaultGroup, configure_logging, run_command


def config_options(function: Any) -> Any:
    """Add one command-line option per ``DistillConfig`` field; unset options leave the YAML value."""
    for f in reversed(dataclasses.fields(DistillConfig)):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"{f.metadata['help']} [default: {f.default}]"
        if f.type in ("bool", bool):
            option = click.option(f"{flag}/--no-{f.name.replace('_', '-')}", f.name, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            choices = f.metadata.get("choices")
            option = click.option(flag, f.name, type=click.Choice(choices) if choices else kind, default=None, help=help_text)
        function = option(function)
    return function


@click.group(cls=DefaultGroup, default_command="train", context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mercator-distill")
def main() -> None:
    """Train a student from a teacher's cached KV through the projector and the Mercator loss.

    Without a subcommand, runs `train`. The store is only read, so any number of runs
    can share it.
    """


@main.command("train")
@click.option("--config", "config_path", type=click.Path(path_type=Path), default=None, help="YAML file of config keys (the option names with underscores); options given here override it.")
@config_options
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and the final summary only.")
def train(config_path: Path | None, no_progress: bool, verbose: int, quiet: bool, **overrides: Any) -> None:
    """Train a student on a store; write the student, projector, metrics and record to --out."""
    configure_logging(verbose, quiet)

    def body() -> None:
        from distill.recipe import DistillRecipe

        config = load_config(config_path, overrides)
        recipe = DistillRecipe(config, progress=not no_progress and not quiet)
        recipe.setup()
        recipe.train()
        record = recipe.save()
        final = record["results"]["final"]
        if final:
            click.echo(
                f"held-out: raw {final['raw_cos']:.4f} centred {final['centred_cos']:.4f} "
                f"baseline {final['baseline_cos']:.4f} ({record['results']['label']})"
            )
        for note in record["notes"]:
            click.echo(f"note: {note}")
        click.echo(f"distill: {config.steps} steps in {record['training']['seconds']:.1f} s; outputs in {config.out}")

    run_command(body)


@main.command("configs")
def list_configs() -> None:
    """List the shipped YAML configs."""
    for path in sorted(CONFIG_DIR.glob("*.yaml")):
        click.echo(str(path))


def sweep_config_options(function: Any) -> Any:
    """Add the config options of ``train`` except those the sweep sets for each run itself."""
    function = config_options(function)
    function.__click_params__ = [p for p in function.__click_params__ if p.name not in ("out", "name", "overwrite")]
    return function


@main.command("sweep")
@click.argument("grid", type=click.Path(path_type=Path))
@click.option("--out", "out_dir", type=click.Path(path_type=Path), default=None, help="Folder for the runs, sweep.md and sweep.png [default: runs/<grid file name without .yaml>].")
@sweep_config_options
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and the final summary only.")
def sweep(grid: Path, out_dir: Path | None, no_progress: bool, verbose: int, quiet: bool, **options: Any) -> None:
    """Train every run of a GRID file on one store, in sequence; write OUT/sweep.md and OUT/sweep.png.

    Config options given here apply to every run. Finished runs with an unchanged
    config are skipped. The exit code is 1 when a run failed.
    """
    configure_logging(verbose, quiet)

    def body() -> int:
        from distill.sweep import run_sweep

        target = out_dir if out_dir is not None else Path("runs") / grid.stem
        outcomes = run_sweep(grid, target, options, progress=not no_progress and not quiet)
        click.echo((target / "sweep.md").read_text(encoding="utf-8"), nl=False)
        counts = {status: sum(1 for o in outcomes if o.status == status) for status in ("ran", "skipped", "failed")}
        click.echo(
            f"sweep: {len(outcomes)} runs ({counts['ran']} ran, {counts['skipped']} skipped, {counts['failed']} failed); "
            f"table in {target / 'sweep.md'}"
        )
        return 1 if counts["failed"] else 0

    raise SystemExit(run_command(body))


@main.command("eval")
@click.argument("run_dir", type=click.Path(path_type=Path))
@click.option("--store", default=None, help="KV store to evaluate on [default: the run's store from its config.yaml].")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N [default: the run's device].")
@click.option("--eval-samples", type=int, default=None, help="Held-out samples to evaluate, 0 = all [default: the run's eval_samples].")
@click.option("--batch-size", type=int, default=None, help="Samples per evaluation batch [default: the run's batch_size].")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="JSON file for the figures [default: RUN_DIR/eval.json].")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and the final summary only.")
def evaluate(run_dir: Path, store: str | None, device: str | None, eval_samples: int | None, batch_size: int | None,
             out: Path | None, no_progress: bool, verbose: int, quiet: bool) -> None:
    """Measure held-out KV alignment of a finished run, per layer and per KV head; write RUN_DIR/eval.json."""
    configure_logging(verbose, quiet)

    def body() -> None:
        from distill.eval import EVAL_FILE, evaluate_run, heldout_line

        target = out if out is not None else run_dir / EVAL_FILE
        report = evaluate_run(
            run_dir, store=store, device=device, eval_samples=eval_samples, batch_size=batch_size, out=target,
            progress=not no_progress and not quiet,
        )
        click.echo(heldout_line(report))
        if report["collapse_warning"]:
            click.echo(f"note: {report['collapse_warning']}")
        click.echo(f"eval: {report['samples']} held-out samples, {report['tokens']} tokens; figures in {target}")

    run_command(body)


@main.command("eval-gsm8k")
@click.option("--student", required=True, help="A run directory (its student/ is used), a checkpoint directory, a hub id or embedded-student.")
@click.option("--data", type=click.Path(path_type=Path), required=True, help="GSM8K JSONL file: 'question' and an 'answer' ending in '#### N'.")
@click.option("--limit", type=int, default=None, help="Score only the first N questions.")
@click.option("--max-new-tokens", type=int, default=256, show_default=True, help="Maximum tokens generated per question.")
@click.option("--batch-size", type=int, default=16, show_default=True, help="Questions decoded together (left-padded).")
@click.option("--out", type=click.Path(path_type=Path), default=None, help="Per-question JSONL [default: RUN/gsm8k-preds.jsonl for a run directory, else ./gsm8k-preds.jsonl].")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True, help="Weights dtype; auto is bf16 on a GPU and fp32 on a CPU.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.option("-q", "--quiet", is_flag=True, help="Warnings and the final summary only.")
def eval_gsm8k(student: str, data: Path, limit: int | None, max_new_tokens: int, batch_size: int, out: Path | None,
               device: str, dtype: str, no_progress: bool, verbose: int, quiet: bool) -> None:
    """Greedy-decode GSM8K questions in the training prompt format; report strict and flexible accuracy."""
    configure_logging(verbose, quiet)

    def body() -> None:
        from distill.eval import evaluate_gsm8k, summary_path
        from distill.gsm8k import format_summary

        target = out
        if target is None:
            folder = Path(student) if (Path(student) / "student").is_dir() else Path(".")
            target = folder / "gsm8k-preds.jsonl"
        summary = evaluate_gsm8k(
            student, data, out=target, limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size,
            device=device, dtype=dtype, progress=not no_progress and not quiet,
        )
        click.echo(f"gsm8k: {format_summary(summary)}")
        click.echo(f"eval-gsm8k: predictions in {target}, summary in {summary_path(target)}")

    run_command(body)
