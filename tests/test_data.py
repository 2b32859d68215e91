"""Tests for reading input rows: the GSM8K template, text rows, truncation, held-out draw."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from extract.data import (
    GSM8K_TEMPLATE,
    InputRow,
    ReadStats,
    TokenizeStats,
    assign_heldout,
    format_row,
    read_jsonl,
    strip_annotations,
    tokenize_rows,
)
from extract.errors import DataError

GSM8K_ROW = {
    "question": "  Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. ",
    "answer": "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72\n",
}


@pytest.fixture(scope="module")
def tokenizer(teacher_path):
    return AutoTokenizer.from_pretrained(teacher_path)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def read(path: Path, **overrides) -> tuple[list[InputRow], ReadStats]:
    stats = ReadStats()
    options = dict(source=0, split="train", strip=False, on_bad_row="error", max_chars=10_000, stats=stats)
    options.update(overrides)
    return read_jsonl(path, **options), stats


# Templates.


def test_gsm8k_template():
    text = format_row(GSM8K_ROW, strip=False)
    assert text == (
        "Question: Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May.\n"
        "Answer: Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips.\n#### 72"
    )
    assert GSM8K_TEMPLATE == "Question: {question}\nAnswer: {answer}"


def test_gsm8k_template_strips_annotations():
    text = format_row(GSM8K_ROW, strip=True)
    assert text.endswith("Answer: Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips.\n#### 72")
    assert "<<" not in text


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("<<48/2=24>>24", "24"),
        ("$<<1404/3=468>>468 and <<2*3=6>>6", "$468 and 6"),
        ("no annotation << here", "no annotation << here"),
        ("<<>>", ""),
        ("#### 72", "#### 72"),
    ],
)
def test_strip_annotations(before, after):
    assert strip_annotations(before) == after


def test_text_row_is_verbatim():
    assert format_row({"text": "  any text, kept as is \n"}, strip=True) == "  any text, kept as is \n"


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "Q?"}, "field 'answer' is missing"),
        ({"question": "Q?", "answer": 7}, "field 'answer' must be a string, got int"),
        ({"question": " ", "answer": "A"}, "field 'question' is empty"),
        ({"question": "Q?", "answer": ""}, "field 'answer' is empty"),
        ({"text": ["a"]}, "field 'text' must be a string"),
        ({"text": "  "}, "field 'text' is empty"),
        ({"prompt": "Q?"}, "no 'question'/'answer' or 'text' field (keys: ['prompt'])"),
        ([1, 2], "expected a JSON object, got list"),
    ],
)
def test_invalid_rows(row, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        format_row(row, strip=False)


# Reading files.


def test_read_jsonl_rows_and_blank_lines(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps(GSM8K_ROW), "", json.dumps({"text": "plain"}), "   "])
    rows, stats = read(path, source=1, split="heldout")

    assert [(r.source, r.row, r.split) for r in rows] == [(1, 0, "heldout"), (1, 1, "heldout")]
    assert rows[1].text == "plain"
    assert (stats.rows, stats.blank, stats.skipped) == (2, 2, {})


def test_read_jsonl_limit(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps({"text": f"row {i}"}) for i in range(10)])
    rows, _ = read(path, limit=4)
    assert [r.text for r in rows] == ["row 0", "row 1", "row 2", "row 3"]


def test_read_jsonl_invalid_json_names_line(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps({"text": "a"}), "", "{broken", json.dumps({"text": "b"})])
    with pytest.raises(DataError, match=rf"{path} line 3: invalid JSON \(.* at column 2\); fix the row or pass --skip-bad-rows"):
        read(path)


def test_read_jsonl_skip_keeps_row_numbers(tmp_path):
    path = write_jsonl(
        tmp_path / "data.jsonl",
        [json.dumps({"text": "a"}), "{broken", json.dumps({"prompt": "x"}), json.dumps({"text": "d"})],
    )
    path.write_bytes(path.read_bytes() + b'{"text": "\xff"}\n')
    rows, stats = read(path, on_bad_row="skip")

    # Skipped rows keep their numbers, so row numbers stay line positions among non-blank lines.
    assert [(r.row, r.text) for r in rows] == [(0, "a"), (3, "d")]
    assert stats.skipped == {"invalid JSON": 1, "invalid row": 1, "not UTF-8": 1}


def test_read_jsonl_missing_file(tmp_path):
    with pytest.raises(DataError, match=r"data file not found: .*absent.jsonl"):
        read(tmp_path / "absent.jsonl")


def test_read_jsonl_caps_characters(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", [json.dumps({"text": "x" * 500})])
    rows, _ = read(path, max_chars=64)
    assert rows[0].text == "x" * 64


# Tokenising.


def _rows(texts: list[str]) -> list[InputRow]:
    return [InputRow(0, i, "train", text) for i, text in enumerate(texts)]


def test_tokenize_appends_eos(tokenizer):
    stats = TokenizeStats()
    samples = tokenize_rows(_rows(["Question: 1+1?\nAnswer: 2"]), tokenizer, max_length=512, on_long="truncate", append_eos=True, stats=stats)
    expected = tokenizer("Question: 1+1?\nAnswer: 2")["input_ids"] + [tokenizer.eos_token_id]
    assert list(samples[0].token_ids) == expected
    without = tokenize_rows(_rows(["Question: 1+1?\nAnswer: 2"]), tokenizer, max_length=512, on_long="truncate", append_eos=False, stats=stats)
    assert list(without[0].token_ids) == expected[:-1]


def test_tokenize_truncation_count(tokenizer):
    texts = [format_row(GSM8K_ROW, strip=False), "Answer: 2", format_row(GSM8K_ROW, strip=True)]
    lengths = [len(tokenizer(t)["input_ids"]) + 1 for t in texts]
    limit = 12
    assert lengths[1] <= limit < min(lengths[0], lengths[2])
    stats = TokenizeStats()

    samples = tokenize_rows(_rows(texts), tokenizer, max_length=limit, on_long="truncate", append_eos=True, stats=stats)
    assert stats.truncated == 2
    assert [len(s.token_ids) for s in samples] == [limit, lengths[1], limit]
    assert list(samples[0].token_ids) == tokenizer(texts[0])["input_ids"][:limit]


def test_tokenize_skip_and_error_long(tokenizer):
    texts = [format_row(GSM8K_ROW, strip=False), "Answer: 2"]
    stats = TokenizeStats()
    kept_samples = tokenize_rows(_rows(texts), tokenizer, max_length=12, on_long="skip", append_eos=True, stats=stats)
    assert [s.row for s in kept_samples] == [1]
    assert (stats.skipped_long, stats.truncated) == (1, 0)

    with pytest.raises(DataError, match=r"source 0 row 0: \d+ tokens exceed --max-length 12"):
        tokenize_rows(_rows(texts), tokenizer, max_length=12, on_long="error", append_eos=True, stats=TokenizeStats())


# Held-out draw.


def test_heldout_deterministic_by_seed():
    rows = _rows([f"row {i}" for i in range(40)])
    first = assign_heldout(rows, 0.25, seed=7)
    again = assign_heldout(rows, 0.25, seed=7)
    other = assign_heldout(rows, 0.25, seed=8)

    heldout = [r.row for r in first if r.split == "heldout"]
    assert heldout == [r.row for r in again if r.split == "heldout"]
    assert heldout != [r.row for r in other if r.split == "heldout"]
    assert len(heldout) == 10
    assert [r.text for r in first] == [r.text for r in rows]
    assert all(r.split == "train" for r in rows)


@pytest.mark.parametrize(("count", "fraction", "expected"), [(20, 0.2, 4), (20, 0.0, 0), (20, 0.01, 1), (1, 0.5, 0), (7, 0.5, 4)])
def test_heldout_count(count, fraction, expected):
    rows = assign_heldout(_rows([f"row {i}" for i in range(count)]), fraction, seed=0)
    assert sum(r.split == "heldout" for r in rows) == expected


@pytest.mark.parametrize("fraction", [1.0, -0.1])
def test_heldout_fraction_out_of_range(fraction):
    with pytest.raises(DataError, match=rf"--heldout-fraction {fraction} must be in \[0, 1\)"):
        assign_heldout(_rows(["a", "b"]), fraction, seed=0)
