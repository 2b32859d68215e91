"""Tests for GSM8K answer extraction, scoring and Wilson intervals."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest

from distill.gsm8k import (
    Problem,
    flexible_answer,
    format_number,
    format_summary,
    read_problems,
    score_output,
    strict_answer,
    summarise,
    wilson_interval,
)
from extract.errors import DataError, UserError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so she makes 18 dollars.\n#### 18", "18"),
        ("#### 1,234", "1234"),
        ("#### 1,234,567", "1234567"),
        ("#### $5", "5"),
        ("#### $ 1,000.50", "1000.5"),
        ("#### -3", "-3"),
        ("#### \u221212", "-12"),
        ("#### -$7.25", "-7.25"),
        ("#### 2.50", "2.5"),
        ("#### 0.125", "0.125"),
        ("#### 18 dollars per day", "18"),
        ("#### 18.", "18"),
        ("#### 18%", "18"),
        ("####18", "18"),
        ("#### 5\n#### 6", "5"),
        ("#### unknown\n#### 7", "7"),
        ("It is 9.\n#### 12 Question: Tom has 3 apples.\n#### 3", "12"),
    ],
)
def test_strict_answer_values(text, expected):
    assert strict_answer(text) == Decimal(expected)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "The answer is 42",
        "#### forty-two",
        "####\n42",
        "The total is 5.\nQuestion: Ann has 3 pens.\n#### 3",
    ],
)
def test_strict_answer_missing(text):
    assert strict_answer(text) is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("The answer is 42", "42"),
        ("3 + 4 = 7, so 7 apples", "7"),
        ("Pays $1,200 in total.", "1200"),
        ("the change is -4 degrees", "-4"),
        ("from 3-5 people", "5"),
        ("it costs 2.75 each", "2.75"),
        ("#### 5 but later 6", "5"),
        ("The answer is 8.\nQuestion: Bo buys 99 cups.", "8"),
        ("1, 2, 3", "3"),
    ],
)
def test_flexible_answer_values(text, expected):
    assert flexible_answer(text) == Decimal(expected)


@pytest.mark.parametrize("text", ["", "no digits here", "abc123", "Question: 7 cats"])
def test_flexible_answer_missing(text):
    assert flexible_answer(text) is None


@pytest.mark.parametrize(
    ("value", "text"),
    [("1.50E+3", "1500"), ("18.00", "18"), ("-0.0", "0"), ("0.125", "0.125"), ("-7", "-7")],
)
def test_format_number(value, text):
    assert format_number(Decimal(value)) == text


def test_score_output_matches_numerically():
    problem = Problem(row=3, question="How much?", gold=Decimal("1000"))
    row = score_output(problem, "It costs $1,000.00 in all.\n#### $1,000.00")
    assert row["gold"] == "1000"
    assert row["strict"] == "1000"
    assert row["strict_correct"] is True
    assert row["flexible_correct"] is True
    assert row["row"] == 3


def test_score_output_flexible_only():
    problem = Problem(row=0, question="How many?", gold=Decimal("-4"))
    row = score_output(problem, "The temperature drops to -4 degrees")
    assert row["strict"] is None
    assert row["strict_correct"] is False
    assert row["flexible"] == "-4"
    assert row["flexible_correct"] is True


def test_score_output_no_answer():
    problem = Problem(row=0, question="How many?", gold=Decimal("4"))
    row = score_output(problem, "I do not know")
    assert row["strict"] is None
    assert row["flexible"] is None
    assert row["flexible_correct"] is False


# Wilson intervals, checked against published values for 95% coverage.


@pytest.mark.parametrize(
    ("successes", "total", "low", "high"),
    [(0, 10, 0.0, 0.2775), (5, 10, 0.2366, 0.7634), (10, 10, 0.7225, 1.0), (81, 100, 0.7222, 0.8749), (1, 1, 0.2065, 1.0)],
)
def test_wilson_known_values(successes, total, low, high):
    got_low, got_high = wilson_interval(successes, total)
    assert got_low == pytest.approx(low, abs=5e-5)
    assert got_high == pytest.approx(high, abs=5e-5)


def test_wilson_exact_ends():
    assert wilson_interval(0, 7)[0] == 0.0
    assert wilson_interval(7, 7)[1] == 1.0


@pytest.mark.parametrize(("successes", "total"), [(0, 0), (-1, 10), (11, 10)])
def test_wilson_rejects_bad_counts(successes, total):
    with pytest.raises(ValueError):
        wilson_interval(successes, total)


def test_summarise_counts_and_intervals():
    rows = [{"strict_correct": i < 5, "flexible_correct": i < 8} for i in range(10)]
    summary = summarise(rows)
    assert summary["n"] == 10
    assert summary["strict"]["correct"] == 5
    assert summary["strict"]["accuracy"] == 0.5
    assert summary["strict"]["wilson_95"][0] == pytest.approx(0.2366, abs=5e-5)
    assert summary["flexible"]["correct"] == 8
    line = format_summary(summary)
    assert line.startswith("n 10, strict 5/10 = 0.5000 (95% CI 0.2366-0.7634)")


# Reading problem files.


def _write_rows(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def test_read_problems_gold_and_limit(tmp_path):
    rows = [json.dumps({"question": f"Q{i}?", "answer": f"work\n#### {i},000"}) for i in range(5)]
    path = _write_rows(tmp_path / "data.jsonl", [rows[0], "", *rows[1:]])
    problems = read_problems(path, limit=3)
    assert [p.row for p in problems] == [0, 1, 2]
    assert [p.gold for p in problems] == [Decimal(0), Decimal(1000), Decimal(2000)]
    assert problems[1].question == "Q1?"


def test_read_problems_bad_json(tmp_path):
    path = _write_rows(tmp_path / "data.jsonl", [json.dumps({"question": "Q?", "answer": "#### 1"}), "{not json"])
    with pytest.raises(DataError, match="line 2: invalid JSON"):
        read_problems(path)


def test_read_problems_answer_without_marker(tmp_path):
    path = _write_rows(tmp_path / "data.jsonl", [json.dumps({"question": "Q?", "answer": "It is 4."})])
    with pytest.raises(DataError, match="line 1: the answer has no '#### <number>'"):
        read_problems(path)


def test_read_problems_missing_field(tmp_path):
    path = _write_rows(tmp_path / "data.jsonl", [json.dumps({"text": "Q? 4"})])
    with pytest.raises(DataError, match="string fields 'question' and 'answer'"):
        read_problems(path)


def test_read_problems_empty_file(tmp_path):
    path = _write_rows(tmp_path / "data.jsonl", [""])
    with pytest.raises(UserError, match="has no rows"):
        read_problems(path)


def test_read_problems_missing_file(tmp_path):
    with pytest.raises(UserError, match="data file not found"):
        read_problems(tmp_path / "absent.jsonl")


def test_real_gsm8k_golds_parse(real_gsm8k):
    problems = read_problems(real_gsm8k)
    assert len(problems) == 1319
    assert problems[0].gold == Decimal(18)


def test_read_problems_rejects_non_utf8(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b'{"question": "Q?", "answer": "#### 1"}\n{"question": "\xff", "answer": "#### 2"}\n')
    with pytest.raises(DataError, match=r"line 2: not valid UTF-8"):
        read_problems(path)


def test_read_problems_rejects_directory(tmp_path):
    with pytest.raises(UserError, match="is a directory"):
        read_problems(tmp_path)
