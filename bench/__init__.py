"""Benchmarks of the pipeline: ``python -m bench.run`` (``make bench``) runs them all.

Every figure is a ratio against a reference measured in the same run, with the two sides
alternated, so machine noise shifts both sides alike. ``docs/benchmarks.md`` is written
from the output of a full run.
"""
