"""Damaged and foreign stores: verify reports each fault, distill refuses with one line, nothing reads outside.

Every case copies the tiny store, damages it one way, and runs the real commands:
``extract verify`` must exit 1 with a FAULT line naming the shard or field, and
``distill`` must exit 2 with a single ``error:`` line naming it. An audit hook records
every file the two commands open or list. None may resolve into the bait directory
beside the store, which contains valid copies of the store's files for a link to point at.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from reliability_support import (
    child_env,
    error_line,
    invoke,
    recorded_opens,
    reliability_figures,
    sealed,
    tiny_store,
    tiny_zarr_store,
)
from safetensors.torch import load_file, save_file

from distill.cli import main as distill_main
from extract.cli import main as extract_main
from extract.store.shards import SAFETENSORS_FORMAT

__all__ = ["reliability_figures", "tiny_store", "tiny_zarr_store"]

SHARD = "shards/00001.safetensors"


def _manifest(store: Path) -> dict:
    return json.loads((store / "manifest.json").read_text())


def _write_manifest(store: Path, manifest: dict) -> None:
    (store / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(edit: Callable[[dict], None]) -> Callable[[Path, Path], None]:
    def damage(store: Path, outside: Path) -> None:
        manifest = _manifest(store)
        edit(manifest)
        _write_manifest(store, manifest)

    return damage


def _set(path: str, value: object) -> Callable[[Path, Path], None]:
    """Damage: set the manifest field at ``path`` (dotted, with [i] for list items) to ``value``."""

    def edit(manifest: dict) -> None:
        *parents, last = path.replace("[", ".").replace("]", "").split(".")
        node = manifest
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return _edit_manifest(edit)


def _header(path: Path) -> tuple[int, dict, bytes]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[:8])
    return length, json.loads(data[8 : 8 + length]), data[8 + length :]


def _write_header(path: Path, header: dict, body: bytes) -> None:
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)


def _flip_data_byte(store: Path, outside: Path) -> None:
    path = store / SHARD
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def _flip_header_byte(store: Path, outside: Path) -> None:
    # Turn the first digit of the kv shape, "[4" for example, into "[5": one byte changed.
    path = store / SHARD
    data = bytearray(path.read_bytes())
    at = data.index(b'"kv":{"dtype":"F32","shape":[') + len(b'"kv":{"dtype":"F32","shape":[')
    data[at] = data[at] + 1 if data[at] < ord("9") else ord("1")
    path.write_bytes(bytes(data))
    sealed(store, 1)


def _truncate(size: int | None, seal: bool) -> Callable[[Path, Path], None]:
    def damage(store: Path, outside: Path) -> None:
        path = store / SHARD
        os.truncate(path, path.stat().st_size // 2 if size is None else size)
        if seal:
            sealed(store, 1)

    return damage


def _remove_shard(store: Path, outside: Path) -> None:
    (store / SHARD).unlink()


def _extra_file(relative: str) -> Callable[[Path, Path], None]:
    def damage(store: Path, outside: Path) -> None:
        (store / relative).write_bytes(b"not part of the store\n")

    return damage


def _remove_manifest(store: Path, outside: Path) -> None:
    (store / "manifest.json").unlink()


def _manifest_bytes(data: bytes) -> Callable[[Path, Path], None]:
    def damage(store: Path, outside: Path) -> None:
        (store / "manifest.json").write_bytes(data)

    return damage


def _rewrite_kv(change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path, Path], None]:
    def damage(store: Path, outside: Path) -> None:
        path = store / SHARD
        arrays = load_file(path)
        arrays["kv"] = change(arrays["kv"]).contiguous()
        save_file(arrays, path, metadata={"format": SAFETENSORS_FORMAT})
        sealed(store, 1)

    return damage


def _manifest_path(make: Callable[[Path, Path], str]) -> Callable[[Path, Path], None]:
    """Damage: point shard 0 of the manifest at a path outside the store, where a valid copy lies."""

    def damage(store: Path, outside: Path) -> None:
        manifest = _manifest(store)
        manifest["shards"][0]["path"] = make(store, outside)
        _write_manifest(store, manifest)

    return damage


def _link_shard(store: Path, outside: Path) -> None:
    path = store / "shards/00000.safetensors"
    path.unlink()
    path.symlink_to(outside / "shards/00000.safetensors")


def _link_shard_dir(store: Path, outside: Path) -> None:
    shutil.rmtree(store / "shards")
    (store / "shards").symlink_to(outside / "shards", target_is_directory=True)


def _link_manifest(store: Path, outside: Path) -> None:
    (store / "manifest.json").unlink()
    (store / "manifest.json").symlink_to(outside / "manifest.json")


def _header_length(value: int) -> Callable[[Path, Path], None]:
    def damage(store: Path, outside: Path) -> None:
        path = store / SHARD
        with open(path, "r+b") as handle:
            handle.write(struct.pack("<Q", value))
        sealed(store, 1)

    return damage


def _header_claims_terabytes(also_in_manifest: bool) -> Callable[[Path, Path], None]:
    """Damage: the kv entry of the header claims 10**9 tokens (about 2 TB), optionally the manifest too."""

    def damage(store: Path, outside: Path) -> None:
        path = store / SHARD
        _, header, body = _header(path)
        shape = header["kv"]["shape"]
        row_bytes = 4 * shape[1] * shape[2] * shape[3] * shape[4]
        tokens = 10**9
        header["kv"]["shape"] = [tokens, *shape[1:]]
        header["kv"]["data_offsets"] = [header["kv"]["data_offsets"][0], header["kv"]["data_offsets"][0] + tokens * row_bytes]
        _write_header(path, header, body)
        sealed(store, 1)
        if also_in_manifest:
            manifest = _manifest(store)
            manifest["shards"][1]["tokens"] = tokens
            _write_manifest(store, manifest)

    return damage


# (case id, damage, text that the verify FAULT line and the distill error must both contain)
CASES: list[tuple[str, Callable[[Path, Path], None], str]] = [
    ("flipped data byte", _flip_data_byte, SHARD),
    ("flipped header byte, manifest resealed", _flip_header_byte, SHARD),
    ("truncated to half", _truncate(None, seal=False), SHARD),
    ("truncated to half, manifest resealed", _truncate(None, seal=True), SHARD),
    ("truncated to 3 bytes, manifest resealed", _truncate(3, seal=True), SHARD),
    ("missing shard", _remove_shard, SHARD),
    ("extra file in the store", _extra_file("notes.txt"), "notes.txt"),
    ("extra file in shards", _extra_file("shards/00009.safetensors"), "shards/00009.safetensors"),
    ("missing manifest", _remove_manifest, "manifest"),
    ("manifest not JSON", _manifest_bytes(b'{"format": "mercator-kv-store", '), "manifest"),
    ("manifest not UTF-8", _manifest_bytes(b"\xff\xfe{}"), "manifest"),
    ("manifest a JSON list", _manifest_bytes(b"[]"), "manifest"),
    ("manifest format_version a string", _set("format_version", "1"), "format_version"),
    ("manifest layers a string", _set("kv.layers", "0,1"), "kv.layers"),
    ("manifest dtype a number", _set("kv.dtype", 4), "kv.dtype"),
    ("manifest shard tokens a string", _set("shards[1].tokens", "600"), "shards[1].tokens"),
    ("manifest shard tokens negative", _set("shards[1].tokens", -1), "shards[1].tokens"),
    ("manifest shard sha256 not hex", _set("shards[1].sha256", "abc"), "shards[1].sha256"),
    ("manifest complete a string", _set("complete", "yes"), "complete"),
    ("manifest shards an object", _set("shards", {}), "shards"),
    ("manifest plan shards null", _set("plan.shards", None), "plan.shards"),
    ("manifest from a newer format version", _set("format_version", 2), "format version 2 is newer"),
    ("foreign manifest", _set("format", "other-kv-store"), "'format'"),
    ("kv shape disagrees", _rewrite_kv(lambda kv: kv[..., :16]), SHARD),
    ("kv token count disagrees", _rewrite_kv(lambda kv: kv[:-1]), SHARD),
    ("kv dtype disagrees", _rewrite_kv(lambda kv: kv.to(torch.float16)), SHARD),
    ("shard path ../", _manifest_path(lambda store, outside: "../outside/shards/00000.safetensors"), "shards[0].path"),
    ("shard path absolute", _manifest_path(lambda store, outside: str(outside / "shards/00000.safetensors")), "shards[0].path"),
    ("shard a symlink outside", _link_shard, "shards/00000.safetensors"),
    ("shards dir a symlink outside", _link_shard_dir, "symbolic link"),
    ("manifest a symlink outside", _link_manifest, "manifest.json"),
    ("header length 2**63", _header_length(2**63), SHARD),
    ("header length 2**40", _header_length(2**40), SHARD),
    ("header claims terabytes", _header_claims_terabytes(also_in_manifest=False), SHARD),
    ("header and manifest claim terabytes", _header_claims_terabytes(also_in_manifest=True), SHARD),
    ("manifest claims 2**50 shard bytes", _set("shards[1].bytes", 2**50), SHARD),
    ("manifest claims 10**12 tokens", _set("shards[1].tokens", 10**12), SHARD),
]
# Cases whose claimed sizes would exhaust memory if anything allocated them.
ABSURD = {"header length 2**63", "header length 2**40", "header claims terabytes", "header and manifest claim terabytes", "manifest claims 10**12 tokens"}


def _damaged_copy(source: Path, tmp_path: Path, damage: Callable[[Path, Path], None]) -> tuple[Path, Path]:
    store = tmp_path / "store"
    outside = tmp_path / "outside"
    shutil.copytree(source, store)
    shutil.copytree(source, outside)
    damage(store, outside)
    return store, outside


def _check_refused(store: Path, outside: Path, tmp_path: Path, expected: str) -> tuple[str, str]:
    """Run verify and distill on ``store``; return (first fault, error) after checking both refused."""
    with recorded_opens() as opened:
        verified = invoke(extract_main, "verify", store, "--no-progress")
        distilled = invoke(
            distill_main, "--store", store, "--out", tmp_path / "run", "--device", "cpu", "--steps", "1", "--no-progress"
        )
    assert verified.exit_code == 1, verified.stdout + verified.stderr
    assert "Traceback" not in verified.stdout + verified.stderr
    faults = [line for line in verified.stdout.splitlines() if line.startswith("FAULT: ")]
    assert any(expected in fault for fault in faults), faults
    assert distilled.exit_code == 2, distilled.stdout + distilled.stderr
    error = error_line(distilled)
    assert expected in error
    # Nothing opened or listed inside the bait directory, through a link or otherwise.
    assert not [path for path in opened if Path(path).is_relative_to(outside.resolve())]
    return faults[0], error


@pytest.mark.parametrize("damage, expected", [case[1:] for case in CASES], ids=[case[0] for case in CASES])
def test_damaged_store_refused(tiny_store: Path, tmp_path: Path, damage: Callable[[Path, Path], None], expected: str) -> None:
    store, outside = _damaged_copy(tiny_store, tmp_path, damage)
    _check_refused(store, outside, tmp_path, expected)


def test_damaged_store_case_count(reliability_figures: dict[str, str]) -> None:
    reliability_figures["damaged safetensors store cases"] = str(len(CASES))
    reliability_figures["damaged zarr store cases"] = str(len(ZARR_CASES))
    assert len(CASES) >= 30


def _zarr_chunk(store: Path) -> Path:
    """The one shard-codec file holding the kv chunks of shard 1."""
    return store / "shards/00001.zarr/kv/c/0/0/0/0/0"


def _zarr_flip(store: Path, outside: Path) -> None:
    path = _zarr_chunk(store)
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def _zarr_truncate(store: Path, outside: Path) -> None:
    os.truncate(_zarr_chunk(store), _zarr_chunk(store).stat().st_size // 2)
    sealed(store, 1)


def _zarr_remove(store: Path, outside: Path) -> None:
    shutil.rmtree(store / "shards/00001.zarr")


def _zarr_link_inside(store: Path, outside: Path) -> None:
    chunk = _zarr_chunk(store)
    chunk.unlink()
    chunk.symlink_to(_zarr_chunk(outside))


def _zarr_forged_shape(store: Path, outside: Path) -> None:
    """Damage: zarr.json and the manifest agree on 10**9 tokens, which the chunk files cannot hold."""
    meta_path = store / "shards/00001.zarr/kv/zarr.json"
    meta = json.loads(meta_path.read_text())
    meta["shape"][0] = 10**9
    meta_path.write_text(json.dumps(meta))
    sealed(store, 1)
    manifest = _manifest(store)
    manifest["shards"][1]["tokens"] = 10**9
    _write_manifest(store, manifest)


ZARR_SHARD = "shards/00001.zarr"
ZARR_CASES = [
    ("flipped chunk byte", _zarr_flip, ZARR_SHARD),
    ("truncated chunk, manifest resealed", _zarr_truncate, ZARR_SHARD),
    ("missing shard", _zarr_remove, ZARR_SHARD),
    ("chunk a symlink outside", _zarr_link_inside, ZARR_SHARD),
    ("zarr.json and manifest claim terabytes", _zarr_forged_shape, ZARR_SHARD),
]


@pytest.mark.parametrize("damage, expected", [case[1:] for case in ZARR_CASES], ids=[case[0] for case in ZARR_CASES])
def test_damaged_zarr_store_refused(
    tiny_zarr_store: Path, tmp_path: Path, damage: Callable[[Path, Path], None], expected: str
) -> None:
    store, outside = _damaged_copy(tiny_zarr_store, tmp_path, damage)
    _check_refused(store, outside, tmp_path, expected)


def _verify_peak_rss(store: Path, log: Path) -> tuple[int, int]:
    """Run ``python -m extract verify`` in a child; return (exit code, peak resident set size in bytes)."""
    with open(log, "wb") as output:
        child = subprocess.Popen(
            [sys.executable, "-m", "extract", "verify", str(store), "--no-progress"],
            stdout=output,
            stderr=subprocess.STDOUT,
            env=child_env(),
        )
        _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    return child.returncode, usage.ru_maxrss * 1024


def test_absurd_sizes_keep_memory_small(tiny_store: Path, tmp_path: Path, reliability_figures: dict[str, str]) -> None:
    baseline_code, baseline = _verify_peak_rss(tiny_store, tmp_path / "baseline.log")
    assert baseline_code == 0, (tmp_path / "baseline.log").read_text()
    peaks = {}
    for name, damage, expected in CASES:
        if name not in ABSURD:
            continue
        store, _ = _damaged_copy(tiny_store, tmp_path / name.replace(" ", "-"), damage)
        log = tmp_path / f"{name.replace(' ', '-')}.log"
        code, peak = _verify_peak_rss(store, log)
        assert code == 1, log.read_text()
        assert expected in log.read_text()
        peaks[name] = peak
        # The claims run from 1 TB to 8 EB; the child may use what a healthy verify uses, plus 64 MiB.
        assert peak < baseline + 64 * 2**20, f"{name}: peak RSS {peak / 2**20:.0f} MiB, healthy verify {baseline / 2**20:.0f} MiB"
    reliability_figures["verify peak RSS, healthy store"] = f"{baseline / 2**20:.0f} MiB"
    reliability_figures["verify peak RSS, absurd-size cases"] = (
        f"{min(peaks.values()) / 2**20:.0f}-{max(peaks.values()) / 2**20:.0f} MiB over {len(peaks)} cases"
    )
