"""Figures saved beside the record: training curves and per-layer held-out alignment.

matplotlib is optional: without it the run logs one line and saves no figure.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

CURVES_FILE = "curves.png"
LAYERS_FILE = "layers.png"


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        logger.info("no curves.png or layers.png: matplotlib is not installed (pip install matplotlib)")
        return None
    # Font-cache and backend chatter say nothing about the run.
    logging.getLogger("matplotlib").setLevel(logging.WARNING)
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_plots(out: Path, history: Sequence[dict[str, Any]], final: dict[str, Any] | None) -> list[Path]:
    """Save ``curves.png`` (from the logged steps) and ``layers.png`` (from ``final``) into ``out``.

    Returns the paths written. A figure without data (no logged step, no held-out
    evaluation) is skipped with a log line.
    """
    plt = _pyplot()
    if plt is None:
        return []
    written = []
    if history:
        written.append(_save_curves(plt, out / CURVES_FILE, history))
    else:
        logger.info("no curves.png: no training step was logged")
    if final and "per_layer" in final:
        written.append(_save_layers(plt, out / LAYERS_FILE, final))
    else:
        logger.info("no layers.png: the run has no held-out evaluation")
    return written


def _save_curves(plt: Any, path: Path, history: Sequence[dict[str, Any]]) -> Path:
    steps = [entry["step"] for entry in history]
    figure, (loss_axes, cos_axes) = plt.subplots(2, 1, sharex=True, figsize=(7, 6))
    loss_axes.plot(steps, [entry["loss"] for entry in history], label="total loss")
    if any(entry.get("kv_loss") != entry["loss"] for entry in history):
        loss_axes.plot(steps, [entry.get("kv_loss") for entry in history], label="KV loss")
    loss_axes.set_ylabel("loss")
    loss_axes.legend()
    cos_axes.plot(steps, [entry["cos_sim"] for entry in history], label="raw cosine")
    cos_axes.plot(steps, [entry["centred_cos"] for entry in history], label="centred cosine")
    cos_axes.set_xlabel("optimizer step")
    cos_axes.set_ylabel("training cosine")
    cos_axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def _save_layers(plt: Any, path: Path, final: dict[str, Any]) -> Path:
    names = final["layer_names"]
    positions = range(len(names))
    per_layer = final["per_layer"]
    width = 0.27
    figure, axes = plt.subplots(figsize=(max(6, 0.5 * len(names)), 4))
    axes.bar([p - width for p in positions], per_layer["raw_cos"], width, label="raw cosine")
    axes.bar(list(positions), per_layer["centred_cos"], width, label="centred cosine")
    axes.bar([p + width for p in positions], per_layer["baseline_cos"], width, label="mean-vector baseline")
    axes.set_xticks(list(positions))
    axes.set_xticklabels(names, rotation=90)
    axes.set_ylabel("held-out cosine")
    axes.axhline(0.0, color="black", linewidth=0.5)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
