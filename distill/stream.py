"""Streaming teacher KV from a store into padded training batches.

Memory stays bounded whatever the store's size: a dataset item is one sample read on
demand, a batch is ``batch_size`` samples, and the loader keeps at most
``prefetch_factor`` batches per worker in flight.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from extract.errors import StoreError
from extract.store import KVStore


# Log-probability at padded top-k positions. It is finite, so a masked sum or a softmax
# over K never computes inf - inf or 0 * inf (NaN). Its exp() is exactly 0 in float32 and
# bfloat16, so even an unmasked KL term p * (log p - log q) is 0 there.
TOPK_PAD_LOGPROB = -1e4


@dataclass
class KVBatch:
    """A padded batch: right-padded token ids, masks of real and answer tokens, the teacher's K/V rows and top-k.

    ``answer_mask`` marks the answer tokens themselves (real tokens at or after the
    sample's answer start); a next-token loss predicts token t from position t - 1,
    so it has to shift the mask by one. Row t of ``topk_ids`` / ``topk_logprobs`` is the
    teacher's distribution over the token after t, which lines up with the student's
    logits at t. Both are None when the store has no top-k; padded positions hold id 0
    and ``TOPK_PAD_LOGPROB``.
    """

    sample_ids: torch.Tensor  # [batch]
    input_ids: torch.Tensor  # [batch, tokens], padding = 0
    attention_mask: torch.Tensor  # [batch, tokens], bool, True on real tokens
    teacher_kv: torch.Tensor  # [batch, tokens, layers, 2, kv_heads, head_dim], padding = 0
    answer_mask: torch.Tensor | None = None  # [batch, tokens], bool; None means a copy of attention_mask
    topk_ids: torch.Tensor | None = None  # [batch, tokens, K], int64, padding = 0
    topk_logprobs: torch.Tensor | None = None  # [batch, tokens, K], float32, padding = TOPK_PAD_LOGPROB

    def __post_init__(self) -> None:
        if self.answer_mask is None:
            self.answer_mask = self.attention_mask.clone()

    def _map(self, move: Callable[[torch.Tensor], torch.Tensor]) -> "KVBatch":
        """Return a new batch with ``move`` applied to every tensor field; None fields stay None."""
        tensors = {f.name: getattr(self, f.name) for f in fields(self)}
        return KVBatch(**{name: None if t is None else move(t) for name, t in tensors.items()})

    def pin_memory(self) -> "KVBatch":
        return self._map(torch.Tensor.pin_memory)

    def to(self, device: torch.device) -> "KVBatch":
        """Move the batch to ``device`` and check there that every teacher key and value is finite.

        Every batch reaches the model through this method, in training and in evaluation,
        and on a GPU the check costs far less than it would in the loader's workers. A
        non-finite key, value or top-k log-probability raises ``StoreError`` naming the
        store sample.
        """
        non_blocking = device.type == "cuda"
        moved = self._map(lambda t: t.to(device, non_blocking=non_blocking))
        moved.check_finite()
        return moved

    def check_finite(self) -> None:
        finite = torch.isfinite(self.teacher_kv).flatten(1).all(dim=1)
        if self.topk_logprobs is not None:
            finite &= torch.isfinite(self.topk_logprobs).flatten(1).all(dim=1)
        if not bool(finite.all()):
            sample_id = int(self.sample_ids[~finite][0])
            raise StoreError(
                f"the teacher keys, values or top-k log-probabilities of store sample {sample_id} contain NaN or Inf; "
                "run `python -m extract verify` on the store to list every damaged sample, then re-extract it"
            )

    def teacher_vectors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher keys and values as [batch, layers, tokens, kv_heads * head_dim]."""
        batch, tokens, layers, _, heads, head_dim = self.teacher_kv.shape
        kv = self.teacher_kv.to(dtype)
        keys = kv[:, :, :, 0].reshape(batch, tokens, layers, heads * head_dim).transpose(1, 2)
        values = kv[:, :, :, 1].reshape(batch, tokens, layers, heads * head_dim).transpose(1, 2)
        return keys, values

    @property
    def position_ids(self) -> torch.Tensor:
        batch, tokens = self.input_ids.shape
        return torch.arange(tokens, device=self.input_ids.device).unsqueeze(0).expand(batch, -1)


class KVSample(NamedTuple):
    """One store sample as the dataset returns it; the top-k pair is None when the store has none."""

    sample_id: int
    token_ids: torch.Tensor  # [tokens], int32
    kv: torch.Tensor  # [tokens, layers, 2, kv_heads, head_dim]
    answer_start: int
    topk: tuple[torch.Tensor, torch.Tensor] | None  # ids int32 [tokens, K], log-probabilities float32 [tokens, K]


class KVSampleDataset(Dataset):
    """One store sample per item, as a ``KVSample``."""

    def __init__(self, store: KVStore, sample_ids: Sequence[int]) -> None:
        self.store = store
        self.sample_ids = list(sample_ids)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> KVSample:
        sample_id = self.sample_ids[index]
        store = self.store
        return KVSample(
            sample_id,
            store.read_token_ids(sample_id),
            store.read_kv(sample_id),
            store.read_answer_start(sample_id),
            store.read_topk(sample_id),
        )


def collate_samples(items: list[KVSample]) -> KVBatch:
    longest = max(item.token_ids.shape[0] for item in items)
    token_shape = items[0].kv.shape[1:]
    input_ids = torch.zeros((len(items), longest), dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.bool)
    answer_mask = torch.zeros((len(items), longest), dtype=torch.bool)
    kv = torch.zeros((len(items), longest, *token_shape), dtype=items[0].kv.dtype)
    topk_ids = topk_logprobs = None
    if items[0].topk is not None:
        k = items[0].topk[0].shape[1]
        topk_ids = torch.zeros((len(items), longest, k), dtype=torch.long)
        topk_logprobs = torch.full((len(items), longest, k), TOPK_PAD_LOGPROB, dtype=torch.float32)
    for i, item in enumerate(items):
        length = item.token_ids.shape[0]
        input_ids[i, :length] = item.token_ids
        mask[i, :length] = True
        answer_mask[i, item.answer_start : length] = True
        kv[i, :length] = item.kv
        if topk_ids is not None:
            topk_ids[i, :length] = item.topk[0]
            topk_logprobs[i, :length] = item.topk[1]
    sample_ids = torch.tensor([item.sample_id for item in items], dtype=torch.long)
    return KVBatch(sample_ids, input_ids, mask, kv, answer_mask, topk_ids, topk_logprobs)


class StepBatchSampler(Sampler[list[int]]):
    """Batches for a fixed number of steps: a fresh seeded permutation each epoch.

    Batch ``k`` depends only on (seed, k), so a run resumed at step ``start_step`` reads
    exactly the batches an uninterrupted run would have read from there on.
    """

    def __init__(self, num_items: int, batch_size: int, steps: int, seed: int, start_step: int = 0) -> None:
        if num_items < 1:
            raise ValueError("cannot sample batches from an empty dataset")
        self.num_items = num_items
        self.batch_size = batch_size
        self.steps = steps
        self.seed = seed
        self.start_step = start_step

    def __len__(self) -> int:
        return max(0, self.steps - self.start_step)

    def _epoch_order(self, epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def __iter__(self) -> Iterator[list[int]]:
        position = self.start_step * self.batch_size
        epoch, offset = divmod(position, self.num_items)
        order = self._epoch_order(epoch)
        for _ in range(len(self)):
            batch = []
            while len(batch) < self.batch_size:
                if offset == self.num_items:
                    epoch, offset = epoch + 1, 0
                    order = self._epoch_order(epoch)
                batch.append(order[offset])
                offset += 1
            yield batch


def training_loader(
    dataset: KVSampleDataset, *, batch_size: int, steps: int, seed: int, num_workers: int, start_step: int = 0, pin_memory: bool = False
) -> DataLoader:
    sampler = StepBatchSampler(len(dataset), batch_size, steps, seed, start_step)
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=collate_samples,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )


def evaluation_loader(dataset: KVSampleDataset, *, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_samples, num_workers=num_workers)
