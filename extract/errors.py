"""Errors that the command-line tools print as one line, without a traceback."""

from pathlib import Path


class UserError(Exception):
    """A bad input, option or environment: the message says what, which value and what to do."""


class StoreError(UserError):
    """A store that is missing, damaged, incomplete or written by an incompatible configuration."""


class DataError(UserError):
    """An input data file that cannot be read as the requested format."""


def check_output_directory(out: Path) -> None:
    """Raise ``UserError`` when ``--out`` is a file or lies inside one, before any work starts."""
    for path in (out, *out.parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(f"--out {out}: {path} is a file, not a directory; choose a new or empty directory")
            return
