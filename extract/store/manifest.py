"""The store manifest: layout, provenance and the list of completed shards.

Every field is documented in ``docs/store-format.md``. ``parse_manifest`` validates a
decoded manifest strictly before anything else in the store is trusted.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from extract.errors import StoreError
from extract.store import shards as shard_io

logger = logging.getLogger(__name__)

FORMAT_NAME = "mercator-kv-store"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
LOCK_NAME = "extract.lock"
SHARD_DIR = "shards"
SPLITS = ("train", "heldout")
KEY_POSITION_ENCODINGS = ("post-rope",)
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
# Upper bound on the stored top-k: far above any useful K, small enough that a damaged
# manifest cannot make a reader expect absurd array sizes.
MAX_TOPK = 1 << 16

# Matched with fullmatch: "$" would also accept a trailing newline, and "\d" non-ASCII digits.
_SHARD_NAME = re.compile(r"shards/([0-9]{5})\.(safetensors|zarr)")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class KVLayout:
    """Shape and encoding of one token's stored key/value rows, and the shards' optional arrays.

    ``topk`` is K of the teacher's top-K next-token log-probabilities stored per token
    (arrays ``topk_ids`` int32 [tokens, K] and ``topk_logprobs`` float32 [tokens, K]),
    0 when the store has none. ``answer_starts`` is True when shards contain
    ``sample_answer_starts``. Manifests written before either field existed lack them
    and parse as 0 and False.
    """

    layers: tuple[int, ...]
    num_kv_heads: int
    head_dim: int
    dtype: str
    key_position: str = "post-rope"
    topk: int = 0
    answer_starts: bool = True

    @property
    def kv_bytes_per_token(self) -> int:
        itemsize = torch.empty((), dtype=shard_io.torch_dtype(self.dtype)).element_size()
        return len(self.layers) * 2 * self.num_kv_heads * self.head_dim * itemsize

    @property
    def topk_bytes_per_token(self) -> int:
        """Bytes of one token's top-k rows: K int32 ids and K float32 log-probabilities."""
        return self.topk * (4 + 4)

    @property
    def bytes_per_token(self) -> int:
        """Stored bytes per token, key/value rows and top-k rows together; shards are planned with it."""
        return self.kv_bytes_per_token + self.topk_bytes_per_token

    @property
    def token_shape(self) -> tuple[int, int, int, int]:
        """Shape of one token's row: (layers, 2 for key/value, kv_heads, head_dim)."""
        return (len(self.layers), 2, self.num_kv_heads, self.head_dim)

    @property
    def kv_width(self) -> int:
        """Width of one layer's key (or value) vector: kv_heads * head_dim."""
        return self.num_kv_heads * self.head_dim


@dataclass(frozen=True)
class ShardRecord:
    """One completed shard as the manifest lists it."""

    index: int
    path: str
    samples: int
    tokens: int
    bytes: int
    sha256: str
    splits: dict[str, int]


@dataclass
class Manifest:
    """The store's manifest. ``identity`` fields must match for a resume to proceed."""

    backend: str
    layout: KVLayout
    teacher: dict[str, Any]
    tokenizer: dict[str, Any]
    dataset: dict[str, Any]
    plan: dict[str, Any]
    shards: list[ShardRecord] = field(default_factory=list)
    complete: bool = False
    created: str = ""
    updated: str = ""
    package_version: str = ""
    format_version: int = FORMAT_VERSION

    @property
    def planned_shards(self) -> int:
        return int(self.plan["shards"])

    def totals(self) -> dict[str, int]:
        totals = {"samples": 0, "tokens": 0, "bytes": 0, "shards": len(self.shards)}
        for split in SPLITS:
            totals[f"{split}_samples"] = 0
        for record in self.shards:
            totals["samples"] += record.samples
            totals["tokens"] += record.tokens
            totals["bytes"] += record.bytes
            for split, count in record.splits.items():
                totals[f"{split}_samples"] += count
        return totals

    def identity(self) -> dict[str, Any]:
        """Fields that define the store's content; a resume must match all of them.

        Where the teacher and the data files were read from is left out, so a moved file
        or another working directory still resumes. The teacher's identity hash and each
        data file's sha256 stay in.
        """
        return {
            "backend": self.backend,
            "layout": asdict(self.layout),
            "teacher": {k: v for k, v in self.teacher.items() if k != "name_or_path"},
            "tokenizer": self.tokenizer,
            "dataset": {**self.dataset, "sources": _without_paths(self.dataset.get("sources"))},
            "plan": self.plan,
        }

    def to_json(self) -> dict[str, Any]:
        layout = asdict(self.layout)
        layout["layers"] = list(self.layout.layers)
        layout["kv_bytes_per_token"] = self.layout.kv_bytes_per_token
        layout["bytes_per_token"] = self.layout.bytes_per_token
        layout["axes"] = ["tokens", "layers", "key_value", "kv_heads", "head_dim"]
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "package_version": self.package_version,
            "created": self.created,
            "updated": self.updated,
            "complete": self.complete,
            "backend": self.backend,
            "teacher": self.teacher,
            "tokenizer": self.tokenizer,
            "dataset": self.dataset,
            "kv": layout,
            "plan": self.plan,
            "shards": [asdict(record) for record in self.shards],
            "totals": self.totals(),
        }


def _without_paths(sources: Any) -> Any:
    if not isinstance(sources, list):
        return sources
    return [{k: v for k, v in s.items() if k != "path"} if isinstance(s, dict) else s for s in sources]


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def _require(obj: dict[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise StoreError(f"invalid manifest: missing field '{where}{key}'")
    value = obj[key]
    # bool is a subclass of int; a count given as true/false is a corrupt manifest.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise StoreError(f"invalid manifest: field '{where}{key}' must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise StoreError(f"invalid manifest: field '{where}{key}' must be {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(k.__name__ for k in kinds)


def _count(obj: dict[str, Any], key: str, where: str, upper: int = 2**62) -> int:
    value = _require(obj, key, int, where)
    if not 0 <= value <= upper:
        raise StoreError(f"invalid manifest: field '{where}{key}' = {value} is out of range [0, {upper}]")
    return value


def _check_finite_numbers(value: Any, where: str) -> None:
    """Raise ``StoreError`` on NaN or Infinity anywhere in ``value``: Python's json module accepts both, JSON does not."""
    if isinstance(value, float) and not math.isfinite(value):
        raise StoreError(f"invalid manifest: field '{where}' is {value}, which is not a JSON number")
    if isinstance(value, dict):
        for key, item in value.items():
            _check_finite_numbers(item, f"{where}.{key}" if where else str(key))
    elif isinstance(value, list):
        for position, item in enumerate(value):
            _check_finite_numbers(item, f"{where}[{position}]")


def parse_manifest(obj: Any) -> Manifest:
    """Validate a decoded manifest and build a ``Manifest``; raise ``StoreError`` on any fault."""
    if not isinstance(obj, dict):
        raise StoreError("invalid manifest: top level must be a JSON object")
    _check_finite_numbers(obj, "")
    if obj.get("format") != FORMAT_NAME:
        raise StoreError(f"invalid manifest: 'format' is {obj.get('format')!r}, expected {FORMAT_NAME!r}")
    version = _require(obj, "format_version", int, "")
    if version > FORMAT_VERSION:
        raise StoreError(
            f"store format version {version} is newer than this package reads ({FORMAT_VERSION}); "
            "upgrade mercator-kv to read it"
        )
    if version < 1:
        raise StoreError(f"invalid manifest: format_version {version} is not a known version")

    backend = _require(obj, "backend", str, "")
    if backend not in shard_io.BACKENDS:
        raise StoreError(f"invalid manifest: backend {backend!r} is not one of {list(shard_io.BACKENDS)}")

    kv = _require(obj, "kv", dict, "")
    layers = _require(kv, "layers", list, "kv.")
    if not layers or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < 4096 for i in layers):
        raise StoreError("invalid manifest: 'kv.layers' must be a non-empty list of layer indices")
    if len(set(layers)) != len(layers):
        raise StoreError(f"invalid manifest: 'kv.layers' repeats a layer: {layers}")
    dtype = _require(kv, "dtype", str, "kv.")
    if dtype not in shard_io.STORE_DTYPES:
        raise StoreError(f"invalid manifest: 'kv.dtype' {dtype!r} is not one of {list(shard_io.STORE_DTYPES)}")
    key_position = _require(kv, "key_position", str, "kv.")
    if key_position not in KEY_POSITION_ENCODINGS:
        raise StoreError(f"invalid manifest: 'kv.key_position' {key_position!r} is not one of {list(KEY_POSITION_ENCODINGS)}")
    layout = KVLayout(
        layers=tuple(layers),
        num_kv_heads=_count(kv, "num_kv_heads", "kv.", upper=4096) or _bad("kv.num_kv_heads", 0),
        head_dim=_count(kv, "head_dim", "kv.", upper=65536) or _bad("kv.head_dim", 0),
        dtype=dtype,
        key_position=key_position,
        # Both fields are optional so that stores written before they existed still open.
        topk=_count(kv, "topk", "kv.", upper=MAX_TOPK) if "topk" in kv else 0,
        answer_starts=_require(kv, "answer_starts", bool, "kv.") if "answer_starts" in kv else False,
    )

    plan = _require(obj, "plan", dict, "")
    planned_shards = _count(plan, "shards", "plan.", upper=10**6)
    shards = [_parse_shard(entry, position, backend) for position, entry in enumerate(_require(obj, "shards", list, ""))]
    if len(shards) > planned_shards:
        raise StoreError(f"invalid manifest: {len(shards)} shards listed but the plan has {planned_shards}")
    complete = _require(obj, "complete", bool, "")
    if complete and len(shards) != planned_shards:
        raise StoreError(
            f"invalid manifest: marked complete with {len(shards)} of {planned_shards} planned shards listed"
        )
    return Manifest(
        backend=backend,
        layout=layout,
        teacher=_require(obj, "teacher", dict, ""),
        tokenizer=_require(obj, "tokenizer", dict, ""),
        dataset=_require(obj, "dataset", dict, ""),
        plan=plan,
        shards=shards,
        complete=complete,
        created=_require(obj, "created", str, ""),
        updated=_require(obj, "updated", str, ""),
        package_version=_require(obj, "package_version", str, ""),
        format_version=version,
    )


def _bad(name: str, value: Any) -> Any:
    raise StoreError(f"invalid manifest: field '{name}' = {value!r} must be positive")


def _parse_shard(entry: Any, position: int, backend: str) -> ShardRecord:
    where = f"shards[{position}]."
    if not isinstance(entry, dict):
        raise StoreError(f"invalid manifest: '{where[:-1]}' must be an object")
    path = _require(entry, "path", str, where)
    match = _SHARD_NAME.fullmatch(path)
    # Only names of the exact form shards/NNNNN.ext are accepted, so no manifest can
    # point a reader outside the store (absolute paths, "..", links to elsewhere by name).
    if match is None:
        raise StoreError(
            f"invalid manifest: shard path {path!r} in '{where}path' is not of the form shards/NNNNN.safetensors|zarr"
        )
    index = _count(entry, "index", where, upper=10**6)
    if index != position or int(match.group(1)) != index:
        raise StoreError(f"invalid manifest: shard {path!r} has index {index} at list position {position}")
    if "." + match.group(2) != shard_io.BACKENDS[backend]:
        raise StoreError(f"invalid manifest: shard {path!r} has the wrong extension for the store's {backend} backend")
    sha256 = _require(entry, "sha256", str, where)
    if not _SHA256.fullmatch(sha256):
        raise StoreError(f"invalid manifest: '{where}sha256' of {path} is not a sha256 hex digest")
    splits = _require(entry, "splits", dict, where)
    if set(splits) - set(SPLITS) or not all(isinstance(v, int) and v >= 0 for v in splits.values()):
        raise StoreError(f"invalid manifest: '{where}splits' of {path} must map {list(SPLITS)} to counts")
    record = ShardRecord(
        index=index,
        path=path,
        samples=_count(entry, "samples", where, upper=10**9),
        tokens=_count(entry, "tokens", where, upper=10**12),
        bytes=_count(entry, "bytes", where, upper=2**50),
        sha256=sha256,
        splits={k: int(v) for k, v in splits.items()},
    )
    if sum(record.splits.values()) != record.samples:
        raise StoreError(f"invalid manifest: split counts of {path} do not add up to its {record.samples} samples")
    return record


def read_manifest(store_dir: Path) -> Manifest:
    path = Path(store_dir) / MANIFEST_NAME
    if path.is_symlink():
        raise StoreError(f"{path} is a symbolic link to {os.readlink(path)}; a store's manifest must be a file inside the store")
    if not path.is_file():
        raise StoreError(f"no store manifest at {path}: not a KV store, or extraction never completed a shard")
    size = path.stat().st_size
    if size > MAX_MANIFEST_BYTES:
        raise StoreError(f"invalid manifest {path}: {size} bytes is larger than the {MAX_MANIFEST_BYTES} byte limit")
    try:
        obj = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StoreError(f"invalid manifest {path}: not valid UTF-8 JSON ({exc})") from None
    return parse_manifest(obj)


def write_manifest(store_dir: Path, manifest: Manifest) -> None:
    """Replace the manifest atomically: write a temporary file, fsync, rename, fsync the directory."""
    manifest.updated = utc_now()
    data = json.dumps(manifest.to_json(), indent=2, sort_keys=False).encode("utf-8") + b"\n"
    shard_io.write_file_atomic(Path(store_dir) / MANIFEST_NAME, data)


def content_fingerprint(manifest: Manifest) -> str:
    """Hash what defines a store's content: the identity fields and every shard's sha256.

    Creation and update times are left out, so two stores with the same bytes have the
    same fingerprint and a run record traces to the exact cache it used.
    """
    payload = {"identity": manifest.identity(), "shards": [record.sha256 for record in manifest.shards]}
    encoded = json.dumps(payload, sort_keys=True, default=list).encode("utf-8")
    return "sha256:" + hashlib.sha256(encoded).hexdigest()
