"""Input data: GSM8K-style JSONL rows (or rows with a ``text`` field) to token ids.

Both stages must see identical token ids, so the text template, the annotation stripping
and the end-of-sequence rule are fixed here and recorded in the store's manifest.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from extract.errors import DataError

logger = logging.getLogger(__name__)

GSM8K_TEMPLATE = "Question: {question}\nAnswer: {answer}"
GSM8K_PROMPT = "Question: {question}\nAnswer:"
_ANNOTATION = re.compile(r"<<[^<>]*>>")
BAD_ROW_POLICIES = ("error", "skip")
LONG_SAMPLE_POLICIES = ("truncate", "skip", "error")
# Characters kept per allowed token before tokenising: a bound on the work a single
# huge line can cause. Byte-level BPE tokens are far shorter than this on real text.
_CHARS_PER_TOKEN_BOUND = 64
# A line is read into memory only up to max(_MIN_LINE_BYTES, _LINE_BYTES_PER_CHAR * max_chars)
# bytes. A longer line is a bad row, skipped without being read whole. The bound leaves
# room for JSON escapes (up to 12 bytes per character) and fields that are not rendered.
_MIN_LINE_BYTES = 16 * 1024 * 1024
_LINE_BYTES_PER_CHAR = 16
_UTF8_BOM = b"\xef\xbb\xbf"
_LOGGED_SKIPS = 20


def strip_annotations(text: str) -> str:
    """Remove GSM8K calculator annotations such as ``<<48/2=24>>``."""
    return _ANNOTATION.sub("", text)


@dataclass(frozen=True)
class InputRow:
    """One usable input row: where it came from, its split and its text.

    ``answer_char`` is the index in ``text`` of the answer's first character: the
    length of the rendered ``Question: ...\nAnswer: `` prefix for a GSM8K row, and 0 for
    a ``text`` row, whose every token is a target.
    """

    source: int
    row: int
    split: str
    text: str
    answer_char: int = 0
    line: int = 0


@dataclass
class ReadStats:
    """Counts of what reading the inputs kept and skipped."""

    rows: int = 0
    blank: int = 0
    skipped: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str, detail: str) -> None:
        """Count a skipped row; log the first ``_LOGGED_SKIPS`` of them, then only count."""
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        total = sum(self.skipped.values())
        if total <= _LOGGED_SKIPS:
            logger.warning("skipping %s", detail)
        if total == _LOGGED_SKIPS:
            logger.warning("further skipped rows are counted in the summary but not logged")


def format_row(obj: Any, *, strip: bool) -> str:
    """Render one decoded JSON row as training text, or raise ``ValueError`` with the reason."""
    return render_row(obj, strip=strip)[0]


def render_row(obj: Any, *, strip: bool) -> tuple[str, int]:
    """Render one decoded JSON row as (training text, index of the answer's first character).

    Raise ``ValueError`` with the reason when the row is unusable.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    if "question" in obj or "answer" in obj:
        question, answer = (_string_field(obj, name) for name in ("question", "answer"))
        if strip:
            answer = strip_annotations(answer)
        text = GSM8K_TEMPLATE.format(question=question.strip(), answer=answer.strip())
        prefix = GSM8K_TEMPLATE.split("{answer}")[0].format(question=question.strip())
        return text, len(prefix)
    if "text" in obj:
        return _string_field(obj, "text"), 0
    raise ValueError(f"no 'question'/'answer' or 'text' field (keys: {sorted(obj)[:5]})")


def _string_field(obj: dict[str, Any], name: str) -> str:
    if name not in obj:
        raise ValueError(f"field '{name}' is missing")
    value = obj[name]
    if not isinstance(value, str):
        raise ValueError(f"field '{name}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"field '{name}' is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON may escape a lone UTF-16 surrogate ("\\ud800"), which no tokenizer accepts.
        raise ValueError(f"field '{name}' contains an unpaired surrogate {value[exc.start]!r}, which is not valid Unicode") from None
    return value


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def read_jsonl(
    path: Path,
    *,
    source: int,
    split: str,
    strip: bool,
    on_bad_row: str,
    max_chars: int,
    stats: ReadStats,
    limit: int | None = None,
) -> list[InputRow]:
    """Read one JSONL file; rows are numbered from 0 among non-blank lines, as GSM8K tools do.

    Memory stays bounded whatever the file holds: a line longer than the line limit is a
    bad row and is skipped in blocks, never read whole.
    """
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    max_line_bytes = max(_MIN_LINE_BYTES, _LINE_BYTES_PER_CHAR * max_chars)
    rows: list[InputRow] = []
    row = 0
    line_number = 0
    with open(path, "rb") as handle:
        while limit is None or len(rows) < limit:
            raw = handle.readline(max_line_bytes + 1)
            if not raw:
                break
            line_number += 1
            if line_number == 1 and raw.startswith(_UTF8_BOM):
                raw = raw[len(_UTF8_BOM) :]
            if len(raw) > max_line_bytes:
                _skip_rest_of_line(handle, raw)
                reason, detail = "line too long", f"line is longer than {max_line_bytes} bytes, the limit for one row"
            elif not raw.strip():
                stats.blank += 1
                continue
            else:
                try:
                    text, answer_char = render_row(json.loads(raw.rstrip(b"\r\n").decode("utf-8")), strip=strip)
                except UnicodeDecodeError as exc:
                    reason, detail = "not UTF-8", f"bytes are not valid UTF-8 at offset {exc.start}"
                except json.JSONDecodeError as exc:
                    reason, detail = "invalid JSON", f"invalid JSON ({exc.msg} at column {exc.colno})"
                except (ValueError, RecursionError) as exc:
                    reason, detail = "invalid row", str(exc)
                else:
                    # A cut that removes the whole answer leaves answer_char past the end of
                    # the text, so tokenize_rows gives that sample no answer tokens.
                    rows.append(InputRow(source, row, split, text[:max_chars], answer_char, line_number))
                    row += 1
                    continue
            if on_bad_row == "error":
                raise DataError(f"{path} line {line_number}: {detail}; fix the row or pass --skip-bad-rows")
            stats.skip(reason, f"{path} line {line_number}: {detail}")
            row += 1
    stats.rows += len(rows)
    return rows


def _skip_rest_of_line(handle: Any, start: bytes) -> None:
    block = start
    while block and not block.endswith(b"\n"):
        block = handle.readline(1 << 20)


def drop_duplicates(rows: list[InputRow], paths: Sequence[Path], *, on_bad_row: str, stats: ReadStats) -> list[InputRow]:
    """Keep the first of rows whose text is identical, across all inputs; a repeat is a bad row.

    A repeat inside the training rows weights one problem twice, and a held-out row that
    repeats a training row makes the held-out figures measure memory, not alignment.
    """
    first_seen: dict[str, InputRow] = {}
    unique_rows = []
    for row in rows:
        first = first_seen.setdefault(row.text, row)
        if first is row:
            unique_rows.append(row)
            continue
        detail = f"{paths[row.source]} line {row.line} repeats {paths[first.source]} line {first.line}"
        if on_bad_row == "error":
            raise DataError(f"{detail}; remove the repeat or pass --skip-bad-rows")
        stats.skip("duplicate", detail)
    stats.rows -= len(rows) - len(unique_rows)
    return unique_rows


def assign_heldout(rows: list[InputRow], fraction: float, seed: int) -> list[InputRow]:
    """Mark round(fraction * n) rows (at least one when fraction > 0 and n > 1) as held out, by a seeded draw."""
    if not 0.0 <= fraction < 1.0:
        raise DataError(f"--heldout-fraction {fraction} must be in [0, 1)")
    count = round(fraction * len(rows))
    if fraction > 0 and len(rows) > 1:
        count = max(count, 1)
    chosen = set(random.Random(seed).sample(range(len(rows)), count)) if count else set()
    return [replace(r, split="heldout") if i in chosen else r for i, r in enumerate(rows)]


@dataclass(frozen=True)
class TokenizedSample:
    """A row's token ids, truncated to the maximum length, ready to run through the teacher.

    ``answer_start`` is the index of the first answer token: 0 for a ``text`` row, and
    ``len(token_ids)`` for a GSM8K row truncated before its answer.
    """

    source: int
    row: int
    split: str
    token_ids: tuple[int, ...]
    answer_start: int = 0


@dataclass
class TokenizeStats:
    truncated: int = 0
    skipped_long: int = 0


def tokenize_rows(
    rows: Sequence[InputRow],
    tokenizer: Any,
    *,
    max_length: int,
    on_long: str,
    append_eos: bool,
    stats: TokenizeStats,
    paths: Sequence[Path] = (),
    batch_size: int = 1024,
) -> list[TokenizedSample]:
    """Tokenise rows with the teacher's tokenizer: the template text, then EOS when requested.

    Each sample's answer start comes from the tokenizer's offset mapping: it is the first
    token whose character span ends inside the answer, so a BPE token that merges the
    space before the answer with its first word counts as an answer token. ``paths``
    (input files by source index) name the file in messages about a row.
    """
    eos = tokenizer.eos_token_id if append_eos else None
    if append_eos and eos is None:
        raise DataError("the tokenizer has no eos_token_id; pass --no-append-eos")
    samples = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        encoded = _encode(tokenizer, chunk)
        for row, (ids, offsets) in zip(chunk, encoded):
            answer_start = _first_answer_token(offsets, row.answer_char)
            ids = list(ids) + ([eos] if eos is not None else [])
            if answer_start is None:
                answer_start = len(ids)
            if len(ids) > max_length:
                where = f"{paths[row.source]} line {row.line}" if row.source < len(paths) else f"source {row.source} row {row.row}"
                if on_long == "error":
                    raise DataError(
                        f"{where}: {len(ids)} tokens exceed --max-length {max_length}; "
                        "raise --max-length or pass --on-long truncate/skip"
                    )
                if on_long == "skip":
                    logger.debug("skipping %s: %d tokens exceed --max-length %d", where, len(ids), max_length)
                    stats.skipped_long += 1
                    continue
                stats.truncated += 1
                ids = ids[:max_length]
            if not ids:
                continue
            sample = TokenizedSample(row.source, row.row, row.split, tuple(ids), min(answer_start, len(ids)))
            samples.append(sample)
    return samples


def _encode(tokenizer: Any, rows: Sequence[InputRow]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """Return each row's token ids with their (start, end) character spans in the row's text."""
    texts = [r.text for r in rows]
    if not getattr(tokenizer, "is_fast", False):
        if any(r.answer_char for r in rows):
            raise DataError(
                f"tokenizer {type(tokenizer).__name__} has no offset mapping, which locating answer tokens "
                "needs; use a checkpoint that ships a fast tokenizer (tokenizer.json)"
            )
        encoded = tokenizer(texts, add_special_tokens=True)["input_ids"]
        return [(list(ids), []) for ids in encoded]
    encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=True)
    return [(list(ids), list(spans)) for ids, spans in zip(encoded["input_ids"], encoded["offset_mapping"])]


def _first_answer_token(offsets: Sequence[tuple[int, int]], answer_char: int) -> int | None:
    """Index of the first token that ends after ``answer_char``; None when no token reaches the answer.

    Special tokens have the span (0, 0), so a leading BOS never counts as an answer token.
    """
    if answer_char == 0:
        return 0
    for index, (_, end) in enumerate(offsets):
        if end > answer_char:
            return index
    return None


def dataset_fingerprint(sources: list[dict[str, Any]], options: dict[str, Any]) -> str:
    """Hash the input files' contents and every option that changes which tokens are produced."""
    payload = json.dumps({"sources": [s["sha256"] for s in sources], "options": options}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def max_chars_for(max_length: int) -> int:
    return max_length * _CHARS_PER_TOKEN_BOUND
