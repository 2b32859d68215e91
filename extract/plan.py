"""The extraction plan: which samples go into which shard, and in which batches they run.

Samples are sorted by length (longest first, so an out-of-memory batch fails at once,
not hours in), cut into shards of about ``shard_bytes`` each, and batched inside each
shard under a token budget. Shard contents depend only on the samples and
``shard_bytes``, so a resumed run may use another batch size and still produce the
same shards.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from extract.data import TokenizedSample


@dataclass(frozen=True)
class ShardPlan:
    """One planned shard: its samples in storage order."""

    index: int
    samples: tuple[TokenizedSample, ...]

    @property
    def tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.samples)


def plan_shards(samples: Sequence[TokenizedSample], bytes_per_token: int, shard_bytes: int) -> list[ShardPlan]:
    """Cut the length-sorted samples into shards of at least one sample and about ``shard_bytes``."""
    ordered = sorted(samples, key=lambda s: (-len(s.token_ids), s.source, s.row))
    shards: list[ShardPlan] = []
    current: list[TokenizedSample] = []
    current_bytes = 0
    for sample in ordered:
        size = len(sample.token_ids) * bytes_per_token
        if current and current_bytes + size > shard_bytes:
            shards.append(ShardPlan(len(shards), tuple(current)))
            current, current_bytes = [], 0
        current.append(sample)
        current_bytes += size
    if current:
        shards.append(ShardPlan(len(shards), tuple(current)))
    return shards


def plan_digest(shards: Sequence[ShardPlan]) -> str:
    """Hash the assignment of (source, row, answer start, token ids) to shards, so a resume can prove it matches."""
    digest = hashlib.sha256()
    for shard in shards:
        digest.update(f"shard {shard.index}\n".encode())
        for sample in shard.samples:
            digest.update(f"{sample.source} {sample.row} {sample.split} {sample.answer_start} ".encode())
            digest.update(",".join(map(str, sample.token_ids)).encode())
            digest.update(b"\n")
    return digest.hexdigest()


def batch_positions(shard: ShardPlan, batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Group a shard's sample positions into batches whose padded size fits ``batch_tokens``.

    A sample longer than the budget runs alone. Samples are already sorted longest first,
    so each batch's padded length is its first sample's length.
    """
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for position, sample in enumerate(shard.samples):
        length = len(sample.token_ids)
        if current and (len(current) >= max_batch_size or max(longest, length) * (len(current) + 1) > batch_tokens):
            batches.append(current)
            current, longest = [], 0
        current.append(position)
        longest = max(longest, length)
    if current:
        batches.append(current)
    return batches
