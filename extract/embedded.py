"""The embedded default: a tiny Qwen2 teacher and student built from the repository's data/.

The embedded models need no download. ``data/models/<role>/config.json`` fixes each
architecture, a fixed seed per role fixes the random initial weights, and
``data/tokenizer`` is the tokenizer trained on the embedded problems in
``data/gsm8k-mini``. A built model is an ordinary Hugging Face checkpoint directory, so
both stages load it through the same ``from_pretrained`` calls as a real checkpoint.

Pass ``embedded-teacher`` or ``embedded-student`` wherever a model name or path goes,
and ``resolve_model_path`` turns it into a built directory, building it on first use.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from extract.errors import UserError

logger = logging.getLogger(__name__)

EMBEDDED_NAME = "embedded"
EMBEDDED_TEACHER = "embedded-teacher"
EMBEDDED_STUDENT = "embedded-student"
ROLES = ("teacher", "student")
SEEDS = {"teacher": 1_000_003, "student": 2_000_003}
CACHE_DIR_ENV = "MERCATOR_CACHE_DIR"
BUILD_RECORD = "embedded-build.json"

# The data/ folder of the source checkout this module belongs to.
_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
# Bump when a change to this builder alters the files it writes, so old builds are redone.
_BUILDER_VERSION = 1
_PROBLEM_SPLITS = ("train", "heldout")


def repo_data_dir() -> Path:
    """Return the repository's ``data/`` directory, the source of the embedded default.

    Raises UserError when it is missing, as in an installed wheel without the source
    checkout: the embedded models are built from files there.
    """
    data_dir = _DATA_DIR
    required = [data_dir / "tokenizer" / "tokenizer.json", *(data_dir / "models" / role / "config.json" for role in ROLES)]
    missing = [str(path) for path in required if not path.is_file()]
    if missing:
        raise UserError(
            f"embedded default files not found: {', '.join(missing)}. The embedded teacher and student are "
            "built from the data/ folder of a mercator-kv source checkout; install with `pip install -e .` "
            "from that checkout, or pass a Hugging Face model name or path instead."
        )
    return data_dir


def embedded_problems_path(split: str) -> Path:
    """Return the path of an embedded problem file, ``data/gsm8k-mini/<split>.jsonl``."""
    if split not in _PROBLEM_SPLITS:
        raise UserError(f"invalid embedded split {split!r}; expected one of {', '.join(_PROBLEM_SPLITS)}")
    return repo_data_dir() / "gsm8k-mini" / f"{split}.jsonl"


def embedded_role(name_or_path: str, role: str | None = None) -> str | None:
    """Return the role ("teacher" or "student") an embedded name stands for, else None.

    ``embedded-teacher`` and ``embedded-student`` name their role. The bare name
    ``embedded`` takes its role from ``role``, which a caller sets from the option the
    name came from (``--teacher`` or ``--student``).
    """
    if name_or_path == EMBEDDED_TEACHER:
        return "teacher"
    if name_or_path == EMBEDDED_STUDENT:
        return "student"
    if name_or_path != EMBEDDED_NAME:
        return None
    if role not in ROLES:
        raise UserError(
            f"the model name {EMBEDDED_NAME!r} needs a role; use {EMBEDDED_TEACHER!r} or {EMBEDDED_STUDENT!r}"
        )
    return role


def default_cache_dir() -> Path:
    """Return the directory for built embedded models: ``$MERCATOR_CACHE_DIR/embedded``
    when that variable is set, else ``<repository>/build/embedded``."""
    override = os.environ.get(CACHE_DIR_ENV)
    if override:
        return Path(override).expanduser() / "embedded"
    return repo_data_dir().parent / "build" / "embedded"


def resolve_model_path(name_or_path: str, cache_dir: Path | None = None, *, role: str | None = None) -> str:
    """Return a model directory for ``name_or_path``, building an embedded model if needed.

    Anything but an embedded name is returned unchanged. An embedded name resolves to
    ``<cache_dir>/<role>`` (``cache_dir`` defaults to ``default_cache_dir()``). An
    existing build there is reused when its build record matches the current config,
    tokenizer and seed, and rebuilt otherwise. ``role`` resolves the bare name
    ``embedded``, see ``embedded_role``.
    """
    resolved_role = embedded_role(name_or_path, role)
    if resolved_role is None:
        return name_or_path

    model_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()) / resolved_role
    if _is_current_build(model_dir, resolved_role):
        logger.debug("reusing embedded %s in %s", resolved_role, model_dir)
        return str(model_dir)

    build_embedded_model(resolved_role, model_dir)
    return str(model_dir)


def build_embedded_model(role: str, out_dir: Path, seed: int | None = None) -> Path:
    """Build the embedded ``role`` model with random weights and save it to ``out_dir``.

    The weights depend only on the role's config and ``seed`` (default ``SEEDS[role]``),
    so two builds give identical tensors. The directory gets ``config.json``,
    ``model.safetensors``, the tokenizer files and a build record. It is written under a
    temporary name beside ``out_dir`` and renamed into place when complete, replacing
    any previous ``out_dir``, so no reader sees a half-written model. The caller's torch
    random state is left unchanged.
    """
    from transformers import AutoConfig, AutoTokenizer, Qwen2ForCausalLM

    if role not in ROLES:
        raise UserError(f"invalid embedded model role {role!r}; expected one of {', '.join(ROLES)}")
    seed = SEEDS[role] if seed is None else seed
    data_dir = repo_data_dir()
    config = AutoConfig.from_pretrained(data_dir / "models" / role)
    tokenizer = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    _check_config_matches_tokenizer(role, config, tokenizer)

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    logger.info("building embedded %s (seed %d) in %s", role, seed, out_dir)
    staging_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    # mkdtemp creates the directory private (0700), and a shared cache must stay readable.
    staging_dir.chmod(0o755)
    try:
        with _float32_default(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(config)
        model.eval()
        model.save_pretrained(staging_dir, safe_serialization=True)
        tokenizer.save_pretrained(staging_dir)
        record = _build_record(role, seed)
        (staging_dir / BUILD_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _move_into_place(staging_dir, out_dir)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    return out_dir


def _check_config_matches_tokenizer(role: str, config: Any, tokenizer: Any) -> None:
    if config.vocab_size != len(tokenizer):
        raise UserError(
            f"data/models/{role}/config.json has vocab_size {config.vocab_size} but data/tokenizer has "
            f"{len(tokenizer)} tokens; set vocab_size to {len(tokenizer)} after retraining the tokenizer"
        )
    for field in ("eos_token_id", "pad_token_id"):
        expected = getattr(tokenizer, field)
        if getattr(config, field) != expected:
            raise UserError(f"data/models/{role}/config.json has {field} {getattr(config, field)}; set it to {expected}")


@contextlib.contextmanager
def _float32_default() -> Iterator[None]:
    """Initialise in float32 even when the caller changed torch's default dtype, because
    the same seed gives different weights in another dtype."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _build_record(role: str, seed: int) -> dict[str, Any]:
    """Describe the inputs of a build, so a later run can tell whether it is still current."""
    data_dir = repo_data_dir()
    return {
        "builder_version": _BUILDER_VERSION,
        "role": role,
        "seed": seed,
        "config_sha256": _sha256(data_dir / "models" / role / "config.json"),
        "tokenizer_sha256": _sha256(data_dir / "tokenizer" / "tokenizer.json"),
        "tokenizer_config_sha256": _sha256(data_dir / "tokenizer" / "tokenizer_config.json"),
    }


def _is_current_build(model_dir: Path, role: str) -> bool:
    """Return True when ``model_dir`` contains a complete build of the current inputs.

    A build from another config, tokenizer, seed or builder version is stale.
    """
    record_path = model_dir / BUILD_RECORD
    if not (record_path.is_file() and (model_dir / "config.json").is_file()):
        return False
    if not (model_dir / "model.safetensors").is_file():
        return False
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("rebuilding embedded %s: unreadable build record %s (%s)", role, record_path, error)
        return False
    if record != _build_record(role, SEEDS[role]):
        logger.info("rebuilding embedded %s in %s: its config, tokenizer or seed changed", role, model_dir)
        return False
    return True


def _move_into_place(staging_dir: Path, out_dir: Path) -> None:
    """Rename ``staging_dir`` to ``out_dir``, first moving any old ``out_dir`` aside.

    When another process renames its own build into place between the two renames, the
    second rename fails because the target exists, and the other build is kept:
    ``resolve_model_path`` builds from the same inputs in every process.
    """
    old_dir = None
    if out_dir.exists():
        old_dir = out_dir.with_name(f"{staging_dir.name}.old")
        os.rename(out_dir, old_dir)
    try:
        os.rename(staging_dir, out_dir)
    except OSError:
        if not out_dir.is_dir():
            raise
        logger.info("another process built %s first; keeping its build", out_dir)
        shutil.rmtree(staging_dir, ignore_errors=True)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
