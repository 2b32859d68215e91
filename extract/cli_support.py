"""Command-line plumbing shared by both stages: a default subcommand, logging, one-line errors."""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable
from typing import Any

import click

from extract.errors import UserError


class DefaultGroup(click.Group):
    """A group whose first argument may be an option of its default command.

    ``python -m extract --teacher X`` runs ``python -m extract run --teacher X``, while
    ``python -m extract info STORE`` still reaches ``info``.
    """

    def __init__(self, *args: Any, default_command: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.default_command = default_command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h", "--version")):
            args = [self.default_command, *args]
        return super().parse_args(ctx, args)


def configure_logging(verbose: int, quiet: bool) -> None:
    """INFO lines to stderr by default; ``-v`` adds DEBUG, ``--quiet`` keeps warnings only."""
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)
    if not verbose:
        # Library chatter that says nothing about this tool's work.
        for name in ("transformers", "httpx", "huggingface_hub", "urllib3", "filelock"):
            logging.getLogger(name).setLevel(logging.ERROR)
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*past_key_values.*")
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def run_command(function: Callable[[], Any]) -> Any:
    """Run a command body; print a bad input as one ``error:`` line and exit 2, never a traceback."""
    try:
        return function()
    except UserError as exc:
        click.echo(f"error: {_user_message(exc)}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted; finished shards and checkpoints are kept, rerun the same command to resume", err=True)
        sys.exit(130)
    except OSError as exc:
        # Disk full, permission denied, read-only filesystem: environment faults, not bugs.
        target = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        click.echo(f"error: {exc.strerror or exc}{target}; completed work is kept, fix the cause and rerun", err=True)
        sys.exit(1)


def _user_message(exc: UserError) -> str:
    """Return the message of ``exc``, unwrapping one that a DataLoader worker raised.

    torch re-raises a worker's exception in the main process as the same type with the
    message "Caught <type> in DataLoader worker process N. Original Traceback ...", whose
    last matching line is "<module>.<type>: <original message>".
    """
    text = str(exc)
    if "\n" not in text:
        return text
    logging.getLogger(__name__).debug("%s", text)
    prefix = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    for line in reversed(text.splitlines()):
        if line.startswith(prefix):
            return line[len(prefix) :]
    return text
