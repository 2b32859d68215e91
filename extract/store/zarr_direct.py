"""Row reads from uncompressed Zarr v3 arrays with plain file reads, bypassing zarr-python.

zarr-python 3.1 runs every read through asyncio and its codec pipeline, which caps it
near 1 GB/s on a local disk, about a fifth of what plain reads of the same bytes reach.
The arrays this package writes are simple enough to read directly. They are chunked
along the first axis only and stored uncompressed, either one raw chunk per file or as
inner chunks inside Zarr's sharding codec. A shard file ends with its index: offset and
length of each inner chunk, then a CRC32C. ``DirectRowReader.open`` accepts exactly
those layouts and returns ``None`` for any other, so the caller falls back to
zarr-python. Each shard index is checked before it is used.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import torch

from extract.errors import StoreError
from extract.store.shards import check_row_buffer, empty_rows

# Offset and length of an inner chunk that was never written.
_EMPTY = 2**64 - 1
_CRC_BYTES = 4


@dataclass(frozen=True)
class _Layout:
    """Row-to-file mapping: ``rows_per_file`` rows per file, in chunks of ``rows_per_chunk`` rows."""

    rows: int
    row_bytes: int
    rows_per_file: int
    rows_per_chunk: int
    sharded: bool
    index_at_end: bool
    fill_byte: int


def _plain_layout(array: Any) -> _Layout | None:
    """Return the row layout of ``array`` when it is one the direct reader handles, else None."""
    from zarr.codecs import BytesCodec, Crc32cCodec, ShardingCodec

    metadata = array.metadata
    shape = tuple(metadata.shape)
    file_chunk = tuple(metadata.chunk_grid.chunk_shape)
    if not shape or file_chunk[1:] != shape[1:] or sys.byteorder != "little":
        return None
    fill = np.asarray(metadata.fill_value, dtype=array.dtype).tobytes()
    if fill != fill[:1] * len(fill):
        return None  # a fill value that is not one repeated byte
    row_bytes = int(np.dtype(array.dtype).itemsize * np.prod(shape[1:], dtype=np.int64))
    codecs = tuple(metadata.codecs)
    little = BytesCodec(endian="little")
    if codecs == (little,):
        return _Layout(shape[0], row_bytes, file_chunk[0], file_chunk[0], False, True, fill[0])
    if len(codecs) != 1 or not isinstance(codecs[0], ShardingCodec):
        return None
    sharding = codecs[0]
    inner = tuple(sharding.chunk_shape)
    if tuple(sharding.codecs) != (little,) or tuple(sharding.index_codecs) != (little, Crc32cCodec()):
        return None
    if inner[1:] != shape[1:] or file_chunk[0] % inner[0]:
        return None
    at_end = str(getattr(sharding.index_location, "value", sharding.index_location)) == "end"
    return _Layout(shape[0], row_bytes, file_chunk[0], inner[0], True, at_end, fill[0])


class DirectRowReader:
    """Reads rows ``[start, stop)`` of one Zarr v3 array with ``pread`` on its chunk files."""

    def __init__(self, root: Path, array: Any, layout: _Layout, dtype: torch.dtype, label: str) -> None:
        self._root = root
        self._array = array
        self._layout = layout
        self._dtype = dtype
        self._row_shape = tuple(array.shape[1:])
        self._label = label
        self._fds: dict[int, int] = {}
        self._indexes: dict[int, np.ndarray] = {}

    @classmethod
    def open(cls, array_dir: Path, array: Any, dtype: torch.dtype, label: str) -> "DirectRowReader | None":
        """Return a reader for ``array`` (stored in ``array_dir``), or None when its layout needs zarr-python."""
        layout = _plain_layout(array)
        if layout is None:
            return None
        return cls(array_dir, array, layout, dtype, label)

    def _fail(self, reason: str) -> StoreError:
        return StoreError(f"{self._label}: {reason}")

    def _fd(self, file_index: int) -> int:
        fd = self._fds.get(file_index)
        if fd is None:
            coords = (file_index,) + (0,) * len(self._row_shape)
            path = self._root / self._array.metadata.encode_chunk_key(coords)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise self._fail(f"chunk file {path.name} of rows from {file_index * self._layout.rows_per_file} is missing") from None
            self._fds[file_index] = fd
        return fd

    def _shard_index(self, file_index: int) -> np.ndarray:
        """Read and check the [inner chunks, 2] (offset, length) index of one shard file."""
        index = self._indexes.get(file_index)
        if index is not None:
            return index
        layout = self._layout
        fd = self._fd(file_index)
        chunks = layout.rows_per_file // layout.rows_per_chunk
        index_bytes = chunks * 16 + _CRC_BYTES
        file_size = os.fstat(fd).st_size
        if file_size < index_bytes:
            raise self._fail(f"shard file of {file_size} bytes is too short for its {index_bytes}-byte index")
        raw = os.pread(fd, index_bytes, file_size - index_bytes if layout.index_at_end else 0)
        body, stored_crc = raw[:-_CRC_BYTES], raw[-_CRC_BYTES:]
        if google_crc32c.value(body).to_bytes(4, "little") != stored_crc:
            raise self._fail("shard index checksum does not match; the shard is damaged")
        index = np.frombuffer(body, dtype="<u8").reshape(chunks, 2)

        chunk_bytes = layout.rows_per_chunk * layout.row_bytes
        offsets, lengths = index[:, 0], index[:, 1]
        written = ~((offsets == _EMPTY) & (lengths == _EMPTY))
        if file_size >= chunk_bytes:
            outside = offsets > np.uint64(file_size - chunk_bytes)
        else:
            outside = np.ones_like(written)
        bad = written & ((lengths != chunk_bytes) | outside)
        if bad.any():
            chunk = int(np.flatnonzero(bad)[0])
            raise self._fail(
                f"shard index lists inner chunk {chunk} at bytes {offsets[chunk]}+{lengths[chunk]}, "
                f"outside the {file_size}-byte file or not {chunk_bytes} bytes long; the shard is damaged"
            )
        self._indexes[file_index] = index
        return index

    def _pread_into(self, fd: int, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            count = os.preadv(fd, [view[done:]], offset + done)
            if count == 0:
                raise self._fail(f"file ended at byte {offset + done}; the chunk is truncated")
            done += count

    def _spans(self, start: int, stop: int) -> list[tuple[int, int | None, int, int]]:
        """Split rows [start, stop) into (file, byte offset or None for an empty chunk, first row, rows) spans."""
        layout = self._layout
        spans: list[tuple[int, int | None, int, int]] = []
        row = start
        while row < stop:
            file_index, in_file = divmod(row, layout.rows_per_file)
            if not layout.sharded:
                count = min(stop, (file_index + 1) * layout.rows_per_file) - row
                spans.append((file_index, in_file * layout.row_bytes, row, count))
                row += count
                continue
            chunk, in_chunk = divmod(in_file, layout.rows_per_chunk)
            count = min(stop - row, layout.rows_per_chunk - in_chunk)
            offset, _ = (int(x) for x in self._shard_index(file_index)[chunk])
            position = None if offset == _EMPTY else offset + in_chunk * layout.row_bytes
            previous = spans[-1] if spans else None
            # Inner chunks written one after another are read with one call.
            if previous and previous[0] == file_index and previous[1] is not None and position is not None and previous[1] + previous[3] * layout.row_bytes == position:
                spans[-1] = (file_index, previous[1], previous[2], previous[3] + count)
            else:
                spans.append((file_index, position, row, count))
            row += count
        return spans

    def read_into(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Read rows [start, stop) into the contiguous tensor ``out`` of that many rows."""
        layout = self._layout
        if not 0 <= start <= stop <= layout.rows:
            raise self._fail(f"rows {start}..{stop} are outside 0..{layout.rows}")
        check_row_buffer(out, (stop - start, *self._row_shape), self._dtype)
        if start == stop:
            return
        target = memoryview(out.view(torch.uint8).reshape(-1).numpy())
        for file_index, offset, row, count in self._spans(start, stop):
            part = target[(row - start) * layout.row_bytes : (row - start + count) * layout.row_bytes]
            if offset is None:
                part[:] = bytes([layout.fill_byte]) * len(part)
            else:
                self._pread_into(self._fd(file_index), part, offset)

    def prefetch(self, start: int, stop: int) -> None:
        """Ask the kernel to start reading rows [start, stop) into the page cache (POSIX_FADV_WILLNEED)."""
        if not 0 <= start < stop <= self._layout.rows:
            return
        for file_index, offset, _, count in self._spans(start, stop):
            if offset is not None:
                os.posix_fadvise(self._fd(file_index), offset, count * self._layout.row_bytes, os.POSIX_FADV_WILLNEED)

    def read(self, start: int, stop: int) -> torch.Tensor:
        out = empty_rows((max(0, stop - start), *self._row_shape), self._dtype)
        self.read_into(out, start, stop)
        return out

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._indexes.clear()

    def __del__(self) -> None:
        self.close()
