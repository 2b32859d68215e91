"""Hostile input data for extract: each case is a clear one-line error, or with --skip-bad-rows a counted skip.

Every case runs the real ``extract run`` command on a real JSONL file and checks that it
never prints a traceback and never leaves a store behind after refusing its input.
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest
from reliability_support import error_line, invoke, reliability_figures

from extract.cli import main as extract_main
from extract.data import ReadStats, read_jsonl
from extract.store import open_store
from extract.store.verify import verify_store

__all__ = ["reliability_figures"]

GOOD = [
    {"question": "Tom has 3 apples and buys 4 more. How many apples does he have?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
    {"question": "A box holds 6 pens. How many pens are in 2 boxes?", "answer": "6 * 2 = <<6*2=12>>12\n#### 12"},
    {"question": "Sam reads 5 pages a day. How many pages in 3 days?", "answer": "5 * 3 = <<5*3=15>>15\n#### 15"},
]
GOOD_LINES = [json.dumps(row).encode() + b"\n" for row in GOOD]
MiB = 2**20


def _write(path: Path, *lines: bytes) -> Path:
    path.write_bytes(b"".join(lines))
    return path


def _huge_line(path: Path, size: int, before: list[bytes] = (), after: list[bytes] = ()) -> Path:
    """Write a file whose line after ``before`` is one JSON row of ``size`` bytes, written in blocks."""
    with open(path, "wb") as handle:
        handle.writelines(before)
        handle.write(b'{"question": "')
        block = b"x" * MiB
        for _ in range(size // MiB):
            handle.write(block)
        handle.write(b'", "answer": "y"}\n')
        handle.writelines(after)
    return path


def _extract(teacher_path: str, data: Path, out: Path, *extra: str):
    return invoke(
        extract_main, "run", "--teacher", teacher_path, "--data", data, "--out", out, "--device", "cpu", "--no-progress", *extra
    )


# (case id, file lines, text the error line must contain)
REFUSED = [
    ("empty file", [], "no usable rows in"),
    ("blank lines only", [b"\n", b"   \n", b"\r\n"], "no usable rows in"),
    ("invalid JSON", [*GOOD_LINES, b'{"question": "x", \n'], "line 4: invalid JSON (Expecting property name enclosed in double quotes at column 19)"),
    ("missing field", [b'{"question": "How many?"}\n'], "line 1: field 'answer' is missing"),
    ("non-string field", [b'{"question": 7, "answer": "7"}\n'], "line 1: field 'question' must be a string, got int"),
    ("null text", [b'{"text": null}\n'], "line 1: field 'text' must be a string, got NoneType"),
    ("no known field", [b'{"prompt": "x"}\n'], "line 1: no 'question'/'answer' or 'text' field"),
    ("not an object", [b"[1, 2]\n"], "line 1: expected a JSON object, got list"),
    ("non-UTF-8 bytes", [GOOD_LINES[0], b'{"text": "caf\xe9"}\n'], "line 2: bytes are not valid UTF-8 at offset 13"),
    ("empty question", [b'{"question": "  ", "answer": "4"}\n'], "line 1: field 'question' is empty"),
    ("unpaired surrogate", [b'{"text": "ab\\ud800cd"}\n'], "line 1: field 'text' contains an unpaired surrogate '\\ud800'"),
    ("deep nesting", [b"[" * 100_000 + b"]" * 100_000 + b"\n"], "line 1: "),
    ("duplicate rows", [GOOD_LINES[0], GOOD_LINES[1], GOOD_LINES[0]], "line 3 repeats"),
]


@pytest.mark.parametrize("lines, expected", [case[1:] for case in REFUSED], ids=[case[0] for case in REFUSED])
def test_bad_input_refused(teacher_path: str, tmp_path: Path, lines: list[bytes], expected: str) -> None:
    data = _write(tmp_path / "data.jsonl", *lines)
    result = _extract(teacher_path, data, tmp_path / "store")
    assert result.exit_code == 2
    assert expected in error_line(result)
    assert not (tmp_path / "store" / "manifest.json").exists()


def test_missing_data_file_refused(teacher_path: str, tmp_path: Path) -> None:
    result = _extract(teacher_path, tmp_path / "absent.jsonl", tmp_path / "store")
    assert result.exit_code == 2
    assert f"data file not found: {tmp_path / 'absent.jsonl'}" in error_line(result)


def test_heldout_repeating_train_refused(teacher_path: str, tmp_path: Path) -> None:
    train = _write(tmp_path / "train.jsonl", *GOOD_LINES)
    heldout = _write(tmp_path / "heldout.jsonl", GOOD_LINES[1])
    result = _extract(teacher_path, train, tmp_path / "store", "--heldout", str(heldout))
    assert result.exit_code == 2
    assert f"{heldout} line 1 repeats {train} line 2" in error_line(result)


def test_huge_line_refused(teacher_path: str, tmp_path: Path) -> None:
    data = _huge_line(tmp_path / "data.jsonl", 100 * MiB, before=GOOD_LINES[:1], after=GOOD_LINES[1:])
    result = _extract(teacher_path, data, tmp_path / "store")
    assert result.exit_code == 2
    assert "line 2: line is longer than 16777216 bytes" in error_line(result)


def test_huge_line_memory_bounded(tmp_path: Path, reliability_figures: dict[str, str]) -> None:
    data = _huge_line(tmp_path / "data.jsonl", 100 * MiB, before=GOOD_LINES[:1], after=GOOD_LINES[1:])
    stats = ReadStats()
    tracemalloc.start()
    try:
        rows = read_jsonl(data, source=0, split="train", strip=False, on_bad_row="skip", max_chars=32768, stats=stats)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert [row.line for row in rows] == [1, 3, 4]
    assert stats.skipped == {"line too long": 1}
    # The reader keeps at most one line limit (16 MiB) of the 100 MiB line in memory.
    # readline() joins the blocks it reads, so the peak is about twice that.
    assert peak < 40 * MiB
    reliability_figures["peak Python memory reading a 100 MiB line"] = f"{peak / MiB:.1f} MiB"


def test_skip_bad_rows_counts(teacher_path: str, tmp_path: Path, reliability_figures: dict[str, str]) -> None:
    bad = [line for _, lines, _ in REFUSED if lines for line in lines if line not in GOOD_LINES and line.strip()]
    data = _huge_line(tmp_path / "data.jsonl", 17 * MiB, before=[*GOOD_LINES, *bad, GOOD_LINES[0]])
    out = tmp_path / "store"
    result = _extract(teacher_path, data, out, "--skip-bad-rows", "--heldout-fraction", "0")
    assert result.exit_code == 0, result.stderr
    summary = result.stdout.strip().splitlines()[-1]
    assert "holds 3 samples" in summary
    # Every bad line of the refused cases once, a repeat of line 1, and the 17 MiB line.
    expected = {"invalid JSON": 1, "invalid row": len(bad) - 2, "not UTF-8": 1, "line too long": 1, "duplicate": 1}
    assert "skipped rows: " + ", ".join(f"{count} {reason}" for reason, count in expected.items()) in summary
    skipped_lines = [line for line in result.stderr.splitlines() if line.startswith("skipping ")]
    assert len(skipped_lines) == sum(expected.values())
    assert "Traceback" not in result.stderr
    assert verify_store(out).ok
    reliability_figures["bad rows skipped and counted in one file"] = str(sum(expected.values()))


def test_byte_order_mark_accepted(teacher_path: str, tmp_path: Path) -> None:
    data = _write(tmp_path / "data.jsonl", b"\xef\xbb\xbf" + GOOD_LINES[0], GOOD_LINES[1])
    result = _extract(teacher_path, data, tmp_path / "store")
    assert result.exit_code == 0, result.stderr
    assert "holds 2 samples" in result.stdout


def test_one_token_sample(teacher_path: str, tmp_path: Path) -> None:
    data = _write(tmp_path / "data.jsonl", b'{"text": "7"}\n')
    out = tmp_path / "store"
    result = _extract(teacher_path, data, out, "--no-append-eos")
    assert result.exit_code == 0, result.stderr
    assert verify_store(out).ok
    with open_store(out) as store:
        assert len(store) == 1
        assert store.read_kv(0).shape[0] == 1
        assert store.read_token_ids(0).shape == (1,)


@pytest.mark.parametrize("policy", ["truncate", "skip", "error"])
def test_long_sample_policies(teacher_path: str, tmp_path: Path, policy: str) -> None:
    data = _write(tmp_path / "data.jsonl", *GOOD_LINES, b'{"text": "7"}\n')
    out = tmp_path / "store"
    result = _extract(teacher_path, data, out, "--max-length", "12", "--on-long", policy, "--heldout-fraction", "0")
    if policy == "error":
        assert result.exit_code == 2
        assert f"{data} line 1: " in error_line(result)
        assert "tokens exceed --max-length 12" in error_line(result)
        assert not (out / "manifest.json").exists()
        return
    assert result.exit_code == 0, result.stderr
    with open_store(out) as store:
        lengths = sorted(store.samples[i].length for i in range(len(store)))
    if policy == "truncate":
        assert "3 samples truncated at --max-length 12" in result.stdout
        assert lengths[-3:] == [12, 12, 12]
        assert len(lengths) == 4
    else:
        assert "skipped rows: 3 longer than --max-length 12" in result.stdout
        assert "skipped 3 samples longer than --max-length 12" in result.stderr
        assert len(lengths) == 1
