"""``moespec compare``: rank the runs of one sweep (or of several experiments) by a metric.

Metrics are the scalars of each stage's ``summary.json`` (:func:`moespec.analysis.report.run_metrics`),
parameters the config keys that differ between the runs. The comparison is data
(:class:`Comparison`): a ranking, the improvement of each run over a baseline run, and the Pearson
correlation across runs between every numeric swept parameter and every metric; it is written as
CSV and JSON. Figures: the runs' per-epoch validation curves overlaid, and the correlation matrix
(:func:`moespec.analysis.plots.plot_heatmap`) only with enough runs to tell a correlation from
noise (:func:`correlation_figure_reason` says why not otherwise).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moespec.analysis.report import run_metrics
from moespec.analysis.results import STAGES, Run, discover, flat_config, varied_parameters
from moespec.errors import MoespecError

#: The default ranking metric: the first of these the runs have.
DEFAULT_SORT = (
    "train.val_accuracy",
    "ablate.baseline.accuracy",
    "ablate.nmi_class[0]",
    "lm.val_loss",
    "fiber.rejection_rate",
    "reduce.variance_retained",
)
#: Fewer runs than this leave a correlation undefined (n/a), rather than a meaningless ±1.
MIN_RUNS_FOR_CORRELATION = 3
#: The correlation figure is drawn only with at least this many runs and a parameter taking at least
#: MIN_DISTINCT_VALUES values: with n runs, |r| below about 2 / sqrt(n) is indistinguishable from
#: zero (the 95 % bound of r under independence), so 3 or 4 runs can only show noise.
MIN_RUNS_FOR_FIGURE = 6
MIN_DISTINCT_VALUES = 3


@dataclass
class Comparison:
    """A ranking of runs by ``metric``.

    Attributes
    ----------
    rows : list of dict
        Best first: ``rank``, ``run``, ``experiment``, each parameter, ``metric`` value (None:
        the run has no such result), ``improvement`` over the baseline (positive = better).
    correlation : ndarray of shape (n_numeric_parameters, n_metrics)
        Pearson correlation across runs having both values (NaN: fewer than
        ``MIN_RUNS_FOR_CORRELATION`` runs, or a constant column).
    """

    metric: str
    higher_is_better: bool
    baseline: str
    parameters: list[str]
    metrics: list[str]
    rows: list[dict[str, Any]]
    numeric_parameters: list[str] = field(default_factory=list)
    correlation_metrics: list[str] = field(default_factory=list)
    correlation: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    correlation_counts: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=int))
    distinct_values: dict[str, int] = field(default_factory=dict)
    curves: dict[str, dict[str, Any]] = field(default_factory=dict)
    lm_curves: Optional[dict[str, Any]] = None  # validation-loss curves of the lm runs (analysis.lm)


def lower_is_better(metric: str) -> bool:
    """Losses, rejection rates on null data and dead experts are better low; everything else high."""
    name = metric.split(".", 1)[-1]
    return any(
        word in name for word in ("loss", "dead", "load_cv", "davies_bouldin", "null_", "bits_per_byte", "perplexity")
    )


def collect_runs(experiment_dirs: list[Path | str]) -> list[tuple[str, Run]]:
    """``(experiment name, run)`` for every run of every experiment folder; names made unique."""
    runs: list[tuple[str, Run]] = []
    for folder in experiment_dirs:
        experiment = discover(folder)
        for run in experiment.runs:
            if len(experiment_dirs) > 1:
                run.name = f"{experiment.name}/{run.name}"
            runs.append((experiment.name, run))
    return runs


def _number(value: Any) -> Optional[float]:
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _pearson(x: list[Optional[float]], y: list[Optional[float]]) -> tuple[float, int]:
    pairs = np.array([(a, b) for a, b in zip(x, y) if a is not None and b is not None], dtype=float)
    n = len(pairs)
    if n < MIN_RUNS_FOR_CORRELATION or np.ptp(pairs[:, 0]) == 0 or np.ptp(pairs[:, 1]) == 0:
        return math.nan, n
    return float(np.corrcoef(pairs[:, 0], pairs[:, 1])[0, 1]), n


def compare(
    experiment_dirs: list[Path | str],
    *,
    sort_by: Optional[str] = None,
    baseline: Optional[str] = None,
    higher_is_better: Optional[bool] = None,
) -> Comparison:
    """Rank the runs of ``experiment_dirs`` by ``sort_by`` (default: the first headline metric they have).

    ``baseline`` is a run name (or its 1-based position in discovery order); default: the first run.
    """
    named_runs = collect_runs(experiment_dirs)
    if not named_runs:
        raise MoespecError(f"no runs found under {', '.join(map(str, experiment_dirs))}")
    runs = [run for _, run in named_runs]
    parameters = varied_parameters(runs)
    configs = [flat_config(r) for r in runs]
    metrics_of = [run_metrics(r) for r in runs]
    metrics = sorted({m for values in metrics_of for m in values})
    if sort_by is None:
        sort_by = next((m for m in DEFAULT_SORT if m in metrics), metrics[0] if metrics else "")
    if sort_by not in metrics:
        raise MoespecError(
            f"no run has metric {sort_by!r}; metrics: {', '.join(metrics) or '(none: no stage finished)'}"
        )
    higher = (not lower_is_better(sort_by)) if higher_is_better is None else higher_is_better
    base_index = _baseline_index(runs, baseline)
    base_value = metrics_of[base_index].get(sort_by)
    rows = []
    for (experiment, run), config, values in zip(named_runs, configs, metrics_of):
        value = values.get(sort_by)
        improvement = None
        if value is not None and base_value is not None:
            improvement = (value - base_value) if higher else (base_value - value)
        rows.append(
            {
                "run": run.name,
                "experiment": experiment,
                **{p: config.get(p) for p in parameters},
                sort_by: value,
                "improvement": improvement,
                "baseline": runs[base_index].name,
                **{f"status.{s}": run.status(s) for s in STAGES},
            }
        )
    rows.sort(key=lambda r: (r[sort_by] is None, -(r[sort_by] or 0) if higher else (r[sort_by] or 0)))
    for rank, row in enumerate(rows, 1):
        row["rank"] = rank if row[sort_by] is not None else None
    comparison = Comparison(sort_by, higher, runs[base_index].name, parameters, metrics, rows)
    _correlate(comparison, configs, metrics_of)
    comparison.curves = _curves(runs, parameters, configs)
    from moespec.analysis.lm import sweep_curves

    comparison.lm_curves = sweep_curves(named_runs)
    return comparison


def _curves(runs: list[Run], parameters: list[str], configs: list[dict]) -> dict[str, dict[str, Any]]:
    """Per-epoch validation curves of every run with a train artifact here, labelled by its parameters."""
    from moespec.analysis.loaders import train_curves

    curves = {}
    for run, config in zip(runs, configs):
        task = run.tasks.get("train")
        loaded = train_curves(task) if task is not None and task.status == "done" else None
        if loaded is not None:
            shown = ", ".join(
                f"{p.split('.')[-1]}={_label(config.get(p))}"
                for p in parameters
                if p.startswith("train.") and p in config
            )
            curves[f"{run.name}" + (f" ({shown})" if shown else "")] = loaded
    return curves


def _label(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 16 else text[:15] + "…"


def _baseline_index(runs: list[Run], baseline: Optional[str]) -> int:
    if baseline is None:
        return 0
    names = [r.name for r in runs]
    if baseline in names:
        return names.index(baseline)
    matches = [i for i, n in enumerate(names) if n.startswith(baseline) or n.split("/")[-1].startswith(baseline)]
    if len(matches) == 1:
        return matches[0]
    if baseline.isdigit() and 1 <= int(baseline) <= len(runs):
        return int(baseline) - 1
    raise MoespecError(f"baseline {baseline!r} is not a run; runs: {', '.join(names)}")


def _correlate(comparison: Comparison, configs: list[dict], metrics_of: list[dict]) -> None:
    numeric = [
        p
        for p in comparison.parameters
        if all(_number(c.get(p)) is not None for c in configs if p in c) and sum(p in c for c in configs) >= 2
    ]
    metric_names = [m for m in comparison.metrics if sum(m in v for v in metrics_of) >= 2]
    correlation = np.full((len(numeric), len(metric_names)), np.nan)
    counts = np.zeros((len(numeric), len(metric_names)), dtype=int)
    for i, parameter in enumerate(numeric):
        x = [_number(c.get(parameter)) for c in configs]
        for j, metric in enumerate(metric_names):
            correlation[i, j], counts[i, j] = _pearson(x, [_number(v.get(metric)) for v in metrics_of])
    comparison.numeric_parameters, comparison.correlation_metrics = numeric, metric_names
    comparison.correlation, comparison.correlation_counts = correlation, counts
    comparison.distinct_values = {p: len({_number(c.get(p)) for c in configs if p in c}) for p in numeric}


def correlation_figure_reason(comparison: Comparison) -> Optional[str]:
    """Why no correlation figure is drawn (None: it is drawn)."""
    n_runs = len(comparison.rows)
    if not comparison.numeric_parameters:
        return "no numeric swept parameter to correlate with the metrics"
    if n_runs < MIN_RUNS_FOR_FIGURE:
        bound = 2 / math.sqrt(max(n_runs, 1))
        chance = f"|r| below {bound:.2f} is within chance" if bound < 1 else "any |r| up to 1 arises by chance"
        return (
            f"{n_runs} runs: a correlation across fewer than {MIN_RUNS_FOR_FIGURE} runs cannot be told from "
            f"noise ({chance}); the values are in compare.json"
        )
    if max(comparison.distinct_values.values(), default=0) < MIN_DISTINCT_VALUES:
        return (
            f"every numeric parameter takes fewer than {MIN_DISTINCT_VALUES} values: a correlation with two "
            "values is a difference of means (see the ranking)"
        )
    return None


# --------------------------------------------------------------------------------------------------
# output


def columns(comparison: Comparison) -> list[str]:
    return [
        "rank",
        "run",
        "experiment",
        *comparison.parameters,
        comparison.metric,
        "improvement",
        "baseline",
        *[f"status.{s}" for s in STAGES],
    ]


def to_csv(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns(comparison), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in comparison.rows:
        writer.writerow(
            {k: ("" if v is None else json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in row.items()}
        )
    return buffer.getvalue()


def to_json(comparison: Comparison) -> dict[str, Any]:
    def plain(value: float) -> Optional[float]:
        return None if math.isnan(value) else value

    return {
        "metric": comparison.metric,
        "higher_is_better": comparison.higher_is_better,
        "baseline": comparison.baseline,
        "parameters": comparison.parameters,
        "rows": comparison.rows,
        "correlation": {
            "parameters": comparison.numeric_parameters,
            "metrics": comparison.correlation_metrics,
            "pearson": [[plain(v) for v in row] for row in comparison.correlation.tolist()],
            "n_runs": comparison.correlation_counts.tolist(),
            "note": f"Pearson r across runs; null: fewer than {MIN_RUNS_FOR_CORRELATION} runs or a constant column",
            "figure": correlation_figure_reason(comparison) or "correlation.png",
        },
    }


def format_comparison(comparison: Comparison) -> str:
    from moespec.analysis.loaders import format_number

    header = columns(comparison)[:-5]
    rows = [
        [
            (
                "-"
                if row.get(c) is None
                else format_number(row[c])
                if not isinstance(row.get(c), (dict, list))
                else json.dumps(row[c])
            )[:40]
            for c in header
        ]
        for row in comparison.rows
    ]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    direction = "higher" if comparison.higher_is_better else "lower"
    return (
        f"runs ranked by {comparison.metric} ({direction} is better); improvement over {comparison.baseline}\n"
        + "\n".join(lines)
    )


def correlation_figure_data(comparison: Comparison) -> dict[str, Any]:
    """What :func:`~moespec.analysis.plots.plot_heatmap` draws for the correlation matrix."""
    n_runs = len(comparison.rows)
    return {
        "values": comparison.correlation,
        "rows": [p.split(".", 1)[-1] for p in comparison.numeric_parameters],
        "columns": comparison.correlation_metrics,
        "center": 0.0,
        "limits": (-1.0, 1.0),
        "xlabel": "metric",
        "ylabel": "swept parameter",
        "colorbar": "Pearson r (blank: undefined)",
        "title": f"parameter × metric correlation across {n_runs} runs",
    }


def write_comparison(comparison: Comparison, out: Path | str) -> dict[str, Path]:
    """Write ``compare.csv``, ``compare.json`` and (when there is a numeric parameter) ``correlation.png``."""
    from moespec.analysis.report import _write_text, save_figure
    from moespec.analysis.loaders import Figure
    from moespec.analysis import plots

    out = Path(out)
    written = {"csv": out / "compare.csv", "json": out / "compare.json"}
    _write_text(written["csv"], to_csv(comparison))
    _write_text(written["json"], json.dumps(to_json(comparison), indent=2, default=str))
    if comparison.correlation.size and correlation_figure_reason(comparison) is None:
        written["figure"] = out / "correlation.png"
        rows, cols = comparison.correlation.shape
        labels = max((len(p.split(".", 1)[-1]) for p in comparison.numeric_parameters), default=8)
        save_figure(
            Figure(
                "correlation",
                plots.plot_heatmap,
                correlation_figure_data(comparison),
                "correlation",
                size=plots.heatmap_size(rows, cols, labels),
            ),
            written["figure"],
        )
    for name, figure in overlay_figures(comparison).items():
        written[name] = out / f"{name}.png"
        save_figure(figure, written[name])
    if comparison.lm_curves:
        from moespec.analysis.lm import plot_sweep_curves

        written["lm_curves"] = out / "lm_loss_curves.png"
        save_figure(
            Figure("lm_curves", plot_sweep_curves, comparison.lm_curves, "lm validation loss"), written["lm_curves"]
        )
    return written


def overlay_figures(comparison: Comparison) -> dict[str, Any]:
    """One figure per validation curve with every run's curve overlaid (when two or more runs have one)."""
    from moespec.analysis import plots
    from moespec.analysis.loaders import Figure

    figures = {}
    for key, ylabel, ylim in (
        ("val_accuracy", "validation accuracy (fraction)", (0, 1)),
        ("val_loss", "validation loss, total (mean per row)", None),
    ):
        runs = {name: c for name, c in comparison.curves.items() if c.get(key) is not None}
        if len(runs) < 2:
            continue
        longest = max(runs.values(), key=lambda c: len(c["epoch"]))["epoch"]
        figures[f"overlay_{key}"] = Figure(
            f"overlay_{key}",
            plots.plot_curves,
            {
                "x": longest,
                "xs": {name: c["epoch"] for name, c in runs.items()},
                "series": {name: c[key] for name, c in runs.items()},
                "xlabel": "epoch",
                "ylabel": ylabel,
                "ylim": ylim,
                "title": f"{ylabel.split(' (')[0]} per epoch, {len(runs)} runs of the sweep",
                "legend_below": True,
            },
            f"{key} of every run",
            size=(10.8, 4.4 + 0.22 * len(runs)),
        )
    return figures
