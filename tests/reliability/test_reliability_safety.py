"""Safety: no unsafe deserialisation in the package sources, and fuzzed parsers raise only our errors."""

from __future__ import annotations

import ast
import copy
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_support import tiny_store

from extract.data import ReadStats, read_jsonl
from extract.errors import DataError, UserError
from extract.store.manifest import Manifest, content_fingerprint, parse_manifest

__all__ = ["tiny_store"]

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("extract", "distill", "bench")
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None)


def _name(node: ast.AST) -> str:
    """Dotted name of a call target such as ``torch.load``; empty for anything else."""
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _name(node.value)
        return f"{inner}.{node.attr}" if inner else ""
    return ""


def _keyword_is(call: ast.Call, name: str, value: object) -> bool:
    return any(k.arg == name and isinstance(k.value, ast.Constant) and k.value.value is value for k in call.keywords)


def unsafe_uses(source: str, filename: str) -> list[str]:
    """List unsafe deserialisation and remote-code defaults in one Python source file."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            modules = [alias.name for alias in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: imports {module}" for module in modules if module.split(".")[0] in UNSAFE_MODULES]
        elif isinstance(node, ast.Call):
            name = _name(node.func)
            if name.endswith("torch.load") and not _keyword_is(node, "weights_only", True):
                found.append(f"{where}: {name} without weights_only=True")
            if name.endswith(("numpy.load", "np.load")) and _keyword_is(node, "allow_pickle", True):
                found.append(f"{where}: {name} with allow_pickle=True")
            if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all", "yaml.unsafe_load_all"):
                found.append(f"{where}: {name} (use yaml.safe_load)")
            if _keyword_is(node, "trust_remote_code", True):
                found.append(f"{where}: {name} with a literal trust_remote_code=True")
            if name in ("eval", "exec"):
                found.append(f"{where}: {name}()")
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            arguments = node.args.args + node.args.kwonlyargs
            defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + node.args.kw_defaults
            for argument, default in zip(arguments, defaults):
                if "remote_code" in argument.arg and isinstance(default, ast.Constant) and default.value is True:
                    found.append(f"{where}: {node.name}({argument.arg}=True) by default")
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and "remote_code" in node.target.id:
            if isinstance(node.value, ast.Constant) and node.value.value is True:
                found.append(f"{where}: {node.target.id} = True by default")
    return found


def test_scanner_finds_unsafe_code() -> None:
    sample = "\n".join(
        [
            "import pickle",
            "from joblib import load",
            "import torch, yaml, numpy as np",
            "torch.load('x.pt')",
            "torch.load('x.pt', weights_only=False)",
            "np.load('x.npy', allow_pickle=True)",
            "yaml.load(text)",
            "AutoModel.from_pretrained(path, trust_remote_code=True)",
            "def load_model(path, trust_remote_code=True): pass",
            "class Options:\n    trust_remote_code: bool = True",
            "torch.load('x.pt', weights_only=True)",
            "yaml.safe_load(text)",
        ]
    )
    # One finding on each unsafe line; none on the last two lines, which are safe.
    assert sorted(int(use.split(":")[1]) for use in unsafe_uses(sample, "sample.py")) == [1, 2, 4, 5, 6, 7, 8, 9, 11]


def test_package_sources_have_no_unsafe_loading() -> None:
    files = [path for package in PACKAGES for path in sorted((REPO / package).rglob("*.py"))]
    assert len(files) > 20
    found = [use for path in files for use in unsafe_uses(path.read_text(encoding="utf-8"), str(path.relative_to(REPO)))]
    assert found == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70) | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _check_parse(obj: Any) -> None:
    try:
        manifest = parse_manifest(obj)
    except UserError:
        return
    assert isinstance(manifest, Manifest)
    # What the parser accepts, the writer can write and the parser reads back the same.
    again = parse_manifest(json.loads(json.dumps(manifest.to_json())))
    assert again.to_json() == manifest.to_json()
    content_fingerprint(manifest)


@FUZZ
@given(JSON)
def test_manifest_parser_fuzz_any_json(obj: Any) -> None:
    _check_parse(obj)


def _paths(node: Any, prefix: tuple = ()) -> list[tuple]:
    found = [prefix]
    if isinstance(node, dict):
        for key, value in node.items():
            found += _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            found += _paths(value, (*prefix, index))
    return found


@pytest.fixture(scope="module")
def valid_manifest(tiny_store: Path) -> dict:
    return json.loads((tiny_store / "manifest.json").read_text())


@FUZZ
@given(data=st.data())
def test_manifest_parser_fuzz_mutations(valid_manifest: dict, data: st.DataObject) -> None:
    manifest = copy.deepcopy(valid_manifest)
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(_paths(manifest)[1:]))
        parent = manifest
        for key in path[:-1]:
            parent = parent[key]
        action = data.draw(st.sampled_from(["replace", "delete"]))
        if action == "delete":
            del parent[path[-1]]
        else:
            parent[path[-1]] = data.draw(JSON)
    _check_parse(manifest)


SURPRISES = st.sampled_from(["\ud800", "\udfff", "\x00", "\ufeff", "\u2028", "\n", "\\", '"', "<<1+1=2>>", "\U0001f600"])
STRING = st.lists(st.text(max_size=8) | SURPRISES, max_size=6).map("".join)
FIELD_VALUE = STRING | JSON
ROW = st.dictionaries(st.sampled_from(["question", "answer", "text", "extra"]), FIELD_VALUE, max_size=4)
LINE = st.one_of(
    ROW.map(lambda row: json.dumps(row).encode("utf-8", "surrogatepass")),
    ROW.map(lambda row: json.dumps(row, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    JSON.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=40),
)


@pytest.fixture(scope="module")
def fuzz_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz") / "data.jsonl"


@FUZZ
@given(lines=st.lists(LINE, max_size=6), on_bad_row=st.sampled_from(["error", "skip"]), strip=st.booleans())
def test_jsonl_reader_fuzz(fuzz_file: Path, lines: list[bytes], on_bad_row: str, strip: bool) -> None:
    fuzz_file.write_bytes(b"\n".join(lines))
    stats = ReadStats()
    try:
        rows = read_jsonl(fuzz_file, source=0, split="train", strip=strip, on_bad_row=on_bad_row, max_chars=64, stats=stats)
    except DataError:
        assert on_bad_row == "error"
        return
    for row in rows:
        # Every row the reader returns can be tokenised: non-empty, valid Unicode, bounded.
        assert row.text.strip()
        row.text.encode("utf-8")
        assert len(row.text) <= 64
    assert stats.rows == len(rows)
