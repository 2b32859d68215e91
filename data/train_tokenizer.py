"""Train the embedded byte-level BPE tokenizer on the embedded problems (data/tokenizer).

The pipeline follows the Qwen2 tokenizer (NFC normalisation, a regex pre-tokenizer,
byte-level mapping), so any UTF-8 text encodes without unknown tokens. ``<|endoftext|>`` is the only special token and serves as both
eos and pad, as in Qwen2.

Training reads every problem of train.jsonl and heldout.jsonl rendered with
``TEXT_TEMPLATE``, the same template extraction and training use. The result is saved
as a Hugging Face tokenizer directory that ``AutoTokenizer.from_pretrained`` loads.
Two runs write byte-identical files. ``--check`` trains in a temporary directory and
compares with the saved files.

Usage:
    python data/train_tokenizer.py            # write data/tokenizer/
    python data/train_tokenizer.py --check    # exit 1 if data/tokenizer/ differs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent
PROBLEM_FILES = (DATA_DIR / "gsm8k-mini" / "train.jsonl", DATA_DIR / "gsm8k-mini" / "heldout.jsonl")
OUTPUT_DIR = DATA_DIR / "tokenizer"

TEXT_TEMPLATE = "Question: {question}\nAnswer: {answer}"
END_OF_TEXT = "<|endoftext|>"
# Upper bound only: on the embedded corpus the trainer stops earlier, when every
# pre-token has become a single token.
VOCAB_SIZE_LIMIT = 4096
MODEL_MAX_LENGTH = 512

# Qwen2's pre-tokenizer pattern (transformers 5.25, Qwen2Tokenizer) with one change:
# digits split into runs of up to three, as tiktoken's cl100k_base pattern does, where
# Qwen2 splits every digit. The annotated answers repeat each number three times, and
# single digits push the longest embedded problems past the 200 tokens tests allow.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


def read_texts(paths: tuple[Path, ...] = PROBLEM_FILES) -> list[str]:
    """Return every problem of ``paths`` rendered with ``TEXT_TEMPLATE``, in file order."""
    texts = []
    for path in paths:
        if not path.is_file():
            raise FileNotFoundError(f"problem file not found: {path}; run python data/generate_problems.py")
        with path.open(encoding="utf-8") as lines:
            for line in lines:
                row = json.loads(line)
                texts.append(TEXT_TEMPLATE.format(question=row["question"], answer=row["answer"]))
    return texts


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE_LIMIT):
    """Train a byte-level BPE ``tokenizers.Tokenizer`` on ``texts``."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[END_OF_TEXT],
        # All 256 byte symbols, so bytes absent from the corpus still encode.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return tokenizer


def save_tokenizer(tokenizer, output_dir: Path) -> None:
    """Save ``tokenizer`` as a Hugging Face fast tokenizer directory."""
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        padding_side="right",
        model_max_length=MODEL_MAX_LENGTH,
        clean_up_tokenization_spaces=False,
    )
    hf_tokenizer.save_pretrained(str(output_dir))


def build(output_dir: Path) -> None:
    save_tokenizer(train_tokenizer(read_texts()), output_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Train the embedded byte-level BPE tokenizer.")
    parser.add_argument("--check", action="store_true", help="compare data/tokenizer/ with a fresh training run")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT_DIR, help="directory of the tokenizer files")
    args = parser.parse_args(argv)

    if args.check:
        with tempfile.TemporaryDirectory() as scratch:
            build(Path(scratch))
            names = sorted(os.listdir(scratch))
            stale = [name for name in names if not _same_file(Path(scratch, name), args.output_dir / name)]
        if stale:
            print(f"out of date in {args.output_dir}: {', '.join(stale)}; run python data/train_tokenizer.py")
            return 1
        print(f"up to date: {', '.join(names)} in {args.output_dir}")
        return 0

    args.output_dir.mkdir(parents=True, exist_ok=True)
    build(args.output_dir)
    vocab = json.loads((args.output_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    print(f"wrote a tokenizer with {len(vocab)} BPE tokens to {args.output_dir}")
    return 0


def _same_file(fresh: Path, saved: Path) -> bool:
    return saved.is_file() and saved.read_bytes() == fresh.read_bytes()


if __name__ == "__main__":
    sys.exit(main())
