"""Pieces every benchmark uses: paired measurements, result rows, page-cache control."""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import mmap
import os
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch

logger = logging.getLogger("bench")


@dataclass
class Paired:
    """Ratios of side A to side B, one per A/B pair, with the raw values of both sides."""

    a: list[float] = field(default_factory=list)
    b: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.ratios)

    @property
    def low(self) -> float:
        return min(self.ratios)

    @property
    def high(self) -> float:
        return max(self.ratios)

    @property
    def median_a(self) -> float:
        return statistics.median(self.a)

    @property
    def median_b(self) -> float:
        return statistics.median(self.b)

    def describe(self, digits: int = 3) -> str:
        return f"{self.median:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def measure_pairs(
    side_a: Callable[[], float],
    side_b: Callable[[], float],
    pairs: int,
    *,
    ratio: Callable[[float, float], float] = lambda a, b: a / b,
    label: str = "",
) -> Paired:
    """Run A, B, A, B, ... ``pairs`` times each and return the paired ratios.

    Alternating the sides spreads slow and fast moments of a noisy machine over both,
    so the median ratio is steadier than either side's median alone.
    """
    result = Paired()
    for pair in range(pairs):
        a = side_a()
        b = side_b()
        result.a.append(a)
        result.b.append(b)
        result.ratios.append(ratio(a, b))
        logger.info("%s pair %d/%d: A %.4g  B %.4g  ratio %.3f", label, pair + 1, pairs, a, b, result.ratios[-1])
    return result


@dataclass
class Target:
    """A pass condition on a ratio: ``ratio >= value`` or ``ratio <= value``."""

    op: str
    value: float

    def met(self, ratio: float) -> bool:
        return ratio >= self.value if self.op == ">=" else ratio <= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclass
class Row:
    """One line of the results table: a measured side, its reference, and their paired ratio."""

    benchmark: str
    case: str
    measured: str
    reference: str
    paired: Paired | None = None
    target: Target | None = None
    note: str = ""
    ratio_text: str = ""
    # What limits the figure, as profiling found it; the report prints it when the target is missed.
    limit: str = ""

    @property
    def ratio(self) -> str:
        if self.ratio_text:
            return self.ratio_text
        return self.paired.describe() if self.paired else "-"

    @property
    def verdict(self) -> str:
        if self.target is None or self.paired is None:
            return "-"
        return "met" if self.target.met(self.paired.median) else "MISSED"


@dataclass
class Section:
    """A benchmark's rows plus the facts a reader needs to interpret them."""

    title: str
    rows: list[Row] = field(default_factory=list)
    facts: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class BenchContext:
    """Settings shared by all benchmarks of one invocation."""

    smoke: bool
    pairs: int
    workdir: Path
    device: torch.device

    def scratch(self, name: str) -> Path:
        path = self.workdir / name
        path.mkdir(parents=True, exist_ok=True)
        return path


# ----------------------------------------------------------------------------- page cache


def files_under(paths: Iterable[Path]) -> list[Path]:
    """Return every regular file at or below ``paths``, in sorted order."""
    found: list[Path] = []
    for path in paths:
        if path.is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p for p in path.rglob("*") if p.is_file()))
    return found


def drop_page_cache(paths: Iterable[Path]) -> None:
    """Evict the files' pages from the page cache, so the next read comes from the disk.

    POSIX_FADV_DONTNEED drops clean pages only, so each file is fsynced first. The
    caller must have closed every mmap of these files: mapped pages stay resident.
    """
    for path in files_under(paths):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
_MAP_FAILED = ctypes.c_void_p(-1).value


def resident_fraction(paths: Iterable[Path]) -> float:
    """Fraction of the files' pages in the page cache now, from mincore on a short-lived mapping.

    The mapping is made and removed here with libc calls, so no Python mmap object
    outlives the check and keeps pages resident.
    """
    page = mmap.PAGESIZE
    resident = total = 0
    for path in files_under(paths):
        size = path.stat().st_size
        if size == 0:
            continue
        pages = (size + page - 1) // page
        vector = (ctypes.c_ubyte * pages)()
        fd = os.open(path, os.O_RDONLY)
        try:
            address = _libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address == _MAP_FAILED:
                raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
            try:
                if _libc.mincore(address, size, vector) != 0:
                    raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
            finally:
                _libc.munmap(address, size)
        finally:
            os.close(fd)
        resident += sum(1 for v in vector if v & 1)
        total += pages
    return resident / total if total else 0.0
