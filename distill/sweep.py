"""Sweeps: many distill runs on one store from a grid file, and a table and plot of the results.

A grid file is YAML with these keys:

- ``base``: a config file path (``base: embedded.yaml``), or a mapping of config keys
  that may name a config file under ``config`` (``base: {config: embedded.yaml,
  steps: 500}``). Relative paths are resolved against the grid file's folder.
- ``axes``: a mapping from config key to a list of values. Every combination is one
  run, named by its values in axis order, as in ``elastic-mse``. A value that is not
  a string is written after its key, as in ``beta0.01``.
- ``runs``: a list of ``{name, overrides}`` entries, each one run.

A grid needs ``axes`` or ``runs``, and may have both. A run's config is the base file,
then the base mapping, then the run's values, then the command-line options of the
sweep. Every config is checked with ``load_config`` before the first run starts.

Runs go in order, in this process, each into ``OUT/<run name>/``. A run whose
``record.yaml`` exists and whose ``config.yaml`` equals the requested config is
skipped, so a sweep can be rerun after a failure or after adding runs. A run that
fails is logged, and the sweep goes on. ``OUT/sweep.md`` (a table of held-out figures)
and ``OUT/sweep.png`` (raw and centred cosine per run, with the mean-vector baseline)
are written at the end.
"""

from __future__ import annotations

import gc
import itertools
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from distill.alignment import alignment_label, collapse_warning
from distill.config import DistillConfig, load_config, read_yaml_mapping
from distill.eval import write_text_atomic
from extract.errors import UserError

logger = logging.getLogger(__name__)

GRID_KEYS = ("base", "axes", "runs")
RUN_KEYS = ("name", "overrides")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+=-]*")


@dataclass(frozen=True)
class PlannedRun:
    """One run of a sweep: its name and the config values it sets over the base."""

    name: str
    values: dict[str, Any]


@dataclass
class RunOutcome:
    """The outcome of one run: ``ran``, ``skipped`` (finished earlier) or ``failed`` with its error."""

    name: str
    values: dict[str, Any]
    config: DistillConfig
    status: str
    error: str | None = None

    def record(self) -> dict[str, Any] | None:
        """Return the run's ``record.yaml``, or None when it has none."""
        path = Path(self.config.out) / "record.yaml"
        if self.status == "failed" or not path.is_file():
            return None
        return yaml.safe_load(path.read_text(encoding="utf-8"))


@dataclass
class Grid:
    """A parsed grid file: the base config file and values, and the runs in order."""

    path: Path
    base_file: Path | None
    base_values: dict[str, Any]
    runs: list[PlannedRun]
    varied_keys: set[str] = field(default_factory=set)


def load_grid(path: Path) -> Grid:
    """Parse a grid file into its base and its runs; raise ``UserError`` on any malformed part."""
    path = Path(path)
    grid = read_yaml_mapping(path, "grid file")
    unknown = sorted(set(grid) - set(GRID_KEYS))
    if unknown:
        raise UserError(f"grid file {path} has unknown keys {unknown}; valid keys: {', '.join(GRID_KEYS)}")
    if not grid.get("axes") and not grid.get("runs"):
        raise UserError(f"grid file {path} has no runs: give 'axes' (key -> list of values) or 'runs' (a list)")

    base = grid.get("base") or {}
    if isinstance(base, str):
        base = {"config": base}
    if not isinstance(base, dict):
        raise UserError(f"grid file {path}: 'base' must be a config file path or a mapping of config keys")
    base_values = dict(base)
    base_file = base_values.pop("config", None)
    if base_file is not None:
        base_file = path.parent / str(base_file)

    runs = _axis_runs(path, grid.get("axes") or {}) + _listed_runs(path, grid.get("runs") or [])
    names = [run.name for run in runs]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UserError(f"grid file {path} has several runs named {', '.join(repeated)}; give each run its own name")
    varied = {key for run in runs for key in run.values}
    return Grid(path=path, base_file=base_file, base_values=base_values, runs=runs, varied_keys=varied)


def _axis_runs(path: Path, axes: Any) -> list[PlannedRun]:
    if not isinstance(axes, dict):
        raise UserError(f"grid file {path}: 'axes' must map config keys to lists of values")
    for key, values in axes.items():
        if not isinstance(values, list) or not values:
            raise UserError(f"grid file {path}: axis {key!r} must be a non-empty list of values, got {values!r}")
    if not axes:
        return []
    runs = []
    for combination in itertools.product(*axes.values()):
        values = dict(zip(axes, combination))
        name = "-".join(str(value) if isinstance(value, str) else f"{key}{value}" for key, value in values.items())
        runs.append(PlannedRun(_check_name(path, name), values))
    return runs


def _listed_runs(path: Path, entries: Any) -> list[PlannedRun]:
    if not isinstance(entries, list):
        raise UserError(f"grid file {path}: 'runs' must be a list of {{name, overrides}} entries")
    runs = []
    for position, entry in enumerate(entries, start=1):
        if not isinstance(entry, dict) or "name" not in entry:
            raise UserError(f"grid file {path}: run {position} must be a mapping with a 'name' and optional 'overrides'")
        unknown = sorted(set(entry) - set(RUN_KEYS))
        if unknown:
            raise UserError(f"grid file {path}: run {entry['name']!r} has unknown keys {unknown}; valid keys: name, overrides")
        overrides = entry.get("overrides") or {}
        if not isinstance(overrides, dict):
            raise UserError(f"grid file {path}: overrides of run {entry['name']!r} must be a mapping of config keys")
        runs.append(PlannedRun(_check_name(path, str(entry["name"])), dict(overrides)))
    return runs


def _check_name(path: Path, name: str) -> str:
    if not _RUN_NAME.fullmatch(name):
        raise UserError(
            f"grid file {path}: run name {name!r} is not usable as a folder name; "
            "use letters, digits and . _ + = - (not starting with a symbol)"
        )
    return name


def resolve_configs(grid: Grid, out_dir: Path, options: dict[str, Any]) -> list[tuple[PlannedRun, DistillConfig]]:
    """Build and validate the config of every run; ``options`` are command-line values, None when unset.

    Raises ``UserError`` before anything runs: for an option that would override a key
    the grid varies, and for any run whose config ``load_config`` rejects.
    """
    options = {key: value for key, value in options.items() if value is not None}
    clashing = sorted(set(options) & grid.varied_keys)
    if clashing:
        flags = ", ".join("--" + key.replace("_", "-") for key in clashing)
        raise UserError(f"{flags} would override a value that grid {grid.path} varies between runs; drop the option")
    base_file_values = read_yaml_mapping(grid.base_file, "base config file") if grid.base_file else {}

    resolved = []
    for run in grid.runs:
        values = {
            **base_file_values,
            **grid.base_values,
            **run.values,
            **options,
            "name": run.name,
            "out": str(out_dir / run.name),
            # The sweep owns OUT/<run>: an unfinished or outdated run there is replaced.
            "overwrite": True,
        }
        try:
            config = load_config(None, values)
        except UserError as exc:
            raise UserError(f"run {run.name!r} of grid {grid.path}: {exc}") from None
        resolved.append((run, config))
    return resolved


def is_finished(config: DistillConfig) -> bool:
    """Return whether ``config.out`` contains a record and a ``config.yaml`` equal to ``config``."""
    out = Path(config.out)
    if not (out / "record.yaml").is_file() or not (out / "config.yaml").is_file():
        return False
    saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    if saved == config.to_dict():
        return True
    if isinstance(saved, dict):
        changed = sorted(key for key in set(saved) | set(config.to_dict()) if saved.get(key) != config.to_dict().get(key))
        logger.info("sweep: %s has a finished run with other values of %s; running it again", out, ", ".join(changed))
    return False


def train_run(config: DistillConfig, progress: bool) -> None:
    from distill.recipe import DistillRecipe

    recipe = DistillRecipe(config, progress=progress)
    recipe.setup()
    recipe.train()
    recipe.save()


def run_sweep(grid_path: Path, out_dir: Path, options: dict[str, Any], *, progress: bool = True) -> list[RunOutcome]:
    """Run every run of the grid that is not finished yet, then write the table and the plot.

    Returns one outcome per run, in grid order. Exceptions from a run are logged and
    recorded in its outcome; only a bad grid or config raises (``UserError``), before
    any run starts.
    """
    grid = load_grid(grid_path)
    out_dir = Path(out_dir)
    planned = resolve_configs(grid, out_dir, options)
    out_dir.mkdir(parents=True, exist_ok=True)
    logger.info("sweep: %d runs from %s into %s", len(planned), grid.path, out_dir)

    outcomes = []
    for position, (run, config) in enumerate(planned, start=1):
        if is_finished(config):
            logger.info("sweep: run %d/%d %s is finished, skipping it", position, len(planned), run.name)
            outcomes.append(RunOutcome(run.name, run.values, config, "skipped"))
            continue
        logger.info("sweep: run %d/%d %s", position, len(planned), run.name)
        started = time.perf_counter()
        try:
            train_run(config, progress)
        except UserError as exc:
            logger.error("sweep: run %s failed: %s", run.name, exc)
            outcomes.append(RunOutcome(run.name, run.values, config, "failed", error=str(exc)))
        except Exception as exc:  # noqa: BLE001 - one broken run must not stop the others
            logger.exception("sweep: run %s failed with an unexpected error", run.name)
            outcomes.append(RunOutcome(run.name, run.values, config, "failed", error=f"{type(exc).__name__}: {exc}"))
        else:
            logger.info("sweep: run %s done in %.1f s", run.name, time.perf_counter() - started)
            outcomes.append(RunOutcome(run.name, run.values, config, "ran"))
        gc.collect()

    write_table(out_dir / "sweep.md", grid.path, outcomes)
    write_plot(out_dir / "sweep.png", grid.path, outcomes)
    return outcomes


# ---------------------------------------------------------------------- report

TABLE_COLUMNS = (
    "run", "status", "loss", "projector", "beta", "other settings", "held-out raw cos", "centred cos",
    "mean-vector baseline", "shuffled raw cos", "shuffled centred cos", "label", "collapse", "train s",
)
# Keys with a column of their own; other keys a run sets go to "other settings".
_OWN_COLUMNS = ("loss", "projector", "beta")


def final_figures(outcome: RunOutcome) -> dict[str, Any] | None:
    """Return the held-out figures at the end of the run, from its record, or None."""
    record = outcome.record()
    if not record:
        return None
    return (record.get("results") or {}).get("final")


def table_row(outcome: RunOutcome) -> list[str]:
    config = outcome.config
    others = ", ".join(f"{key}={value}" for key, value in outcome.values.items() if key not in _OWN_COLUMNS)
    cells = [outcome.name, outcome.status, config.loss, config.projector, f"{config.beta:g}", others or "-"]
    figures = final_figures(outcome)
    if figures is None:
        return cells + ["-"] * (len(TABLE_COLUMNS) - len(cells))
    metrics = ("raw_cos", "centred_cos", "baseline_cos", "shuffled_raw_cos", "shuffled_centred_cos")
    cells += [f"{figures[name]:.4f}" if name in figures else "-" for name in metrics]
    collapsed = collapse_warning(figures["raw_cos"], figures["baseline_cos"], centred_cos=figures["centred_cos"]) is not None
    seconds = (outcome.record() or {}).get("training", {}).get("seconds")
    cells += [alignment_label(figures["centred_cos"]), "yes" if collapsed else "no", "-" if seconds is None else f"{seconds:.1f}"]
    return cells


def write_table(path: Path, grid_path: Path, outcomes: list[RunOutcome]) -> None:
    """Write the Markdown table of all runs, and the errors of failed runs below it."""
    store = outcomes[0].config.store if outcomes else "-"
    lines = [
        f"# Sweep {grid_path}",
        "",
        f"Store: {store}. Figures are held-out cosines at the end of each run, read from its record.yaml.",
        "The label is taken on centred cosine. Collapse: raw cosine within 0.05 of the mean-vector",
        "baseline, so a constant student would score about as well, or raw cosine more than 0.3",
        "above centred cosine, so most of the raw agreement is the shared mean direction.",
        "",
        "| " + " | ".join(TABLE_COLUMNS) + " |",
        "|" + "|".join("---" for _ in TABLE_COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in table_row(outcome)) + " |" for outcome in outcomes]
    failed = [outcome for outcome in outcomes if outcome.status == "failed"]
    if failed:
        lines += ["", "## Failed runs", ""]
        lines += [f"- {outcome.name}: {outcome.error}" for outcome in failed]
    write_text_atomic(path, "\n".join(lines) + "\n")


def write_plot(path: Path, grid_path: Path, outcomes: list[RunOutcome]) -> bool:
    """Draw grouped bars of raw and centred cosine per run, with the mean-vector baseline; return whether written."""
    measured = [(outcome.name, figures) for outcome in outcomes if (figures := final_figures(outcome))]
    if not measured:
        logger.warning("sweep: no run has held-out figures, so %s was not written", path)
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("sweep: matplotlib is not installed, so %s was not written; install mercator-kv[plot]", path)
        return False

    positions = range(len(measured))
    width = 0.38
    figure, axes = plt.subplots(figsize=(max(6.0, 0.9 * len(measured) + 2.0), 4.5))
    raw = [figures["raw_cos"] for _, figures in measured]
    centred = [figures["centred_cos"] for _, figures in measured]
    axes.bar([x - width / 2 for x in positions], raw, width, label="raw cosine", color="#9db4d6")
    axes.bar([x + width / 2 for x in positions], centred, width, label="centred cosine", color="#1f4e8c")
    # The baseline belongs to raw cosine: what a constant student scores.
    axes.hlines(
        [figures["baseline_cos"] for _, figures in measured],
        [x - width for x in positions], list(positions), colors="#c0392b", linewidths=2, label="mean-vector baseline",
    )
    axes.axhline(0.0, color="black", linewidth=0.6)
    axes.set_xticks(list(positions), [name for name, _ in measured], rotation=30, ha="right")
    lowest = min(0.0, *raw, *centred, *(figures["baseline_cos"] for _, figures in measured))
    axes.set_ylim(lowest - 0.05, 1.0)
    axes.set_ylabel("held-out cosine")
    axes.set_title(f"Sweep {grid_path.name}")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True
