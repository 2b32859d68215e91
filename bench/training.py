"""A distill recipe driven step by step, for timing training steps under different batch sources."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from bench.common import BenchContext
from distill.config import DistillConfig
from distill.online import OnlineTeacher
from distill.recipe import DistillRecipe
from distill.stream import KVBatch, KVSampleDataset, training_loader

BATCH_SIZE = 4


class StepTimer:
    """A set-up ``DistillRecipe`` whose training step can be timed over any iterable of batches.

    ``step`` is the recipe's training step (forward, loss, backward, clip, optimizer);
    only logging and checkpoints are left out. ``online_teacher`` switches the recipe's
    teacher K/V source the way the ``online_teacher`` config key does.
    """

    def __init__(self, ctx: BenchContext, store: Path, student: Path, name: str) -> None:
        config = DistillConfig(
            store=str(store), student=str(student), out=str(ctx.scratch(f"run-{name}")), steps=1_000_000,
            batch_size=BATCH_SIZE, num_workers=1, device=str(ctx.device), verify_store=False, overwrite=True,
            eval_samples=0, name=f"bench-{name}",
        )
        self.recipe = DistillRecipe(config, progress=False)
        self.recipe.setup()
        self.recipe.student.train()
        self.recipe.projector.train()
        self.device = self.recipe.device
        self.parameters = [p for group in self.recipe.optimizer.param_groups for p in group["params"]]

    def set_online_teacher(self, teacher: OnlineTeacher | None) -> None:
        self.recipe.online_teacher = teacher

    def loader(self, steps: int, seed: int, *, background: bool, with_kv: bool = True) -> Iterable[KVBatch]:
        """Return the recipe's training batches, read ahead in a thread (``background``, as training does) or in the loop."""
        dataset = KVSampleDataset(self.recipe.store, self.recipe.train_ids, with_kv=with_kv)
        return training_loader(
            dataset, batch_size=BATCH_SIZE, steps=steps, seed=seed, num_workers=1 if background else 0,
            pin_memory=self.device.type == "cuda",
        )

    def step(self, batch: KVBatch) -> float:
        recipe = self.recipe
        batch = batch.to(self.device)
        student, teacher = recipe._kv_pair(batch)
        loss, _ = recipe.loss_fn(student, teacher, batch.attention_mask)
        recipe.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.parameters, recipe.config.grad_clip or math.inf)
        recipe.optimizer.step()
        return float(loss.detach())  # waits for the device, so the step is complete when timed

    def seconds_per_step(self, batches: Iterable[KVBatch], warmup: int) -> float:
        """Return the mean seconds per step after ``warmup`` untimed steps; waiting for a batch counts."""
        iterator = iter(batches)
        for _ in range(warmup):
            self.step(next(iterator))
        steps = 0
        started = time.perf_counter()
        for batch in iterator:
            self.step(batch)
            steps += 1
        return (time.perf_counter() - started) / steps

    def tokens_per_step(self, steps: int, seed: int) -> float:
        """Return the mean real tokens per training batch over ``steps`` batches."""
        total = sum(int(batch.attention_mask.sum()) for batch in self.loader(steps, seed, background=False, with_kv=False))
        return total / steps

    def close(self) -> None:
        self.recipe.store.close()
