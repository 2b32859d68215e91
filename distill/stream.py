"""Streaming teacher KV from a store into padded training batches.

Memory stays bounded whatever the store's size: samples are read on demand, a batch is
``batch_size`` samples, and the training loader keeps at most ``PREFETCH_BATCHES``
batches in flight.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from itertools import islice
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from extract.errors import StoreError
from extract.store import KVStore
from extract.store.shards import torch_dtype

# Batches read ahead of the training step when reading in the background.
PREFETCH_BATCHES = 4


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
    """One store sample per item, as a ``KVSample``.

    With ``with_kv=False`` only token ids are read, and batches carry a teacher K/V
    tensor with zero layers: the online-teacher mode computes the K/V itself.
    """

    def __init__(self, store: KVStore, sample_ids: Sequence[int], *, with_kv: bool = True) -> None:
        self.store = store
        self.sample_ids = list(sample_ids)
        self.with_kv = with_kv
        self._buffers = BufferPool(PREFETCH_BATCHES + 2)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_buffers"] = BufferPool(self._buffers.capacity)  # DataLoader workers start with an empty pool
        return state

    def __len__(self) -> int:
        return len(self.sample_ids)

    def _row_shape(self) -> tuple[int, ...]:
        layers, pair, heads, head_dim = self.store.manifest.layout.token_shape
        return (layers if self.with_kv else 0, pair, heads, head_dim)

    def __getitem__(self, index: int) -> KVSample:
        sample_id = self.sample_ids[index]
        store = self.store
        tokens = store.read_token_ids(sample_id)
        if self.with_kv:
            kv = store.read_kv(sample_id)
        else:
            kv = torch.empty((tokens.shape[0], *self._row_shape()), dtype=self._kv_dtype())
        return KVSample(sample_id, tokens, kv, store.read_answer_start(sample_id), store.read_topk(sample_id))

    def _kv_dtype(self) -> torch.dtype:
        return torch_dtype(self.store.manifest.layout.dtype)

    def __getitems__(self, indices: list[int]) -> KVBatch:
        """Assemble a padded batch in one call; DataLoader uses this instead of ``__getitem__`` per item."""
        return self.read_batch(indices)

    def read_batch(self, indices: Sequence[int], *, pin_memory: bool = False) -> KVBatch:
        """Assemble a padded batch, reading each sample's K/V straight into it.

        Reading into the batch saves two passes over the K/V bytes, the largest data in
        training: a per-sample buffer and the copy into the padded batch. With
        ``pin_memory`` the batch is allocated in page-locked memory, ready for an
        asynchronous copy to a GPU.
        """
        sample_ids = [self.sample_ids[i] for i in indices]
        store = self.store
        if self.with_kv:
            # The disk fetches the later samples while the first ones are copied.
            for sample_id in sample_ids:
                store.prefetch_kv(sample_id)
        tokens = [store.read_token_ids(sample_id) for sample_id in sample_ids]
        longest = max(t.shape[0] for t in tokens)
        size = len(tokens)
        input_ids = torch.zeros((size, longest), dtype=torch.long)
        mask = torch.zeros((size, longest), dtype=torch.bool)
        answer_mask = torch.zeros((size, longest), dtype=torch.bool)
        kv = self._batch_tensor((size, longest, *self._row_shape()), pin_memory)
        topk_ids = topk_logprobs = None
        if store.topk:
            topk_ids = torch.zeros((size, longest, store.topk), dtype=torch.long)
            topk_logprobs = torch.full((size, longest, store.topk), TOPK_PAD_LOGPROB, dtype=torch.float32)
        for i, (sample_id, ids) in enumerate(zip(sample_ids, tokens)):
            length = ids.shape[0]
            input_ids[i, :length] = ids
            mask[i, :length] = True
            answer_mask[i, store.read_answer_start(sample_id) : length] = True
            if self.with_kv:
                store.read_kv_into(sample_id, kv[i, :length])
            kv[i, length:] = 0
            if topk_ids is not None:
                ids_k, logprobs_k = store.read_topk(sample_id)
                topk_ids[i, :length] = ids_k
                topk_logprobs[i, :length] = logprobs_k
        batch = KVBatch(torch.tensor(sample_ids, dtype=torch.long), input_ids, mask, kv, answer_mask, topk_ids, topk_logprobs)
        return batch.pin_memory() if pin_memory else batch

    def _batch_tensor(self, shape: tuple[int, ...], pin_memory: bool) -> torch.Tensor:
        """Return an uninitialised tensor for a batch's K/V.

        With ``pin_memory`` it is page-locked (torch caches and reuses such blocks). In
        a DataLoader worker process it lives in shared memory, so passing it to the
        training process copies nothing. Otherwise it comes from the buffer pool.
        """
        dtype = self._kv_dtype()
        if pin_memory:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        if get_worker_info() is None:
            return self._buffers.tensor(shape, dtype)
        numel = 1
        for size in shape:
            numel *= size
        storage = torch.UntypedStorage._new_shared(numel * torch.empty((), dtype=dtype).element_size())
        return torch.empty(0, dtype=dtype).set_(storage, 0, shape)


class BufferPool:
    """Batch buffers, reused once nothing refers to the batch they last held.

    A newly allocated buffer costs the kernel a page fault and a zero-fill per page:
    about a third of the time of a cold batch read on a 2-core KVM machine, even with
    huge pages. A buffer counts as free only when the pool holds the last reference to
    it, so a batch that a caller keeps (``list(loader)``) is never overwritten. Used by
    one thread at a time.
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._buffers: list[np.ndarray] = []
        self._idle_references: list[int] = []

    def _references(self, position: int) -> int:
        return sys.getrefcount(self._buffers[position])

    def _is_free(self, position: int) -> bool:
        # Compared with the count taken by the same call path when nothing else referred to the buffer.
        return self._references(position) == self._idle_references[position]

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Return an uninitialised tensor of ``shape`` and ``dtype`` in a free pooled buffer (or a new one)."""
        numel = 1
        for size in shape:
            numel *= size
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype)
        buffer = self._take(nbytes)
        return torch.from_numpy(buffer[:nbytes]).view(dtype).view(shape)

    def _take(self, nbytes: int) -> np.ndarray:
        free = [i for i in range(len(self._buffers)) if self._is_free(i)]
        fitting = [i for i in free if self._buffers[i].nbytes >= nbytes]
        if fitting:
            return self._buffers[min(fitting, key=lambda i: self._buffers[i].nbytes)]
        if len(self._buffers) >= self.capacity:
            if not free:
                return np.empty(nbytes, dtype=np.uint8)  # every pooled buffer is in use
            smallest = min(free, key=lambda i: self._buffers[i].nbytes)
            del self._buffers[smallest], self._idle_references[smallest]
        # numpy requests transparent huge pages for large arrays, see extract.store.shards.empty_rows.
        self._buffers.append(np.empty(nbytes, dtype=np.uint8))
        self._idle_references.append(0)
        self._idle_references[-1] = self._references(len(self._buffers) - 1)
        return self._buffers[-1]


class PrefetchLoader:
    """Training batches read ahead by one background thread, in the batch sampler's order.

    A thread and not a DataLoader worker process, because reading K/V is pread and
    memory copies, which release the GIL. A worker process would also have to pass
    every batch through newly allocated shared memory, which gets no huge pages: on a
    2-core KVM machine that cost several times the read itself. One thread reads at
    the disk's speed, and more would race on the store's shard handles.
    """

    def __init__(self, dataset: KVSampleDataset, batch_sampler: Sampler[list[int]], *, depth: int, pin_memory: bool = False) -> None:
        self.dataset = dataset
        self.batch_sampler = batch_sampler
        self.depth = max(1, depth)
        self.pin_memory = pin_memory

    def __len__(self) -> int:
        return len(self.batch_sampler)  # type: ignore[arg-type]

    def _read(self, indices: list[int]) -> KVBatch:
        return self.dataset.read_batch(indices, pin_memory=self.pin_memory)

    def __iter__(self) -> Iterator[KVBatch]:
        indices = iter(self.batch_sampler)
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-reader") as pool:
            pending = deque(pool.submit(self._read, batch) for batch in islice(indices, self.depth))
            try:
                while pending:
                    batch = pending.popleft().result()
                    for following in islice(indices, 1):
                        pending.append(pool.submit(self._read, following))
                    yield batch
            finally:
                for future in pending:
                    future.cancel()


def collate_batch(data: KVBatch | list[KVSample]) -> KVBatch:
    """Pass through a batch that ``KVSampleDataset.__getitems__`` assembled; pad a list of items otherwise."""
    return data if isinstance(data, KVBatch) else collate_samples(data)


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
) -> DataLoader | PrefetchLoader:
    """Batches for ``steps`` steps; ``num_workers`` >= 1 reads ahead in a background thread, 0 reads in the loop."""
    sampler = StepBatchSampler(len(dataset), batch_size, steps, seed, start_step)
    if num_workers > 0:
        return PrefetchLoader(dataset, sampler, depth=PREFETCH_BATCHES, pin_memory=pin_memory)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_batch, num_workers=0, pin_memory=pin_memory)


def evaluation_loader(dataset: KVSampleDataset, *, batch_size: int, num_workers: int = 0) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_batch, num_workers=num_workers)
