"""A background thread that assembles shards from teacher batches and writes them.

The teacher's forward passes run on the main thread; copying rows into the shard
buffer, checking finiteness, serialising, fsync and sha256 happen here, so storage
work overlaps compute. The queue is bounded, which bounds the memory held by batches
in flight.
"""

from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any

import torch

from extract.errors import UserError
from extract.plan import ShardPlan
from extract.store import SPLITS, ShardContents, StoreWriter
from extract.store.shards import torch_dtype

logger = logging.getLogger(__name__)


class NonFiniteError(UserError):
    """The teacher produced NaN or Inf for a sample."""


@dataclass
class BatchItem:
    """Key/value rows of one teacher batch, for samples at ``positions`` of shard ``shard``.

    ``kv`` is [batch, tokens, layers, 2, kv_heads, head_dim] on the CPU (possibly pinned
    memory still being filled by a CUDA copy, in which case ``ready`` is the CUDA event
    to wait on). ``finite`` is an optional per-sample flag computed on the device, over
    the key/value rows and the top-k log-probabilities. ``topk_ids`` and
    ``topk_logprobs`` are [batch, tokens, K] when the store keeps the teacher's top-k.
    """

    shard: int
    positions: list[int]
    kv: torch.Tensor
    finite: torch.Tensor | None = None
    ready: Any = None
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None


@dataclass
class _ShardBuffer:
    """One shard being assembled: its per-token arrays, sample offsets and the samples received so far."""

    kv: torch.Tensor
    offsets: list[int]
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    received: int = 0


class ShardWriterThread(threading.Thread):
    def __init__(self, writer: StoreWriter, shards: dict[int, ShardPlan], *, queue_depth: int = 4) -> None:
        super().__init__(name="shard-writer", daemon=True)
        self.writer = writer
        self.shards = shards
        self.queue: queue.Queue[BatchItem | None] = queue.Queue(maxsize=queue_depth)
        self.error: BaseException | None = None
        self.bytes_written = 0
        self.shards_written = 0
        self._lock = threading.Lock()
        self._dtype = torch_dtype(writer.manifest.layout.dtype)
        self._buffers: dict[int, _ShardBuffer] = {}

    def put(self, item: BatchItem) -> None:
        """Queue a batch; raise the writer's error, if it has failed, instead of blocking forever."""
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.queue.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def close(self) -> None:
        """Signal the end of input, wait for the last shard, and re-raise any error."""
        while self.is_alive():
            try:
                self.queue.put(None, timeout=0.5)
                break
            except queue.Full:
                if self.error is not None:
                    break
        self.join()
        if self.error is not None:
            raise self.error

    def run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is not None:
                continue  # drain so the producer never blocks after a failure
            try:
                self._consume(item)
            except BaseException as exc:  # re-raised on the main thread by put() or close()
                self.error = exc

    def _consume(self, item: BatchItem) -> None:
        if item.ready is not None:
            item.ready.synchronize()
        plan = self.shards[item.shard]
        if item.shard not in self._buffers:
            self._buffers[item.shard] = self._new_buffer(plan)
        buffer = self._buffers[item.shard]
        for b, position in enumerate(item.positions):
            sample = plan.samples[position]
            length = len(sample.token_ids)
            rows = item.kv[b, :length]
            if item.finite is not None:
                finite = bool(item.finite[b])
            else:
                finite = bool(torch.isfinite(rows).all())
                if item.topk_logprobs is not None:
                    finite = finite and bool(torch.isfinite(item.topk_logprobs[b, :length]).all())
            if not finite:
                raise NonFiniteError(
                    f"the teacher produced NaN or Inf for input source {sample.source} row {sample.row} "
                    f"({length} tokens); nothing of shard {item.shard} was written. Check the row, "
                    "or run with --compute-dtype float32"
                )
            start = buffer.offsets[position]
            buffer.kv[start : start + length] = rows
            if buffer.topk_ids is not None:
                buffer.topk_ids[start : start + length] = item.topk_ids[b, :length]
                buffer.topk_logprobs[start : start + length] = item.topk_logprobs[b, :length]
        buffer.received += len(item.positions)
        if buffer.received == len(plan.samples):
            self._write(plan, buffer)
            del self._buffers[item.shard]

    def _new_buffer(self, plan: ShardPlan) -> _ShardBuffer:
        layout = self.writer.manifest.layout
        offsets = [0]
        for sample in plan.samples:
            offsets.append(offsets[-1] + len(sample.token_ids))
        buffer = _ShardBuffer(kv=torch.empty((plan.tokens, *layout.token_shape), dtype=self._dtype), offsets=offsets)
        if layout.topk:
            buffer.topk_ids = torch.empty((plan.tokens, layout.topk), dtype=torch.int32)
            buffer.topk_logprobs = torch.empty((plan.tokens, layout.topk), dtype=torch.float32)
        return buffer

    def _write(self, plan: ShardPlan, buffer: _ShardBuffer) -> None:
        token_ids = torch.tensor([t for s in plan.samples for t in s.token_ids], dtype=torch.int32)
        contents = ShardContents(
            kv=buffer.kv,
            token_ids=token_ids,
            sample_offsets=torch.tensor(buffer.offsets, dtype=torch.int64),
            sample_rows=torch.tensor([s.row for s in plan.samples], dtype=torch.int64),
            sample_sources=torch.tensor([s.source for s in plan.samples], dtype=torch.uint8),
            sample_splits=torch.tensor([SPLITS.index(s.split) for s in plan.samples], dtype=torch.uint8),
            sample_answer_starts=torch.tensor([s.answer_start for s in plan.samples], dtype=torch.int64),
            topk_ids=buffer.topk_ids,
            topk_logprobs=buffer.topk_logprobs,
        )
        record = self.writer.write_shard(plan.index, contents)
        with self._lock:
            self.bytes_written += record.bytes
            self.shards_written += 1
        logger.debug("wrote %s: %d samples, %d tokens, %d bytes", record.path, record.samples, record.tokens, record.bytes)
