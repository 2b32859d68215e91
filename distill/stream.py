"""Streaming teacher KV from a store into padded training batches.

Memory stays bounded whatever the store's size: a dataset item is one sample read on
demand, a batch is ``batch_size`` samples, and the loader keeps at most
``prefetch_factor`` batches per worker in flight.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from extract.store import KVStore


@dataclass
class KVBatch:
    """A padded batch: right-padded token ids, a mask of real tokens, and the teacher's K/V rows."""

    sample_ids: torch.Tensor  # [batch]
    input_ids: torch.Tensor  # [batch, tokens], padding = 0
    attention_mask: torch.Tensor  # [batch, tokens], bool, True on real tokens
    teacher_kv: torch.Tensor  # [batch, tokens, layers, 2, kv_heads, head_dim], padding = 0

    def pin_memory(self) -> "KVBatch":
        return KVBatch(*(t.pin_memory() for t in (self.sample_ids, self.input_ids, self.attention_mask, self.teacher_kv)))

    def to(self, device: torch.device) -> "KVBatch":
        non_blocking = device.type == "cuda"
        return KVBatch(*(t.to(device, non_blocking=non_blocking) for t in (self.sample_ids, self.input_ids, self.attention_mask, self.teacher_kv)))

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


class KVSampleDataset(Dataset):
    """One store sample per item: (sample id, token ids, K/V rows)."""

    def __init__(self, store: KVStore, sample_ids: Sequence[int]) -> None:
        self.store = store
        self.sample_ids = list(sample_ids)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        sample_id = self.sample_ids[index]
        return sample_id, self.store.read_token_ids(sample_id), self.store.read_kv(sample_id)


def collate_samples(items: list[tuple[int, torch.Tensor, torch.Tensor]]) -> KVBatch:
    longest = max(tokens.shape[0] for _, tokens, _ in items)
    token_shape = items[0][2].shape[1:]
    input_ids = torch.zeros((len(items), longest), dtype=torch.long)
    mask = torch.zeros((len(items), longest), dtype=torch.bool)
    kv = torch.zeros((len(items), longest, *token_shape), dtype=items[0][2].dtype)
    for i, (_, tokens, rows) in enumerate(items):
        length = tokens.shape[0]
        input_ids[i, :length] = tokens
        mask[i, :length] = True
        kv[i, :length] = rows
    sample_ids = torch.tensor([sample_id for sample_id, _, _ in items], dtype=torch.long)
    return KVBatch(sample_ids, input_ids, mask, kv)


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
