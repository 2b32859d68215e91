"""Stage one: run the teacher once and write its per-layer key/value cache to a store."""

__version__ = "0.1.0"
