"""The KV store: the on-disk contract between ``extract`` and ``distill``.

A store is a directory::

    <store>/manifest.json        format version, provenance, layout, completed shards
    <store>/shards/00000.<ext>   one shard: a run of whole samples (the unit of completion)
    <store>/extract.lock         present while an extract process writes the store

Shards are written under a temporary name and renamed when complete; only then is the
manifest, replaced atomically, extended with the shard's record. A shard file that the
manifest does not list is never read. ``docs/store-format.md`` documents every field.

Reader and writer live side by side in this package so a format change is one diff:
``manifest`` (schema and validation), ``shards`` (the safetensors and Zarr backends),
``reader``, ``writer`` and ``verify``.
"""

from extract.store.manifest import (
    FORMAT_NAME,
    FORMAT_VERSION,
    SPLITS,
    KVLayout,
    Manifest,
    ShardRecord,
    content_fingerprint,
    read_manifest,
)
from extract.store.reader import KVStore, SampleRef, open_store
from extract.store.shards import BACKENDS, STORE_DTYPES, ShardContents
from extract.store.writer import StoreWriter

__all__ = [
    "BACKENDS",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "KVLayout",
    "KVStore",
    "Manifest",
    "SPLITS",
    "STORE_DTYPES",
    "SampleRef",
    "ShardContents",
    "ShardRecord",
    "StoreWriter",
    "content_fingerprint",
    "open_store",
    "read_manifest",
]
