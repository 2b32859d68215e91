"""Metric outputs of a run: ``metrics.jsonl`` always, TensorBoard when it is installed, and console lines.

``metrics.jsonl`` has one JSON object per line: training entries (``step`` and the step
metrics), events (``event``, for example a skipped non-finite step) and held-out
evaluations (``eval``). A resumed run keeps the lines up to its checkpoint's step and
drops the rest, so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from distill.alignment import alignment_label, collapse_warning

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
INITIAL_EVAL = "initial held-out"


def _kept_on_resume(entry: dict[str, Any], step: int) -> bool:
    if "step" in entry:
        return entry["step"] <= step
    return entry.get("eval") == INITIAL_EVAL


class MetricsLog:
    """Append-only JSONL metrics with an optional TensorBoard mirror.

    ``resume_step`` (None for a new run) truncates an existing file to the entries of
    steps up to it and the initial evaluation. ``history`` then contains the kept
    training entries, in order, so plots and the record cover the whole run.
    """

    def __init__(self, out: Path, *, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = out / METRICS_FILE
        self.history: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        kept: list[dict[str, Any]] = []
        if resume_step is not None:
            kept = self._read_kept(resume_step)
            for entry in kept:
                if "event" in entry:
                    self.events.append(entry)
                elif "step" in entry:
                    self.history.append(entry)
        temporary = self.path.with_name(self.path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(entry) + "\n" for entry in kept)
        os.replace(temporary, self.path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._tensorboard = _open_tensorboard(out / TENSORBOARD_DIR, resume_step) if tensorboard else None

    def _read_kept(self, step: int) -> list[dict[str, Any]]:
        if not self.path.is_file():
            logger.warning("%s is missing, so the resumed run's metrics start at step %d", self.path, step + 1)
            return []
        kept = []
        for number, line in enumerate(self.path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                logger.warning("%s line %d is not valid JSON (an interrupted write); dropping it", self.path, number)
                continue
            if _kept_on_resume(entry, step):
                kept.append(entry)
        return kept

    def write(self, entry: dict[str, Any]) -> None:
        """Append one entry and flush it, so a crash loses at most the line being written."""
        if "event" in entry:
            self.events.append(entry)
        elif "step" in entry:
            self.history.append(entry)
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            self._mirror(entry)

    def _mirror(self, entry: dict[str, Any]) -> None:
        if "event" in entry:
            return
        if "step" in entry:
            prefix, step = "train", entry["step"]
        else:
            prefix, step = entry["eval"].replace(" ", "_"), entry.get("at_step", 0)
        for key, value in entry.items():
            if key not in ("step", "at_step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                if math.isfinite(value):
                    self._tensorboard.add_scalar(f"{prefix}/{key}", value, step)
        self._tensorboard.flush()

    def log_step(
        self, step: int, steps: int, metrics: dict[str, float], grad_norm: float, learning_rates: list[float],
        skipped_steps: int, elapsed: float,
    ) -> None:
        """Write one training entry and its console line; the alignment label is on centred cosine."""
        student_lr, projector_lr = learning_rates
        label = alignment_label(metrics["centred_cos"]) if math.isfinite(metrics["centred_cos"]) else "non-finite"
        self.write({
            "step": step,
            **{k: round(v, 6) for k, v in metrics.items()},
            "grad_norm": round(grad_norm, 6),
            "student_lr": student_lr,
            "projector_lr": projector_lr,
            "skipped_steps": skipped_steps,
            "label": label,
            "seconds": round(elapsed, 3),
        })
        logger.info(
            "step %d/%d loss %.4f raw cos %.4f centred cos %.4f mag_ratio %.3f grad norm %.3f lr %.2e/%.2e %s (centred)",
            step, steps, metrics["loss"], metrics["cos_sim"], metrics["centred_cos"],
            metrics["mag_ratio"], grad_norm, student_lr, projector_lr, label,
        )

    def log_heldout(self, title: str, result: dict[str, Any], *, at_step: int) -> None:
        """Write one held-out evaluation (without the per-layer lists) and log it, with a collapse warning if due."""
        logger.info(
            "%s: raw %.4f centred %.4f baseline %.4f (label %s on centred cosine; %d tokens)",
            title, result["raw_cos"], result["centred_cos"], result["baseline_cos"],
            alignment_label(result["centred_cos"]), result["tokens"],
        )
        warning = collapse_warning(result["raw_cos"], result["baseline_cos"], centred_cos=result["centred_cos"])
        if warning:
            logger.warning("warning: %s", warning)
        self.write({"eval": title, "at_step": at_step, **{k: v for k, v in result.items() if k != "per_layer"}})

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def _open_tensorboard(log_dir: Path, resume_step: int | None) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        logger.info("TensorBoard logging is off because the tensorboard package is not installed (pip install tensorboard)")
        return None
    # purge_step drops events a previous attempt wrote after the checkpoint.
    purge_step = resume_step + 1 if resume_step is not None else None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)
