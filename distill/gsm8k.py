"""GSM8K scoring: reading problems, taking the answer from a model's output, exact match, Wilson intervals.

A GSM8K reference solution ends with ``#### <number>``. A model's output is scored
in two ways:

- strict: the first number written directly after a ``####`` marker (spaces and a
  ``$`` may sit between them). An output without one has no strict answer.
- flexible: the strict answer when there is one, else the last number in the output.

Only the output before any ``Question:`` is read, because a model that keeps
generating past its answer starts the next problem in the training format.

Numbers may carry a sign (``-`` or the Unicode minus sign), a ``$``, thousands
separators (``1,234``) and decimals. They are compared as exact decimals, so ``18``,
``18.00`` and ``$18`` all match the reference ``18``. Text after the number
(``18 dollars``, ``18.``) is ignored.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from extract.errors import DataError, UserError

# z for a two-sided 95% interval: the 0.975 quantile of the standard normal distribution.
Z_95 = 1.959963984540054
ANSWER_MARKER = "####"
NEXT_QUESTION = "Question:"

# A number not glued to a preceding letter, digit or point, so the 5 of "3-5" reads as 5 and not -5.
_NUMBER = r"(?<![\w.])[-\u2212]?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
_STRICT_RE = re.compile(re.escape(ANSWER_MARKER) + r"[ \t]*\$?[ \t]*(" + _NUMBER + ")")


def parse_number(text: str) -> Decimal:
    """Convert a matched number such as ``-$1,234.50`` to a Decimal."""
    cleaned = text.replace("\u2212", "-").replace("$", "").replace(",", "")
    try:
        return Decimal(cleaned)
    except InvalidOperation:
        raise ValueError(f"not a number: {text!r}") from None


def format_number(value: Decimal) -> str:
    """Write a Decimal without exponent or trailing zeros: ``Decimal('1.50E+3')`` -> ``1500``."""
    text = format(value.normalize(), "f")
    return "0" if text == "-0" else text


def answer_region(output: str) -> str:
    """Return the part of a model output before the next ``Question:``."""
    return output.split(NEXT_QUESTION, 1)[0]


def strict_answer(text: str) -> Decimal | None:
    """Return the first number directly after a ``####`` marker, or None."""
    match = _STRICT_RE.search(answer_region(text))
    return parse_number(match.group(1)) if match else None


def flexible_answer(text: str) -> Decimal | None:
    """Return the strict answer, else the last number in the text, else None."""
    strict = strict_answer(text)
    if strict is not None:
        return strict
    numbers = _NUMBER_RE.findall(answer_region(text))
    return parse_number(numbers[-1]) if numbers else None


def wilson_interval(successes: int, total: int, z: float = Z_95) -> tuple[float, float]:
    """Return the Wilson score interval (low, high) for ``successes`` out of ``total`` trials.

    Unlike the normal approximation, it stays inside [0, 1] and is not empty at 0 or
    ``total`` successes.
    """
    if total < 1:
        raise ValueError(f"total must be at least 1, got {total}")
    if not 0 <= successes <= total:
        raise ValueError(f"successes must be in [0, {total}], got {successes}")
    p = successes / total
    z2 = z * z
    centre = (p + z2 / (2 * total)) / (1 + z2 / total)
    half_width = z / (1 + z2 / total) * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total))
    # At 0 or ``total`` successes the bound is exactly 0 or 1, which rounding would miss.
    low = 0.0 if successes == 0 else centre - half_width
    high = 1.0 if successes == total else centre + half_width
    return low, high


@dataclass(frozen=True)
class Problem:
    """One GSM8K row: its number among non-blank lines, the question and the reference answer."""

    row: int
    question: str
    gold: Decimal


def read_problems(path: Path, limit: int | None = None) -> list[Problem]:
    """Read GSM8K JSONL rows (``question`` and an ``answer`` ending in ``#### N``).

    Raises ``DataError`` naming the line for a row that is not JSON, lacks a field or
    has no ``#### N`` in its answer, and ``UserError`` for a missing or empty file.
    """
    path = Path(path)
    if path.is_dir():
        raise UserError(f"data path {path} is a directory; pass a GSM8K JSONL file")
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    problems: list[Problem] = []
    with open(path, "rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if limit is not None and len(problems) >= limit:
                break
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise DataError(f"{path} line {line_number}: not valid UTF-8 (byte {exc.start}); re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            problems.append(_parse_problem(line, len(problems), f"{path} line {line_number}"))
    if not problems:
        raise UserError(f"data file {path} has no rows; pass a GSM8K JSONL file")
    return problems


def _parse_problem(line: str, row: int, where: str) -> Problem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("question"), str) or not isinstance(obj.get("answer"), str):
        raise DataError(f"{where}: expected an object with string fields 'question' and 'answer'")
    if not obj["question"].strip():
        raise DataError(f"{where}: field 'question' is empty")
    gold = strict_answer(obj["answer"])
    if gold is None:
        raise DataError(f"{where}: the answer has no '#### <number>' line, so there is no reference to compare with")
    return Problem(row=row, question=obj["question"], gold=gold)


def score_output(problem: Problem, output: str) -> dict[str, Any]:
    """Score one model output against the problem's reference: one JSONL row of predictions."""
    strict = strict_answer(output)
    flexible = flexible_answer(output)
    return {
        "row": problem.row,
        "question": problem.question,
        "gold": format_number(problem.gold),
        "output": output,
        "strict": None if strict is None else format_number(strict),
        "flexible": None if flexible is None else format_number(flexible),
        "strict_correct": strict == problem.gold,
        "flexible_correct": flexible == problem.gold,
    }


def summarise(scored: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Count the correct rows and add accuracy with its 95% Wilson interval, for strict and flexible."""
    total = len(scored)
    summary: dict[str, Any] = {"n": total}
    for kind in ("strict", "flexible"):
        correct = sum(1 for row in scored if row[f"{kind}_correct"])
        low, high = wilson_interval(correct, total)
        summary[kind] = {"correct": correct, "accuracy": correct / total, "wilson_95": [low, high]}
    return summary


def format_summary(summary: dict[str, Any]) -> str:
    """Format a summary as one line: n, then each accuracy with its interval."""
    parts = [f"n {summary['n']}"]
    for kind in ("strict", "flexible"):
        figures = summary[kind]
        low, high = figures["wilson_95"]
        parts.append(f"{kind} {figures['correct']}/{summary['n']} = {figures['accuracy']:.4f} (95% CI {low:.4f}-{high:.4f})")
    return ", ".join(parts)
