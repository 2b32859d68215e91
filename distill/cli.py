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
