"""Errors that the command-line tools print as one line, without a traceback."""


class UserError(Exception):
    """A bad input, option or environment: the message says what, which value and what to do."""


class StoreError(UserError):
    """A store that is missing, damaged, incomplete or written by an incompatible configuration."""


class DataError(UserError):
    """An input data file that cannot be read as the requested format."""
