"""The extract stage: read inputs, plan shards, run the teacher once, write the store."""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from extract import __version__
from extract.capture import output_cache, right_padded_batch, stacked_kv
from extract.data import (
    GSM8K_TEMPLATE,
    ReadStats,
    TokenizeStats,
    assign_heldout,
    dataset_fingerprint,
    drop_duplicates,
    file_sha256,
    max_chars_for,
    read_jsonl,
    tokenize_rows,
)
from extract.embedded import resolve_model_path
from extract.errors import UserError, check_output_directory
from extract.logprobs import output_head, teacher_topk
from extract.models import (
    geometry_dict,
    kv_geometry,
    load_causal_lm,
    load_config,
    load_tokenizer,
    model_identity,
    resolve_compute_dtype,
    resolve_device,
    tokenizer_fingerprint,
    vocab_size,
)
from extract.plan import ShardPlan, batch_positions, plan_digest, plan_shards
from extract.store import KVLayout, Manifest, StoreWriter
from extract.store.lock import StoreLock
from extract.store.shards import dtype_name, torch_dtype
from extract.writer_thread import BatchItem, ShardWriterThread

logger = logging.getLogger(__name__)


@dataclass
class ExtractOptions:
    """Everything that configures one extract run; the CLI fills it from its options."""

    teacher: str
    data: Path
    out: Path
    heldout: Path | None = None
    heldout_fraction: float = 0.05
    split_seed: int = 0
    backend: str = "safetensors"
    store_dtype: str = "auto"
    compute_dtype: str = "auto"
    device: str = "auto"
    max_length: int = 512
    on_long: str = "truncate"
    strip_annotations: bool = False
    append_eos: bool = True
    limit: int | None = None
    layers: str = "all"
    batch_tokens: int = 8192
    max_batch_size: int = 32
    shard_mb: float = 1024.0
    attn_implementation: str = "sdpa"
    trust_remote_code: bool = False
    on_bad_row: str = "error"
    force: bool = False
    progress: bool = True
    zarr_chunk_tokens: int = 128
    queue_depth: int = 4
    write_store: bool = True
    topk_logprobs: int = 0


@dataclass
class ExtractResult:
    """What a run did, for the one-line summary and for benchmarks."""

    manifest: Manifest
    store: Path
    samples: int = 0
    tokens: int = 0
    bytes_written: int = 0
    seconds: float = 0.0
    # From the first teacher batch until the last shard is written (model loading excluded).
    loop_seconds: float = 0.0
    shards_resumed: int = 0
    truncated: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def parse_layers(spec: str, num_layers: int) -> tuple[int, ...]:
    """Parse ``all``, ``0,2,4`` or ``0-11`` (inclusive) into sorted layer indices."""
    if spec.strip() == "all":
        return tuple(range(num_layers))
    chosen: set[int] = set()
    try:
        for part in spec.split(","):
            if "-" in part:
                first, last = (int(x) for x in part.split("-", 1))
                chosen.update(range(first, last + 1))
            else:
                chosen.add(int(part))
    except ValueError:
        raise UserError(f"--layers {spec!r} is invalid; use all, a list such as 0,2,4 or a range such as 0-11") from None
    bad = sorted(i for i in chosen if not 0 <= i < num_layers)
    if not chosen or bad:
        raise UserError(f"--layers {spec!r}: layers {bad or spec} are outside the teacher's 0..{num_layers - 1}")
    return tuple(sorted(chosen))


def _read_samples(opts: ExtractOptions, tokenizer: Any) -> tuple[list, list[dict[str, Any]], ReadStats, TokenizeStats]:
    stats = ReadStats()
    common = dict(strip=opts.strip_annotations, on_bad_row=opts.on_bad_row, max_chars=max_chars_for(opts.max_length), stats=stats)
    sources = [{"path": str(opts.data), "sha256": file_sha256(opts.data) if opts.data.is_file() else "", "split": "train"}]
    rows = read_jsonl(opts.data, source=0, split="train", limit=opts.limit, **common)
    paths = [opts.data]
    if opts.heldout is not None:
        sources.append({"path": str(opts.heldout), "sha256": file_sha256(opts.heldout) if opts.heldout.is_file() else "", "split": "heldout"})
        if sources[1]["sha256"] and sources[1]["sha256"] == sources[0]["sha256"]:
            raise UserError(
                f"--heldout {opts.heldout} has the same content as --data {opts.data}, so held-out figures would "
                "measure training samples; pass a separate held-out file, or omit --heldout to split --data"
            )
        rows += read_jsonl(opts.heldout, source=1, split="heldout", **common)
        paths.append(opts.heldout)
    rows = drop_duplicates(rows, paths, on_bad_row=opts.on_bad_row, stats=stats)
    if opts.heldout is None:
        rows = assign_heldout(rows, opts.heldout_fraction, opts.split_seed)
        sources[0]["split"] = "mixed"
    if not rows:
        raise UserError(f"no usable rows in {opts.data}; expected JSONL rows with 'question'/'answer' or 'text'")
    token_stats = TokenizeStats()
    samples = tokenize_rows(
        rows, tokenizer, max_length=opts.max_length, on_long=opts.on_long, append_eos=opts.append_eos,
        stats=token_stats, paths=paths,
    )
    if token_stats.skipped_long:
        logger.warning(
            "skipped %d samples longer than --max-length %d (--on-long skip)", token_stats.skipped_long, opts.max_length
        )
    if not samples:
        raise UserError(f"every row of {opts.data} was skipped; see the log for the reasons")
    return samples, sources, stats, token_stats


def _describe_request(opts: ExtractOptions, teacher_path: str, config: Any, tokenizer: Any, samples: list, sources: list, read_stats: ReadStats, token_stats: TokenizeStats, shards: list[ShardPlan], layout: KVLayout, compute_dtype: torch.dtype) -> Manifest:
    geometry = kv_geometry(config)
    dataset_options = {
        "template": GSM8K_TEMPLATE,
        "strip_annotations": opts.strip_annotations,
        "append_eos": opts.append_eos,
        "max_length": opts.max_length,
        "on_long": opts.on_long,
        "limit": opts.limit,
        "heldout_fraction": None if opts.heldout is not None else opts.heldout_fraction,
        "split_seed": opts.split_seed,
        "on_bad_row": opts.on_bad_row,
    }
    dataset = {
        "fingerprint": dataset_fingerprint(sources, dataset_options),
        "sources": [{k: v for k, v in s.items()} for s in sources],
        **dataset_options,
        "rows_read": read_stats.rows,
        "blank_lines": read_stats.blank,
        "rows_skipped": dict(read_stats.skipped),
        "samples_truncated": token_stats.truncated,
        "samples_skipped_long": token_stats.skipped_long,
    }
    teacher = {
        "name_or_path": opts.teacher,
        "identity": model_identity(teacher_path, config),
        **geometry_dict(geometry),
        "vocab_size": vocab_size(config),
        "attn_implementation": opts.attn_implementation,
        "compute_dtype": dtype_name(compute_dtype),
        "padding_side": "right",
        "position_ids": "explicit 0..n-1 per sample",
    }
    tokenizer_info = {
        "fingerprint": tokenizer_fingerprint(tokenizer),
        "size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    plan = {
        "shards": len(shards),
        "shard_bytes": int(opts.shard_mb * 2**20),
        "samples": len(samples),
        "tokens": sum(s.tokens for s in shards),
        "sha256": plan_digest(shards),
    }
    return Manifest(
        backend=opts.backend,
        layout=layout,
        teacher=teacher,
        tokenizer=tokenizer_info,
        dataset=dataset,
        plan=plan,
        package_version=__version__,
    )


def _check_disk(out: Path, planned_bytes: int, force: bool) -> None:
    probe = out if out.exists() else next((p for p in out.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    logger.info("planned store size %.1f MB; free disk at %s: %.1f MB", planned_bytes / 1e6, probe, free / 1e6)
    if planned_bytes > free and not force:
        raise UserError(
            f"the store needs {planned_bytes / 1e9:.2f} GB but {probe} has {free / 1e9:.2f} GB free; "
            "free space, store fewer --layers or a smaller --dtype, or pass --force"
        )


def run_extract(opts: ExtractOptions, *, teacher_model: Any = None) -> ExtractResult:
    """Run the extract stage end to end; resume a store left by an interrupted run of the same configuration.

    ``teacher_model`` is a teacher already loaded on the device, used instead of loading
    ``opts.teacher``, which still provides the config and tokenizer (the benchmarks
    pass random-initialised real-size models this way).
    """
    started = time.perf_counter()
    if opts.backend not in ("safetensors", "zarr"):
        raise UserError(f"--format {opts.backend!r} is not supported; choose safetensors or zarr")
    device = resolve_device(opts.device)
    compute_dtype = resolve_compute_dtype(opts.compute_dtype, device)
    store_dtype = dtype_name(compute_dtype) if opts.store_dtype == "auto" else opts.store_dtype
    torch_dtype(store_dtype)
    if opts.write_store:
        check_output_directory(opts.out)

    teacher_path = resolve_model_path(opts.teacher)
    config = load_config(teacher_path, trust_remote_code=opts.trust_remote_code)
    tokenizer = load_tokenizer(teacher_path, trust_remote_code=opts.trust_remote_code)
    geometry = kv_geometry(config)
    if not 0 <= opts.topk_logprobs <= vocab_size(config):
        raise UserError(
            f"--topk-logprobs {opts.topk_logprobs} is outside 0..{vocab_size(config)}, the teacher's vocabulary size"
        )
    layout = KVLayout(
        layers=parse_layers(opts.layers, geometry.num_hidden_layers),
        num_kv_heads=geometry.num_key_value_heads,
        head_dim=geometry.head_dim,
        dtype=store_dtype,
        topk=opts.topk_logprobs,
    )

    samples, sources, read_stats, token_stats = _read_samples(opts, tokenizer)
    if token_stats.truncated:
        logger.warning("%d samples were cut at --max-length %d", token_stats.truncated, opts.max_length)
    shards = plan_shards(samples, layout.bytes_per_token, int(opts.shard_mb * 2**20))
    requested = _describe_request(opts, teacher_path, config, tokenizer, samples, sources, read_stats, token_stats, shards, layout, compute_dtype)
    total_tokens = requested.plan["tokens"]
    logger.info(
        "plan: %d samples, %d tokens, %d shards; %d bytes per token (%d layers x 2 x %d KV heads x %d x %s, "
        "plus %d for top-%d log-probabilities)",
        len(samples), total_tokens, len(shards), layout.bytes_per_token, len(layout.layers),
        layout.num_kv_heads, layout.head_dim, store_dtype, layout.topk_bytes_per_token, layout.topk,
    )

    skipped = dict(read_stats.skipped)
    if token_stats.skipped_long:
        skipped[f"longer than --max-length {opts.max_length}"] = token_stats.skipped_long
    result = ExtractResult(manifest=requested, store=opts.out, truncated=token_stats.truncated, skipped=skipped)
    if not opts.write_store:
        _run_teacher(opts, teacher_path, device, compute_dtype, layout, shards, None, result, teacher_model)
        result.seconds = time.perf_counter() - started
        return result

    _check_disk(opts.out, total_tokens * layout.bytes_per_token, opts.force)
    opts.out.mkdir(parents=True, exist_ok=True)
    with StoreLock(opts.out):
        writer = StoreWriter.create_or_resume(opts.out, requested, zarr_chunk_tokens=opts.zarr_chunk_tokens)
        result.shards_resumed = writer.finished_shards
        remaining = shards[writer.finished_shards :]
        if result.shards_resumed:
            logger.info("resuming: %d of %d shards already complete", result.shards_resumed, len(shards))
        if remaining:
            _run_teacher(opts, teacher_path, device, compute_dtype, layout, remaining, writer, result, teacher_model)
        result.manifest = writer.finish()
    result.seconds = time.perf_counter() - started
    return result


def _run_teacher(
    opts: ExtractOptions,
    teacher_path: str,
    device: torch.device,
    compute_dtype: torch.dtype,
    layout: KVLayout,
    shards: list[ShardPlan],
    writer: StoreWriter | None,
    result: ExtractResult,
    model: Any = None,
) -> None:
    if model is None:
        model = load_causal_lm(
            teacher_path,
            dtype=compute_dtype,
            device=device,
            attn_implementation=opts.attn_implementation,
            trust_remote_code=opts.trust_remote_code,
        )
    model.eval()
    # The base model returns the cache without the LM head: [tokens, vocab] logits would
    # cost far more memory than the cache itself on a 150k-token vocabulary. With
    # --topk-logprobs the head runs on real tokens only, in chunks (extract.logprobs).
    base = model.base_model
    head = output_head(model, model.config) if layout.topk else None
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    store_dtype = torch_dtype(layout.dtype)
    thread = ShardWriterThread(writer, {s.index: s for s in shards}, queue_depth=opts.queue_depth) if writer else None
    if thread:
        thread.start()
    total_samples = sum(len(s.samples) for s in shards)
    bar = tqdm(total=total_samples, unit="sample", disable=not opts.progress, desc="extract", dynamic_ncols=True)
    begin = time.perf_counter()
    try:
        for shard in shards:
            for positions in batch_positions(shard, opts.batch_tokens, opts.max_batch_size):
                sequences = [shard.samples[p].token_ids for p in positions]
                item = _forward(base, head, sequences, pad_id, device, layout, store_dtype)
                item.shard, item.positions = shard.index, positions
                if thread:
                    thread.put(item)
                result.samples += len(positions)
                result.tokens += sum(len(s) for s in sequences)
                bar.update(len(positions))
                elapsed = max(time.perf_counter() - begin, 1e-9)
                written = thread.bytes_written if thread else 0
                bar.set_postfix_str(f"{result.tokens / elapsed:,.0f} tok/s, {written / 1e6:,.1f} MB written", refresh=False)
        if thread:
            thread.close()
            result.bytes_written = thread.bytes_written
        elif device.type == "cuda":
            torch.cuda.synchronize(device)
        result.loop_seconds = time.perf_counter() - begin
    except BaseException:
        if thread and thread.is_alive():
            try:
                thread.close()
            except BaseException:
                pass  # the first error is the one worth reporting
        raise
    finally:
        bar.close()


@torch.inference_mode()
def _forward(base: Any, head: Any, sequences: list, pad_id: int, device: torch.device, layout: KVLayout, store_dtype: torch.dtype) -> BatchItem:
    input_ids, attention_mask, position_ids = right_padded_batch(sequences, pad_id)
    attention_mask = attention_mask.to(device)
    output = base(
        input_ids=input_ids.to(device),
        attention_mask=attention_mask,
        position_ids=position_ids.to(device),
        use_cache=True,
    )
    kv = stacked_kv(output_cache(output), layout.layers)
    real = attention_mask.bool()
    topk_ids = topk_logprobs = None
    if layout.topk:
        topk_ids, topk_logprobs = teacher_topk(head, output.last_hidden_state, real, layout.topk)
    if device.type != "cuda":
        return BatchItem(shard=-1, positions=[], kv=kv, topk_ids=topk_ids, topk_logprobs=topk_logprobs)
    # On a GPU: convert and check on the device, then copy into pinned host memory
    # without blocking, so the next forward pass starts while the copy runs.
    kv = kv.to(store_dtype)
    finite = (torch.isfinite(kv) | ~real[:, :, None, None, None, None]).flatten(1).all(dim=1)
    if topk_logprobs is not None:
        # NOTE: tests run on CPU only; this CUDA branch of the top-k copy has not run in them.
        # Padded positions hold 0, so only real tokens can fail this check.
        finite &= torch.isfinite(topk_logprobs).flatten(1).all(dim=1)
        topk_ids, topk_logprobs = _to_pinned_host(topk_ids), _to_pinned_host(topk_logprobs)
    host_kv, host_finite = _to_pinned_host(kv), _to_pinned_host(finite)
    ready = torch.cuda.Event()
    ready.record()
    return BatchItem(
        shard=-1, positions=[], kv=host_kv, finite=host_finite, ready=ready, topk_ids=topk_ids, topk_logprobs=topk_logprobs
    )


def _to_pinned_host(tensor: torch.Tensor) -> torch.Tensor:
    """Start a non-blocking copy into pinned host memory; wait on a CUDA event recorded after it before use."""
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    host.copy_(tensor, non_blocking=True)
    return host
