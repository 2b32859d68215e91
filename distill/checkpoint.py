"""Training checkpoints: written whole or not at all, found by step, pruned to the newest few.

One checkpoint is a folder ``OUT/checkpoints/step-NNNNNNN/``::

    student/                 the student, save_pretrained (safetensors), and its tokenizer
    projector.safetensors    projector weights
    trainer_state.pt         optimizer, scheduler and torch CPU/CUDA RNG states
    state.json               step, config, store fingerprint, run counters, Python/NumPy RNG
    COMPLETE                 written last, after every other file is on disk

``trainer_state.pt`` holds only tensors, numbers, strings and containers of them, so it
is read with ``torch.load(weights_only=True)``, which cannot run code. A checkpoint is
built under ``.partial-step-NNNNNNN`` and renamed into place once ``COMPLETE`` is synced,
so a crash leaves either a complete checkpoint or a partial folder that is ignored and
later removed.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file

from extract.errors import UserError
from extract.store.shards import fsync_dir

if TYPE_CHECKING:
    from distill.config import DistillConfig

logger = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
COMPLETE_MARKER = "COMPLETE"
STATE_FILE = "state.json"
TRAINER_STATE_FILE = "trainer_state.pt"
PROJECTOR_FILE = "projector.safetensors"
STUDENT_DIR = "student"
_PREFIX = "step-"
_PARTIAL_PREFIX = ".partial-"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint folder and the optimizer step it was taken after."""

    path: Path
    step: int

    def read_state(self) -> dict[str, Any]:
        return json.loads((self.path / STATE_FILE).read_text(encoding="utf-8"))

    def read_trainer_state(self) -> dict[str, Any]:
        return torch.load(self.path / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)

    def check_resumable(self, state: dict[str, Any], config: "DistillConfig", fingerprint: str) -> None:
        """Reject resuming when ``config`` differs in a field that changes the run, or the store's content differs.

        Raises:
            UserError: naming every differing field with both values, or both fingerprints.
        """
        changes = config.run_changes(state["config"])
        if changes:
            raise UserError(
                f"cannot resume from {self.path}: the config differs in fields that change the run "
                f"({'; '.join(changes)}); use the checkpoint's values or start a new run without --resume"
            )
        if state["store_fingerprint"] != fingerprint:
            raise UserError(
                f"cannot resume from {self.path}: store {config.store} has content fingerprint {fingerprint} "
                f"but the checkpoint was trained on {state['store_fingerprint']}; "
                "pass the store the run started with or start a new run without --resume"
            )


def checkpoint_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def complete_checkpoints(out: Path) -> list[Checkpoint]:
    """Return the complete checkpoints under ``out/checkpoints``, oldest first."""
    folder = out / CHECKPOINT_DIR
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        if not entry.name.startswith(_PREFIX) or not (entry / COMPLETE_MARKER).is_file():
            continue
        try:
            step = int(entry.name[len(_PREFIX):])
        except ValueError:
            continue
        found.append(Checkpoint(entry, step))
    return sorted(found, key=lambda checkpoint: checkpoint.step)


def latest_checkpoint(out: Path) -> Checkpoint:
    """Return the newest complete checkpoint in ``out``.

    Raises:
        UserError: when ``out`` contains no complete checkpoint.
    """
    found = complete_checkpoints(out)
    if not found:
        raise UserError(
            f"--resume found no complete checkpoint in {out / CHECKPOINT_DIR}; "
            "run without --resume to start, and pass --checkpoint-every N to save checkpoints during the run"
        )
    return found[-1]


def write_checkpoint(out: Path, step: int, write_files: Callable[[Path], None], *, keep: int) -> Checkpoint:
    """Write a checkpoint for ``step`` through ``write_files(folder)``, then keep only the newest ``keep``.

    ``write_files`` fills an empty folder. This function adds ``COMPLETE`` after
    syncing every file, then renames the folder into place. A complete checkpoint of
    the same step is replaced, which happens when a resumed run saves the step it
    resumed from.
    """
    folder = out / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    partial = folder / f"{_PARTIAL_PREFIX}{name}"
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir()

    write_files(partial)
    _fsync_tree(partial)
    marker = partial / COMPLETE_MARKER
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"step": step}, handle)
        handle.flush()
        os.fsync(handle.fileno())
    fsync_dir(partial)

    final = folder / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(partial, final)
    fsync_dir(folder)
    _prune(folder, keep)
    logger.info("checkpoint: step %d saved to %s", step, final)
    return Checkpoint(final, step)


def write_training_files(
    folder: Path,
    student: Any,
    tokenizer: Any,
    projector_state: dict[str, torch.Tensor],
    trainer_state: dict[str, Any],
    state: dict[str, Any],
) -> None:
    """Write the files of one checkpoint into ``folder``; ``write_checkpoint`` adds the marker."""
    student.save_pretrained(folder / STUDENT_DIR)
    tokenizer.save_pretrained(folder / STUDENT_DIR)
    save_file(projector_state, str(folder / PROJECTOR_FILE))
    torch.save(trainer_state, folder / TRAINER_STATE_FILE)
    (folder / STATE_FILE).write_text(json.dumps(state), encoding="utf-8")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)


def _prune(folder: Path, keep: int) -> None:
    complete = complete_checkpoints(folder.parent)
    for old in complete[: max(0, len(complete) - keep)]:
        shutil.rmtree(old.path)
        logger.debug("checkpoint: removed %s (keeping the newest %d)", old.path, keep)
    for entry in folder.iterdir():
        if entry.name.startswith(_PARTIAL_PREFIX):
            shutil.rmtree(entry)
            logger.info("checkpoint: removed the partial folder %s left by an interrupted save", entry)


# ----------------------------------------------------------------------------- RNG states


def rng_tensors() -> dict[str, Any]:
    """Torch RNG states as tensors, for ``trainer_state.pt``."""
    states: dict[str, Any] = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def rng_json() -> dict[str, Any]:
    """Python and NumPy RNG states as JSON-ready lists, for ``state.json``."""
    version, internal, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "python": [version, list(internal), gauss],
        "numpy": [name, keys.tolist(), int(position), int(has_gauss), float(cached)],
    }


def restore_rng(tensors: dict[str, Any], lists: dict[str, Any]) -> None:
    """Restore the states captured by ``rng_tensors`` and ``rng_json``.

    CUDA states are restored only when the number of visible GPUs matches. Otherwise a
    warning is logged and the GPU random streams restart.
    """
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_states = tensors.get("torch_cuda")
    if cuda_states is not None and torch.cuda.is_available():
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            logger.warning(
                "checkpoint contains RNG states of %d GPUs but %d are visible, so CUDA random streams (dropout on GPU) restart",
                len(cuda_states), torch.cuda.device_count(),
            )
    version, internal, gauss = lists["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = lists["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), position, has_gauss, cached))
