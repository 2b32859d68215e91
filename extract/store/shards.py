"""Shard files: the two storage backends, each with its writer and reader side by side.

Every shard contains the same arrays, whatever the backend. The last three are present
only when the manifest's layout says so (``answer_starts`` true, ``topk`` above 0):

====================  ==============================================  ========
name                  shape                                           dtype
====================  ==============================================  ========
kv                    [tokens, layers, 2, kv_heads, head_dim]          store dtype
token_ids             [tokens]                                        int32
sample_offsets        [samples + 1]                                   int64
sample_rows           [samples]                                       int64
sample_sources        [samples]                                       uint8
sample_splits         [samples]                                       uint8
sample_answer_starts  [samples]                                       int64
topk_ids              [tokens, K]                                     int32
topk_logprobs         [tokens, K]                                     float32
====================  ==============================================  ========

``kv[..., 0, :, :]`` is the key and ``kv[..., 1, :, :]`` the value of each layer.
Token-major order makes one sample's rows one contiguous byte range.

``sample_answer_starts[i]`` is the index, counted from sample i's first token, of its
first answer token (0 for plain-text rows, the sample's length when truncation cut the
answer off). Row t of ``topk_ids`` / ``topk_logprobs`` contains the teacher's K most likely
tokens to follow token t and their log_softmax values over the full vocabulary in
float32, sorted in descending order.

safetensors: one file, written by ``safetensors.torch.save_file``; read here with
``pread`` through the file's own header, which is validated strictly first (offsets,
sizes, dtypes, shapes against the manifest) so a damaged header cannot make the
reader allocate or read what the file does not contain.

zarr: one Zarr v3 group directory with one array per name, ``kv`` chunked along tokens
inside Zarr's sharding codec. zarr-python has no bfloat16, so bf16 data is stored as
uint16 bits with the attribute ``logical_dtype: bfloat16`` and viewed back on read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from extract.errors import StoreError, UserError

if TYPE_CHECKING:
    from extract.store.manifest import KVLayout, ShardRecord

STORE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
BACKENDS: dict[str, str] = {"safetensors": ".safetensors", "zarr": ".zarr"}
INDEX_ARRAYS: dict[str, torch.dtype] = {
    "token_ids": torch.int32,
    "sample_offsets": torch.int64,
    "sample_rows": torch.int64,
    "sample_sources": torch.uint8,
    "sample_splits": torch.uint8,
}
ANSWER_STARTS = "sample_answer_starts"
TOPK_ARRAYS: dict[str, torch.dtype] = {"topk_ids": torch.int32, "topk_logprobs": torch.float32}
OPTIONAL_ARRAYS: dict[str, torch.dtype] = {ANSWER_STARTS: torch.int64, **TOPK_ARRAYS}
# Arrays with one entry per sample (the rest have one row per token).
SAMPLE_ARRAYS = ("sample_offsets", "sample_rows", "sample_sources", "sample_splits", ANSWER_STARTS)
# Per-token arrays that Zarr chunks along tokens, so a sample read touches only its chunks.
TOKEN_CHUNKED_ARRAYS = ("kv", *TOPK_ARRAYS)
ZARR_CHUNK_TOKENS = 128
SAFETENSORS_FORMAT = "mercator-kv-shard/1"
_HASH_BLOCK = 8 * 1024 * 1024
_MAX_HEADER_BYTES = 100 * 1024 * 1024

_SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}


def torch_dtype(name: str) -> torch.dtype:
    try:
        return STORE_DTYPES[name]
    except KeyError:
        raise UserError(f"unsupported store dtype {name!r}; choose one of {', '.join(STORE_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    for name, value in STORE_DTYPES.items():
        if value == dtype:
            return name
    raise UserError(f"unsupported store dtype {dtype}; choose one of {', '.join(STORE_DTYPES)}")


@dataclass
class ShardContents:
    """The arrays of one shard, in memory, before writing; an optional array left None is not written."""

    kv: torch.Tensor
    token_ids: torch.Tensor
    sample_offsets: torch.Tensor
    sample_rows: torch.Tensor
    sample_sources: torch.Tensor
    sample_splits: torch.Tensor
    sample_answer_starts: torch.Tensor | None = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None

    def arrays(self) -> dict[str, torch.Tensor]:
        arrays = {"kv": self.kv.contiguous()}
        for name, dtype in {**INDEX_ARRAYS, **OPTIONAL_ARRAYS}.items():
            tensor = getattr(self, name)
            if tensor is not None:
                arrays[name] = tensor.to(dtype).contiguous()
        return arrays


class ShardReader(Protocol):
    def index(self) -> dict[str, torch.Tensor]: ...

    def read_kv(self, start: int, stop: int) -> torch.Tensor: ...

    def read_kv_into(self, out: torch.Tensor, start: int, stop: int) -> None:
        """Read K/V rows [start, stop) into the contiguous tensor ``out``, without an intermediate copy."""

    def prefetch_kv(self, start: int, stop: int) -> None:
        """Start reading K/V rows [start, stop) from the disk into the page cache, without waiting."""

    def read_token_ids(self, start: int, stop: int) -> torch.Tensor: ...

    def read_topk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]: ...

    def close(self) -> None: ...


def empty_rows(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Allocate an uninitialised CPU tensor for rows read from a shard, in memory from numpy.

    numpy requests transparent huge pages (madvise) for large arrays and torch.empty
    does not. Filling 4 KiB pages one page fault at a time made reads about three
    times slower (measured on a 2-core KVM machine with THP in ``madvise`` mode).
    """
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for size in shape:
        numel *= size
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    return torch.from_numpy(np.empty(numel * itemsize, dtype=np.uint8)).view(dtype).view(shape)


def check_row_buffer(out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype) -> None:
    """Raise ValueError unless ``out`` is a contiguous CPU tensor of ``shape`` and ``dtype``: reads fill its memory directly."""
    if tuple(out.shape) != shape or out.dtype != dtype or not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError(
            f"read buffer is {tuple(out.shape)} {out.dtype} on {out.device} (contiguous: {out.is_contiguous()}); "
            f"expected a contiguous CPU tensor {shape} {dtype}"
        )


# ----------------------------------------------------------------------------- durable files


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    # Exclusive creation never follows a link that a previous occupant left at the name.
    tmp.unlink(missing_ok=True)
    with open(tmp, "xb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def temporary_path(final: Path) -> Path:
    return final.with_name(final.name + ".tmp")


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ----------------------------------------------------------------------------- paths inside the store


def shard_path_in_store(root: Path, record: "ShardRecord") -> Path:
    """Return where shard ``record`` lives under ``root``; raise ``StoreError`` if a link leads elsewhere.

    The manifest parser admits only paths of the form ``shards/NNNNN.ext``. This also
    rejects a symbolic link at either component, so no read or delete follows a link out
    of the store. ``shard_files`` rejects links inside a Zarr shard directory.
    """
    path = Path(root)
    for part in PurePosixPath(record.path).parts:
        path = path / part
        if path.is_symlink():
            raise StoreError(
                f"shard {record.path}: {path.relative_to(root).as_posix()} is a symbolic link to {os.readlink(path)}; "
                "every file of a store must be inside the store directory (link the whole store instead)"
            )
    return path


def shard_files(path: Path) -> list[tuple[str, Path]]:
    """List a shard's files as (relative POSIX path, path), sorted; a file shard is one entry named ''."""
    if not path.is_dir():
        return [("", path)]
    files = []
    for directory, subdirectories, names in os.walk(path):
        for name in subdirectories + names:
            entry = Path(directory, name)
            if entry.is_symlink():
                raise StoreError(
                    f"shard {path.parent.name}/{path.name}: {entry.relative_to(path).as_posix()} is a symbolic link; "
                    "shards must not contain links"
                )
        files += [(Path(directory, name).relative_to(path).as_posix(), Path(directory, name)) for name in names]
    # Path order (component by component), which checksums of existing stores depend on.
    return sorted(files, key=lambda item: PurePosixPath(item[0]).parts)


def shard_disk_bytes(path: Path) -> int:
    """Bytes of a shard on disk (the sum over a directory's files), without reading them."""
    return sum(file.stat().st_size for _, file in shard_files(path))


# ----------------------------------------------------------------------------- checksums


def hash_shard(path: Path) -> tuple[int, str]:
    """Return (bytes, sha256) of a shard file or shard directory.

    For a directory the digest covers, in sorted order of relative POSIX path, each file's
    path, a newline, its size in decimal, a newline and its contents.
    """
    digest = hashlib.sha256()
    total = 0
    if path.is_dir():
        for relative, file in shard_files(path):
            size = file.stat().st_size
            digest.update(f"{relative}\n{size}\n".encode())
            total += _hash_file_into(file, digest)
    else:
        total = _hash_file_into(path, digest)
    return total, digest.hexdigest()


def _hash_file_into(path: Path, digest: Any) -> int:
    size = 0
    with open(path, "rb") as handle:
        while block := handle.read(_HASH_BLOCK):
            digest.update(block)
            size += len(block)
    return size


# ----------------------------------------------------------------------------- writing


def write_shard(backend: str, final: Path, contents: ShardContents, *, zarr_chunk_tokens: int = ZARR_CHUNK_TOKENS) -> tuple[int, str]:
    """Write a shard under a temporary name, fsync it, rename it into place; return (bytes, sha256)."""
    tmp = temporary_path(final)
    remove_path(tmp)
    try:
        if backend == "safetensors":
            _write_safetensors(tmp, contents)
        elif backend == "zarr":
            _write_zarr(tmp, contents, zarr_chunk_tokens)
        else:
            raise UserError(f"unknown store backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    except OSError as exc:
        if exc.filename is None and exc.errno is not None:
            # zarr reports a full disk without the file name; name the shard being written.
            raise OSError(exc.errno, exc.strerror, str(tmp)) from exc
        raise
    size, sha256 = hash_shard(tmp)
    remove_path(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    return size, sha256


def _write_safetensors(path: Path, contents: ShardContents) -> None:
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    try:
        # One metadata key only: safetensors 0.8 writes metadata in hash-map order, which
        # changes from process to process, and shard bytes must not.
        save_file(contents.arrays(), str(path), metadata={"format": SAFETENSORS_FORMAT})
    except SafetensorError as exc:
        # A full disk or a file size limit arrives as SafetensorError; report it as the OSError it is.
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), os.strerror(int(code.group(1))), str(path)) from None
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _zarr() -> Any:
    try:
        import zarr
    except ImportError:
        raise UserError("the zarr backend needs zarr>=3: pip install 'zarr>=3,<4'") from None
    return zarr


def _write_zarr(path: Path, contents: ShardContents, chunk_tokens: int) -> None:
    zarr = _zarr()
    group = zarr.open_group(str(path), mode="w", zarr_format=3)
    group.attrs.update({"format": "mercator-kv-shard", "format_version": 1})
    config = {"write_empty_chunks": True}
    for name, tensor in contents.arrays().items():
        logical = dtype_name(tensor.dtype) if tensor.is_floating_point() else str(tensor.dtype).removeprefix("torch.")
        array = tensor.view(torch.uint16) if tensor.dtype == torch.bfloat16 else tensor
        data = array.numpy()
        tokens = max(1, data.shape[0])
        if name in TOKEN_CHUNKED_ARRAYS:
            chunks = (min(chunk_tokens, tokens),) + data.shape[1:]
            shards = (-(-tokens // chunks[0]) * chunks[0],) + data.shape[1:]
        else:
            chunks, shards = (tokens,), None
        zarray = group.create_array(
            name,
            shape=data.shape,
            dtype=data.dtype,
            chunks=chunks,
            shards=shards,
            compressors=None,
            attributes={"logical_dtype": logical},
            config=config,
        )
        if data.size:
            zarray[...] = data
    for file in sorted(path.rglob("*")):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in sorted((p for p in path.rglob("*") if p.is_dir()), reverse=True):
        fsync_dir(directory)
    fsync_dir(path)


# ----------------------------------------------------------------------------- reading


def open_shard(backend: str, path: Path, layout: "KVLayout", record: "ShardRecord") -> ShardReader:
    """Open the shard at ``path`` (from ``shard_path_in_store``), checking its arrays against the manifest."""
    if path.is_symlink():
        raise StoreError(f"shard {record.path}: is a symbolic link; shards must be regular files inside the store")
    if backend == "safetensors":
        if not path.is_file():
            raise StoreError(f"shard {record.path}: file is missing")
        return SafetensorsShard(path, layout, record)
    if not path.is_dir():
        raise StoreError(f"shard {record.path}: directory is missing")
    return ZarrShard(path, layout, record)


def expected_shapes(layout: "KVLayout", record: "ShardRecord") -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Return the (shape, dtype) of every array that a shard with this layout and record must contain, and no others."""
    shapes = {"kv": ((record.tokens, *layout.token_shape), torch_dtype(layout.dtype))}
    lengths = {"token_ids": record.tokens, "sample_offsets": record.samples + 1}
    for name, dtype in INDEX_ARRAYS.items():
        shapes[name] = ((lengths.get(name, record.samples),), dtype)
    if layout.answer_starts:
        shapes[ANSWER_STARTS] = ((record.samples,), OPTIONAL_ARRAYS[ANSWER_STARTS])
    if layout.topk:
        for name, dtype in TOPK_ARRAYS.items():
            shapes[name] = ((record.tokens, layout.topk), dtype)
    return shapes


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    nbytes = torch.empty((), dtype=dtype).element_size()
    for dim in shape:
        nbytes *= dim
    return nbytes


class SafetensorsShard:
    """A safetensors shard read with ``pread`` through its validated header."""

    def __init__(self, path: Path, layout: "KVLayout", record: "ShardRecord") -> None:
        self.path = path
        self.record = record
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._entries = self._read_header(expected_shapes(layout, record))
        except BaseException:
            # close() marks the descriptor closed, so __del__ cannot close its number
            # again after the operating system has handed it to another file.
            self.close()
            raise

    def _fail(self, reason: str) -> StoreError:
        return StoreError(f"shard {self.record.path}: {reason}")

    def _read_header(self, expected: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, tuple[int, int, tuple[int, ...], torch.dtype]]:
        file_size = os.fstat(self._fd).st_size
        prefix = os.pread(self._fd, 8, 0)
        if len(prefix) < 8:
            raise self._fail(f"truncated: {file_size} bytes is too short for a safetensors header")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(_MAX_HEADER_BYTES, file_size - 8):
            raise self._fail(f"header claims {header_size} bytes but the file has {file_size}; the shard is damaged")
        try:
            header = json.loads(os.pread(self._fd, header_size, 8).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise self._fail("header is not valid JSON; the shard is damaged") from None
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object; the shard is damaged")
        header.pop("__metadata__", None)
        data_start = 8 + header_size
        data_size = file_size - data_start
        if set(header) != set(expected):
            raise self._fail(f"holds arrays {sorted(header)}, expected {sorted(expected)}")
        entries = {}
        for name, (shape, dtype) in expected.items():
            entry = header[name]
            if not isinstance(entry, dict):
                raise self._fail(f"header entry {name!r} is not an object")
            stored_dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            if stored_dtype != dtype:
                raise self._fail(f"array {name!r} has dtype {entry.get('dtype')!r}, the manifest implies {dtype}")
            if entry.get("shape") != list(shape):
                raise self._fail(f"array {name!r} has shape {entry.get('shape')}, the manifest implies {list(shape)}")
            offsets = entry.get("data_offsets")
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)):
                raise self._fail(f"array {name!r} has invalid data_offsets {offsets!r}")
            begin, end = offsets
            nbytes = _nbytes(shape, dtype)
            if not 0 <= begin <= end <= data_size or end - begin != nbytes:
                raise self._fail(
                    f"array {name!r} claims bytes {begin}..{end} but needs {nbytes} within {data_size}; the shard is truncated or damaged"
                )
            entries[name] = (data_start + begin, end - begin, shape, dtype)
        spans = sorted((start, start + size) for start, size, _, _ in entries.values())
        if any(a_end > b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])):
            raise self._fail("arrays overlap in the data section; the shard is damaged")
        return entries

    def _pread_into(self, view: memoryview, offset: int) -> None:
        done = 0
        while done < len(view):
            count = os.preadv(self._fd, [view[done:]], offset + done)
            if count == 0:
                raise self._fail(f"file ended at byte {offset + done}; the shard is truncated")
            done += count

    def _read_rows_into(self, name: str, out: torch.Tensor, start: int, stop: int) -> None:
        offset, size, shape, dtype = self._entries[name]
        if not 0 <= start <= stop <= shape[0]:
            raise self._fail(f"rows {start}..{stop} of {name!r} are outside 0..{shape[0]}")
        check_row_buffer(out, (stop - start, *shape[1:]), dtype)
        if start == stop:
            return
        row_bytes = size // shape[0]
        self._pread_into(memoryview(out.view(torch.uint8).reshape(-1).numpy()), offset + start * row_bytes)

    def _read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        _, _, shape, dtype = self._entries[name]
        out = empty_rows((max(0, stop - start), *shape[1:]), dtype)
        self._read_rows_into(name, out, start, stop)
        return out

    def index(self) -> dict[str, torch.Tensor]:
        """Read the per-sample arrays of the shard, whole."""
        return {name: self._read_rows(name, 0, self._entries[name][2][0]) for name in SAMPLE_ARRAYS if name in self._entries}

    def read_kv(self, start: int, stop: int) -> torch.Tensor:
        return self._read_rows("kv", start, stop)

    def read_kv_into(self, out: torch.Tensor, start: int, stop: int) -> None:
        self._read_rows_into("kv", out, start, stop)

    def prefetch_kv(self, start: int, stop: int) -> None:
        offset, size, shape, _ = self._entries["kv"]
        if 0 <= start < stop <= shape[0]:
            row_bytes = size // shape[0]
            os.posix_fadvise(self._fd, offset + start * row_bytes, (stop - start) * row_bytes, os.POSIX_FADV_WILLNEED)

    def read_token_ids(self, start: int, stop: int) -> torch.Tensor:
        return self._read_rows("token_ids", start, stop)

    def read_topk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if "topk_ids" not in self._entries:
            raise self._fail("contains no top-k arrays; the store was extracted with --topk-logprobs 0")
        return self._read_rows("topk_ids", start, stop), self._read_rows("topk_logprobs", start, stop)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()


class ZarrShard:
    """A Zarr v3 group shard, opened and checked through zarr-python.

    Rows of ``kv`` and ``token_ids`` are read with plain file reads when the arrays are
    stored uncompressed (as this package writes them), else through zarr-python.
    """

    def __init__(self, path: Path, layout: "KVLayout", record: "ShardRecord") -> None:
        zarr = _zarr()
        self.record = record
        expected = expected_shapes(layout, record)
        # Chunks are stored uncompressed and written even when empty, so the files must
        # hold every byte the arrays need. Checking that first keeps a forged zarr.json
        # from making zarr fill a huge array with its fill value.
        needed = sum(_nbytes(shape, dtype) for shape, dtype in expected.values())
        on_disk = shard_disk_bytes(path)
        if on_disk < needed:
            raise StoreError(
                f"shard {record.path}: {on_disk} bytes on disk cannot hold the {needed} bytes of arrays "
                "the manifest implies; the shard is truncated or damaged"
            )
        try:
            group = zarr.open_group(str(path), mode="r", zarr_format=3)
            self._arrays = {name: group[name] for name in expected}
            extra = sorted(set(group.array_keys()) - set(self._arrays))
        except (KeyError, FileNotFoundError, ValueError, TypeError, json.JSONDecodeError) as exc:
            raise StoreError(f"shard {record.path}: not a readable Zarr group ({type(exc).__name__}: {exc})") from None
        if extra:
            raise StoreError(f"shard {record.path}: holds unexpected arrays {extra}")
        self._dtypes: dict[str, torch.dtype] = {}
        for name, (shape, dtype) in expected.items():
            array = self._arrays[name]
            logical = array.attrs.get("logical_dtype")
            stored = "uint16" if dtype == torch.bfloat16 else str(dtype).removeprefix("torch.")
            if tuple(array.shape) != shape:
                raise StoreError(f"shard {record.path}: array {name!r} has shape {list(array.shape)}, the manifest implies {list(shape)}")
            if str(array.dtype) != stored or logical != str(dtype).removeprefix("torch."):
                raise StoreError(
                    f"shard {record.path}: array {name!r} has dtype {array.dtype} ({logical}), the manifest implies {dtype}"
                )
            self._dtypes[name] = dtype
        from extract.store.zarr_direct import DirectRowReader

        # Row reads bypass zarr-python where the layout allows: it is several times slower.
        self._direct = {
            name: DirectRowReader.open(path / name, self._arrays[name], self._dtypes[name], f"shard {record.path}: array {name!r}")
            for name in ("kv", "token_ids")
        }

    def _read(self, name: str, start: int, stop: int) -> torch.Tensor:
        direct = self._direct.get(name)
        if direct is not None:
            return direct.read(start, stop)
        try:
            data = self._arrays[name][start:stop]
        except Exception as exc:  # zarr raises many types for damaged chunks and shard indexes
            raise StoreError(f"shard {self.record.path}: cannot read {name!r} rows {start}..{stop} ({type(exc).__name__}: {exc})") from None
        tensor = torch.from_numpy(data.copy())
        return tensor.view(torch.bfloat16) if self._dtypes[name] == torch.bfloat16 else tensor

    def index(self) -> dict[str, torch.Tensor]:
        """Read the per-sample arrays of the shard, whole."""
        return {name: self._read(name, 0, self._arrays[name].shape[0]) for name in SAMPLE_ARRAYS if name in self._arrays}

    def read_kv(self, start: int, stop: int) -> torch.Tensor:
        return self._read("kv", start, stop)

    def read_kv_into(self, out: torch.Tensor, start: int, stop: int) -> None:
        direct = self._direct.get("kv")
        if direct is not None:
            direct.read_into(out, start, stop)
        else:
            out.copy_(self._read("kv", start, stop))

    def prefetch_kv(self, start: int, stop: int) -> None:
        direct = self._direct.get("kv")
        if direct is not None:
            direct.prefetch(start, stop)

    def read_token_ids(self, start: int, stop: int) -> torch.Tensor:
        return self._read("token_ids", start, stop)

    def read_topk(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        if "topk_ids" not in self._arrays:
            raise StoreError(f"shard {self.record.path}: contains no top-k arrays; the store was extracted with --topk-logprobs 0")
        return self._read("topk_ids", start, stop), self._read("topk_logprobs", start, stop)

    def close(self) -> None:
        for direct in self._direct.values():
            if direct is not None:
                direct.close()
        self._direct = {}
        self._arrays = {}
