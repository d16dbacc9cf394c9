"""Read each stage's artifact once into report sections: tables of numbers and data for plots.

A section holds :class:`Table` objects whose number cells remember the artifact, dataset and
index they were read from (so the HTML can be checked against the artifacts) and :class:`Figure`
objects pairing a ``plot_*`` function of :mod:`moespec.analysis.plots` with the data it draws.
The numbers are the stages' own; the few things derived here for reading them are said where
shown: the Wilson interval of a rejection rate from its count of testable points (when the stage
wrote no bounds), the mean and range of the null repeats, and the chance level of an accuracy
(the most frequent held-out target's share).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from moespec.analysis import plots
from moespec.analysis.results import TaskRecord


@dataclass
class Cell:
    """A number read from an artifact: ``dataset[index]`` of the artifact ``stage/uid``."""

    value: Any
    stage: str = ""
    uid: str = ""
    dataset: str = ""
    index: tuple[int, ...] = ()

    @property
    def text(self) -> str:
        return format_number(self.value)


@dataclass
class Table:
    title: str
    header: list[str]
    rows: list[list[Any]]
    note: str = ""


@dataclass
class Figure:
    name: str
    plot: Callable[[Any, Any], None]
    data: dict[str, Any]
    caption: str
    size: tuple[float, float] = plots.FIGSIZE


@dataclass
class Section:
    title: str
    stage: str
    task: Optional[TaskRecord]
    tables: list[Table] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    message: str = ""


def format_number(value: Any) -> str:
    """Three significant digits (integers as integers, thousands grouped); ``n/a`` for NaN.

    A count stored as an integer prints whole (``1200``); a float prints ``0.475``, ``15.3``,
    ``7,100`` or ``1.2e-05``; the full value stays in the cell's ``data-value`` attribute.
    """
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}" if abs(int(value)) >= 10_000 else str(int(value))
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return "n/a"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        if value == 0:
            return "0"
        if abs(value) >= 1000:
            digits = 3 - int(math.floor(math.log10(abs(value)))) - 1
            return f"{round(value, digits):,.0f}"
        if abs(value) < 1e-3:
            return f"{value:.2e}"
        return f"{value:.3g}"
    return str(value)


def binomial_interval(rate: np.ndarray, n: np.ndarray, z: float = 1.959964) -> tuple[np.ndarray, np.ndarray]:
    """Wilson score interval of a proportion (Wilson 1927, JASA 22:209-212), 95 % by default.

    Parameters
    ----------
    rate : ndarray of shape (n_groups,)
        Observed proportions (NaN where ``n`` is 0).
    n : ndarray of shape (n_groups,)
        Trials behind each proportion.

    Returns
    -------
    low, high : ndarray of shape (n_groups,)
        NaN where ``n`` is 0.
    """
    rate, n = np.asarray(rate, dtype=float), np.asarray(n, dtype=float)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
        half = z * np.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


class _Source:
    """Cells from one open artifact."""

    def __init__(self, task: TaskRecord, reader):
        self.task, self.reader = task, reader

    def has(self, name: str) -> bool:
        return name in self.reader

    def array(self, name: str) -> np.ndarray:
        return self.reader.read(name)

    def cell(self, name: str, *index: int) -> Cell:
        value = self.reader.read(name)
        value = value[index] if index else value
        value = value.item() if isinstance(value, np.generic) or getattr(value, "ndim", 1) == 0 else value
        return Cell(value, self.task.stage, self.task.uid, name, tuple(index))

    def names(self, name: str) -> list[str]:
        return [str(v) for v in self.reader.read(name)] if name in self.reader else []

    def keys(self, group: str) -> list[str]:
        return sorted(self.reader.h5[group].keys()) if group in self.reader else []


# --------------------------------------------------------------------------------------------------
# reduce


_ESTIMATORS = {
    "pca_count": "ID pca@{threshold} (PCA components, reduced variance)",
    "pca_count_input": "ID pca@{threshold} (PCA components, embedding variance)",
    "twonn": "ID TwoNN",
    "mle_levina_bickel": "ID MLE (Levina-Bickel, k = {mle_k})",
}
#: Most points drawn in a scatter (evenly spaced rows beyond that: the figure stays a few hundred kB).
SCATTER_MAX_POINTS = 20_000


def _estimator_name(name: str, attrs: dict[str, Any]) -> str:
    """Readable estimator name; ``attrs``: the reduce stage's ``id_*`` root attributes (threshold, mle_k)."""
    template = _ESTIMATORS.get(name, name)
    text = template.format(threshold=f"{float(attrs.get('threshold', 0.75)):g}", mle_k=attrs.get("mle_k", "?"))
    return text.replace(", k = ?", "")


def reduce_section(source: _Source) -> Section:
    section = Section("PCA and intrinsic dimension (reduce)", "reduce", source.task)
    ratio = source.array("explained_variance_ratio")
    n_samples = len(source.reader["reduced"])
    id_attrs = {k.removeprefix("id_"): v for k, v in source.reader.attrs.items() if k.startswith("id_")}
    section.tables.append(
        Table(
            "variance retained",
            ["components", "variance retained (fraction)"],
            [[len(ratio), source.cell("variance_retained")]],
        )
    )
    estimators = source.keys("id/global")
    section.tables.append(
        Table(
            f"intrinsic dimension, global (N = {n_samples})",
            ["estimator", "dimension"],
            [[_estimator_name(e, id_attrs), source.cell(f"id/global/{e}")] for e in estimators],
        )
    )
    domains = source.names("domain_names")
    per_domain = [e for e in source.keys("id/per_domain") if e != "n_points"]
    section.tables.append(
        Table(
            "intrinsic dimension per domain",
            ["domain", "points", *[_estimator_name(e, id_attrs) for e in per_domain]],
            [
                [
                    d,
                    source.cell("id/per_domain/n_points", i),
                    *[source.cell(f"id/per_domain/{e}", i) for e in per_domain],
                ]
                for i, d in enumerate(domains)
            ],
            "n/a: too few points in the domain for the estimator",
        )
    )
    section.figures.append(
        Figure(
            "explained_variance",
            plots.plot_explained_variance,
            {"explained_variance_ratio": ratio, "n_samples": n_samples, "n_features": source.reader["mean"].shape[0]},
            "explained variance ratio per principal component and cumulative",
        )
    )
    if source.has("domain") and source.reader["reduced"].shape[1] >= 2:
        section.figures.append(pca_scatter(source.reader, source.array("domain"), domains, "domain"))
    return section


def pca_scatter(reduce_reader, group: np.ndarray, names: list[str], key: str) -> Figure:
    """The first two principal components of a reduce artifact, one colour and marker per group."""
    n = len(reduce_reader["reduced"])
    rows = np.unique(np.linspace(0, n - 1, min(n, SCATTER_MAX_POINTS)).astype(np.int64))
    coordinates = np.asarray(reduce_reader["reduced"][rows, :2], dtype=float)  # h5py: increasing rows
    ratio = np.asarray(reduce_reader.read("explained_variance_ratio"), dtype=float)
    shown = f"{len(rows)} of {n} points (evenly spaced rows)" if len(rows) < n else f"{n} points"
    return Figure(
        f"pca_scatter_{key}",
        plots.plot_scatter,
        {
            "x": coordinates[:, 0],
            "y": coordinates[:, 1],
            "group": np.asarray(group)[rows],
            "group_names": names,
            "xlabel": f"PC 1 ({100 * ratio[0]:.1f} % of variance)",
            "ylabel": f"PC 2 ({100 * ratio[1]:.1f} % of variance)",
            "title": f"embeddings on the first two principal components by {key}, {shown}",
        },
        f"2-D PCA of the embeddings coloured by {key}",
        size=(8.0, 5.2),
    )


# --------------------------------------------------------------------------------------------------
# fiber


_RATES = {
    "rejection_rate": "manifold test",
    "fiber_rejection_rate": "fiber-bundle test",
    "fiber_small_rejection_rate": "fiber-bundle test, small radii",
    "fiber_large_rejection_rate": "fiber-bundle test, large radii",
}


def _null_repeats(source: _Source, rate: str) -> np.ndarray:
    """The null rates of every repeat (``null/<rate>``, shape (n_repeats,)); empty when absent."""
    name = f"null/{rate}"
    if not source.has(name) or not hasattr(source.reader[name], "shape"):
        return np.zeros(0)
    return np.atleast_1d(np.asarray(source.array(name), dtype=float))


def _rate_interval(source: _Source, group: str, rate: str, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The stage's own bounds (``<rate>_low``/``_high``) when it wrote them, else Wilson's interval."""
    name = f"rates/{group}/{rate}"
    if source.has(f"{name}_low") and source.has(f"{name}_high"):
        return source.array(f"{name}_low"), source.array(f"{name}_high")
    return binomial_interval(np.atleast_1d(source.array(name)), np.atleast_1d(n))


def fiber_section(source: _Source) -> Section:
    section = Section("Fiber-bundle test and strata (fiber)", "fiber", source.task)
    rates = [r for r in _RATES if source.has(f"rates/overall/{r}")]
    n_tested = len(source.reader["points/index"])
    testable = source.array("points/testable").astype(bool)
    n_testable = int(testable.sum())
    nulls = {r: _null_repeats(source, r) for r in rates}
    n_repeats = max((len(v) for v in nulls.values()), default=0)
    rows = []
    for rate in rates:
        low, high = _rate_interval(source, "overall", rate, np.array([n_testable]))
        null = nulls[rate]
        rows.append(
            [
                _RATES[rate],
                source.cell(f"rates/overall/{rate}"),
                f"{format_number(low[0])} – {format_number(high[0])}",
                format_number(float(null.mean())) if null.size else "not run",
                (
                    f"{format_number(float(null.min()))} – {format_number(float(null.max()))}"
                    if null.size > 1
                    else "one repeat"
                    if null.size
                    else "-"
                ),
            ]
        )
    section.tables.append(
        Table(
            f"rejection rates: {n_testable} testable of {n_tested} tested points, "
            f"null data repeated {n_repeats} time(s)",
            ["test", "rejection rate (fraction)", "95 % interval", "null: mean rate", "null: range over repeats"],
            rows,
            "only a rate well above its null rate is evidence of structure; interval: Wilson, over testable points",
        )
    )
    if n_repeats:
        section.tables.append(
            Table(
                "null data: rejection rate of each repeat (fresh draws of matched smooth data)",
                ["test", *[f"repeat {i + 1}" for i in range(n_repeats)]],
                [
                    [_RATES[r], *[source.cell(f"null/{r}", i) if i < len(nulls[r]) else "-" for i in range(n_repeats)]]
                    for r in rates
                ],
            )
        )
    domains, strata = source.names("domain_names"), list(range(len(source.reader["strata/n_points"])))
    stratum_names = [f"stratum {s}" for s in strata]
    for key, names in (("per_domain", domains), ("per_stratum", stratum_names)):
        section.tables.append(
            Table(
                f"rejection rates {key.replace('_', ' ')} (read against the overall null rate)",
                ["group", "testable points", *[f"{_RATES[r]} (fraction)" for r in rates]],
                [
                    [n, source.cell(f"rates/{key}/n_testable", i), *[source.cell(f"rates/{key}/{r}", i) for r in rates]]
                    for i, n in enumerate(names)
                ],
            )
        )
    levels = source.array("local_dimension/levels")
    section.tables.append(
        Table(
            "local dimension quantiles (testable points)",
            ["quantile level", "small-radius slope", "large-radius slope"],
            [
                [
                    source.cell("local_dimension/levels", q),
                    source.cell("local_dimension/small", q),
                    source.cell("local_dimension/large", q),
                ]
                for q in range(len(levels))
            ],
        )
    )
    scores = [s for s in ("silhouette", "davies_bouldin", "calinski_harabasz") if source.has(f"strata/{s}")]
    section.tables.append(
        Table("strata scores", ["score", "value"], [[s.replace("_", "-"), source.cell(f"strata/{s}")] for s in scores])
    )
    dims = source.keys("strata/dimension")
    section.tables.append(
        Table(
            "strata: size and intrinsic dimension",
            ["stratum", "points", *[_estimator_name(e, {}) for e in dims]],
            [
                [
                    f"stratum {s}",
                    source.cell("strata/n_points", s),
                    *[source.cell(f"strata/dimension/{e}", s) for e in dims],
                ]
                for s in strata
            ],
        )
    )
    for key, names in (("per_domain", domains), ("per_stratum", stratum_names)):
        section.figures.append(_rates_figure(source, key, names, rates[:2], nulls, n_testable))
    if source.has("strata/candidate_k"):
        method = source.task.config.get("strata", {}).get("selection", "selection criterion")
        section.figures.append(
            Figure(
                "strata_selection",
                plots.plot_curves,
                {
                    "x": source.array("strata/candidate_k"),
                    "series": {str(method): source.array("strata/candidate_score")},
                    "marker_x": len(strata),
                    "marker_label": f"chosen k = {len(strata)}",
                    "xlabel": "number of strata k",
                    "ylabel": f"{method} (score)",
                    "title": f"choice of the number of strata, N = {len(source.reader['strata/labels'])}",
                },
                "selection criterion per candidate number of strata",
            )
        )
    section.figures.append(
        Figure(
            "local_dimension",
            plots.plot_histograms,
            {
                "samples": {
                    "small-radius slope": source.array("points/dimension_small")[testable],
                    "large-radius slope": source.array("points/dimension_large")[testable],
                },
                "xlabel": "local dimension (log-count / log-radius slope)",
                "title": f"local dimensions of {n_testable} testable points",
            },
            "distribution of local dimensions",
            size=(8.0, 4.0),
        )
    )
    table = source.array("strata/domain_table")
    section.tables.append(
        Table(
            "domain × stratum (rows)",
            ["domain", *stratum_names],
            [[d, *[source.cell("strata/domain_table", i, s) for s in strata]] for i, d in enumerate(domains)],
        )
    )
    section.figures.append(
        Figure(
            "domain_stratum",
            plots.plot_heatmap,
            {
                "values": table,
                "rows": domains,
                "columns": stratum_names,
                "xlabel": "stratum",
                "ylabel": "domain",
                "colorbar": "rows (count)",
                "title": f"domain × stratum, N = {int(table.sum())}",
                "text_format": "{:.0f}",
            },
            "rows of each domain in each stratum",
            size=plots.heatmap_size(len(domains), len(strata), max(map(len, domains), default=8)),
        )
    )
    scatter = _stratum_scatter(source, stratum_names)
    if scatter is not None:
        section.figures.append(scatter)
    return section


def _rates_figure(
    source: _Source, key: str, names: list[str], rates: list[str], nulls: dict[str, np.ndarray], n_testable: int
) -> Figure:
    """Per-group rates with their intervals beside the overall rate, and the null band of each test."""
    groups = ["all points", *names]
    n = np.concatenate([[n_testable], source.array(f"rates/{key}/n_testable")])
    series, low, high = {}, {}, {}
    for rate in rates:
        values = np.concatenate([[float(source.array(f"rates/overall/{rate}"))], source.array(f"rates/{key}/{rate}")])
        overall = _rate_interval(source, "overall", rate, np.array([n_testable]))
        group = _rate_interval(source, key, rate, n[1:])
        series[_RATES[rate]] = values
        low[_RATES[rate]] = np.concatenate([overall[0], group[0]])
        high[_RATES[rate]] = np.concatenate([overall[1], group[1]])
    band = {
        f"null, {_RATES[r]}: range of {len(nulls[r])} repeat(s)": (float(nulls[r].min()), float(nulls[r].max()))
        for r in rates
        if nulls[r].size
    }
    reference = {f"null, {_RATES[r]}: mean": float(nulls[r].mean()) for r in rates if nulls[r].size}
    label = key.replace("_", " ")
    return Figure(
        f"rates_{key}",
        plots.plot_grouped_bars,
        {
            "groups": groups,
            "series": series,
            "low": low,
            "high": high,
            "reference_band": band,
            "reference": reference,
            "ylabel": "rejection rate (fraction of testable points)",
            "title": f"rejection rates {label}, {n_testable} testable points; bars: 95 % interval",
        },
        f"manifold and fiber-bundle rejection rates {label} with 95 % intervals, beside the null data's rates",
        size=(min(plots.MAX_WIDTH, 6.5 + 0.45 * len(groups)), 4.6),
    )


def _stratum_scatter(source: _Source, stratum_names: list[str]) -> Optional[Figure]:
    """The reduce input's first two principal components coloured by stratum (None: input not here)."""
    from moespec.artifacts import open_artifact
    from moespec.errors import ArtifactError

    uid = source.task.input_uids.get("reduce")
    if source.task.config.get("input", "reduce") != "reduce" or not uid:
        return None
    path = source.task.dir.parent.parent / "reduce" / uid / "reduce.h5"
    try:
        with open_artifact(path) as reduce_reader:
            if reduce_reader["reduced"].shape[1] < 2:
                return None
            return pca_scatter(reduce_reader, source.array("strata/labels"), stratum_names, "stratum")
    except (ArtifactError, OSError, KeyError):
        return None


# --------------------------------------------------------------------------------------------------
# train


def _chance(source: _Source) -> tuple[Optional[float], str]:
    """Accuracy of always answering the most frequent held-out target, and what the target is.

    The target is the root attribute ``target``: ``label``, ``domain`` or ``domain_label`` (the pair
    (domain, label), the dictionary MoE's key); the classifier's own ids are ``heldout/target``.
    """
    target = str(source.reader.attrs.get("target") or source.task.config.get("model", {}).get("target") or "")
    columns = {
        "label": ["heldout/label"],
        "domain": ["heldout/domain"],
        "domain_label": ["heldout/domain", "heldout/label"],
    }.get(target, [])
    if source.has("heldout/target") and not hasattr(source.reader["heldout/target"], "keys"):
        columns = ["heldout/target"]
    if not columns or not all(source.has(c) for c in columns):
        return None, target
    keys = np.stack([np.asarray(source.array(c), dtype=np.int64).ravel() for c in columns], axis=1)
    _, counts = np.unique(keys, axis=0, return_counts=True)
    return (float(counts.max() / counts.sum()) if counts.sum() else None), target


def train_section(source: _Source) -> Section:
    model = source.task.config.get("model", {}).get("kind", "?")
    section = Section(f"MoE training (train, {model})", "train", source.task)
    epochs = source.array("curves/epoch")
    n_train, n_val = len(source.reader["split/train_index"]), len(source.reader["split/val_index"])
    chance, target = _chance(source)
    kind = str(source.reader.attrs.get("val_accuracy_kind", "argmax" if model == "topk" else ""))
    accuracy_note = (
        "argmax class of the classifier"
        if kind == "argmax"
        else f"nearest training centroid of the target key ({target}) in the projection space; "
        "the dictionary MoE has no classifier head (see the glossary)"
    )
    section.tables.append(
        Table(
            f"training ({n_train} training rows, {n_val} held-out rows)",
            ["quantity", "value"],
            [
                ["epochs run", source.cell("epochs_run")],
                ["best epoch", source.cell("best_epoch")],
                ["best validation loss (mean per row)", source.cell("best_val_loss")],
                ["validation accuracy, last epoch (fraction)", source.cell("curves/val_accuracy", len(epochs) - 1)],
                ["chance level: most frequent target's share", "n/a" if chance is None else format_number(chance)],
                ["collapsed, last epoch", source.cell("curves/collapsed", len(epochs) - 1)],
            ],
            f"validation accuracy: {accuracy_note}",
        )
    )
    best = int(source.array("best_epoch"))
    section.figures.append(_loss_figure(source, epochs, best, n_train, n_val))
    if source.has("curves/step/train/total") and source.has("curves/step/index"):
        section.figures.append(_step_figure(source, epochs, n_train, n_val))
    reference = (
        {} if chance is None else {f"chance: most frequent {target or 'target'} ({format_number(chance)})": chance}
    )
    section.figures.append(
        Figure(
            "val_accuracy",
            plots.plot_curves,
            {
                "x": epochs,
                "series": {"validation accuracy": source.array("curves/val_accuracy")},
                "xlabel": "epoch",
                "ylabel": "accuracy (fraction)",
                "title": f"validation accuracy ({kind or 'accuracy'}), {n_val} rows",
                "ylim": (0, 1),
                "reference": reference,
                "marker_x": best,
                "marker_label": "best epoch",
            },
            f"validation accuracy per epoch ({accuracy_note}) with chance level",
            size=(8.0, 4.0),
        )
    )
    _load_figures(section, source, epochs, n_val)
    return section


def _loss_figure(source: _Source, epochs: np.ndarray, best: int, n_train: int, n_val: int) -> Figure:
    """Every loss term, training (solid) and validation (dashed, open markers) of one term in one colour."""
    terms = [t for t in source.keys("curves/train") if source.has(f"curves/val/{t}")]
    series, styles = {}, {}
    for index, term in enumerate(terms):
        for part, label in (("train", "training"), ("val", "validation")):
            series[f"{term}, {label}"] = source.array(f"curves/{part}/{term}")
            styles[f"{term}, {label}"] = index
    positive = all(np.all(np.asarray(v) > 0) for v in series.values())
    return Figure(
        "curves_loss",
        plots.plot_curves,
        {
            "x": epochs,
            "series": series,
            "styles": styles,
            "dashed": [k for k in series if k.endswith("validation")],
            "xlabel": "epoch",
            "ylabel": "loss (mean per row)" + (", log scale" if positive else ""),
            "logy": positive,
            "title": f"loss terms per epoch: training ({n_train} rows) and validation ({n_val} rows)",
            "marker_x": best,
            "marker_label": "best epoch",
        },
        "training (solid) and validation (dashed) loss terms per epoch",
        size=(9.0, 4.6),
    )


def _step_figure(source: _Source, epochs: np.ndarray, n_train: int, n_val: int) -> Figure:
    """Per-step training loss, with the per-epoch validation loss at the last step of each epoch.

    Reads ``curves/step/index`` (n_steps,), ``curves/step/train/<term>`` (n_steps,) and, to place the
    validation points, ``curves/step/epoch`` (n_steps,) when the stage wrote it.
    """
    steps = source.array("curves/step/index")
    series, xs = {"total, training (per step)": source.array("curves/step/train/total")}, {}
    if source.has("curves/step/epoch") and source.has("curves/val/total"):
        step_epoch = source.array("curves/step/epoch")
        ends = [steps[step_epoch == e].max() for e in epochs if np.any(step_epoch == e)]
        if len(ends) == len(epochs):
            series["total, validation (per epoch)"] = source.array("curves/val/total")
            xs["total, validation (per epoch)"] = np.asarray(ends)
    return Figure(
        "curves_step",
        plots.plot_curves,
        {
            "x": steps,
            "xs": xs,
            "series": series,
            "dashed": ["total, validation (per epoch)"],
            "xlabel": "optimiser step",
            "ylabel": "total loss (mean per row of the batch)",
            "title": f"loss per optimiser step ({n_train} training rows; validation: {n_val} rows)",
        },
        "training loss per optimiser step, validation loss per epoch",
        size=(9.0, 4.4),
    )


def train_curves(task: TaskRecord) -> Optional[dict[str, np.ndarray]]:
    """``epoch``, ``val_accuracy`` and ``val_loss`` (total) of a train artifact; None when unreadable."""
    from moespec.artifacts import open_artifact
    from moespec.errors import ArtifactError

    try:
        with open_artifact(task.h5_path) as reader:
            return {
                "epoch": reader.read("curves/epoch"),
                "val_accuracy": reader.read("curves/val_accuracy"),
                "val_loss": reader.read("curves/val/total") if "curves/val/total" in reader else None,
            }
    except (ArtifactError, OSError, KeyError):
        return None


def _load_figures(section: Section, source: _Source, epochs: np.ndarray, n_val: int) -> None:
    load = source.array("curves/expert_load")  # (n_epochs, L, E)
    pairs = [(l, e) for l in range(load.shape[1]) for e in range(load.shape[2])]
    ylabel = "load (share of routed slots)"
    if len(pairs) <= len(plots.SERIES):
        section.figures.append(
            Figure(
                "expert_load_curve",
                plots.plot_curves,
                {
                    "x": epochs,
                    "series": {f"layer {l} expert {e}": load[:, l, e] for l, e in pairs},
                    "reference": {f"uniform 1/E = {format_number(1 / load.shape[2])}": 1 / load.shape[2]},
                    "xlabel": "epoch",
                    "ylabel": ylabel,
                    "ylim": (0, 1),
                    "title": f"expert load on {n_val} held-out rows",
                },
                "expert load per epoch",
                size=(8.0, 4.0),
            )
        )
    else:  # too many lines to tell apart: one cell per (epoch, expert)
        columns = [f"layer {l} expert {e}" if load.shape[1] > 1 else f"expert {e}" for l, e in pairs]
        section.figures.append(
            Figure(
                "expert_load_curve",
                plots.plot_heatmap,
                {
                    "values": load.reshape(len(epochs), -1),
                    "rows": [str(e) for e in epochs],
                    "columns": columns,
                    "xlabel": "expert",
                    "ylabel": "epoch",
                    "colorbar": ylabel,
                    "limits": (0, float(np.nanmax(load)) or 1.0),
                    "title": f"expert load per epoch on {n_val} held-out rows",
                },
                "expert load per epoch",
                size=plots.heatmap_size(len(epochs), len(pairs), 4),
            )
        )
    entropy = source.array("curves/routing_entropy")  # (n_epochs, L)
    section.figures.append(
        Figure(
            "routing_entropy_curve",
            plots.plot_curves,
            {
                "x": epochs,
                "series": {f"layer {l}": entropy[:, l] for l in range(entropy.shape[1])},
                "xlabel": "epoch",
                "ylabel": "mean routing entropy / log E",
                "title": f"routing entropy on {n_val} held-out rows",
                "ylim": (0, 1),
            },
            "mean normalised routing entropy per epoch",
        )
    )


# --------------------------------------------------------------------------------------------------
# ablate


def _metric(source: _Source) -> str:
    return str(source.reader.attrs.get("metric") or source.task.summary.get("metric") or "accuracy")


def ablate_section(source: _Source) -> Section:
    section = Section("Routing, specialisation and expert ablation (ablate)", "ablate", source.task)
    metric, reader = _metric(source), source.reader
    n_eval, n_routed = len(reader["eval/row"]), len(reader["routing/probs"])
    layers = source.names("layers/name")
    load = source.array("experts/load")  # (L, E)
    n_experts = load.shape[1]
    section.tables.append(
        Table(
            f"routing per layer ({n_routed} routed inputs)",
            ["layer", "load CV", "mean routing entropy (/log E)", "router information (nats)"],
            [
                [
                    name,
                    source.cell("layers/load_cv", l),
                    source.cell("layers/entropy_mean", l),
                    source.cell("layers/router_information", l),
                ]
                for l, name in enumerate(layers)
            ],
        )
    )
    section.tables.append(
        Table(
            "experts",
            [
                "layer",
                "expert",
                "load (share of routed slots)",
                "importance (mean router probability)",
                "routing entropy (/ log E)",
                "dead",
            ],
            [
                [
                    layers[l],
                    e,
                    source.cell("experts/load", l, e),
                    source.cell("experts/importance", l, e),
                    source.cell("experts/entropy", l, e),
                    source.cell("experts/dead", l, e),
                ]
                for l in range(len(layers))
                for e in range(n_experts)
            ],
        )
    )
    section.figures.append(
        Figure(
            "utilisation",
            plots.plot_grouped_bars,
            {
                "groups": [f"expert {e}" for e in range(n_experts)],
                "series": {name: load[l] for l, name in enumerate(layers)},
                "reference": {f"uniform 1/E = {format_number(1.0 / n_experts)}": 1.0 / n_experts},
                "ylabel": "load (share of routed slots)",
                "title": f"expert load, {n_routed} routed inputs",
            },
            "expert load per layer",
            size=(min(plots.MAX_WIDTH, 5.5 + 0.5 * n_experts), 4.2),
        )
    )
    edge_name = next((n for n in ("layers/entropy_bin_edges", "entropy_bin_edges") if n in reader), None)
    histogram = source.array("layers/entropy_histogram")
    edges = source.array(edge_name) if edge_name else np.linspace(0, 1, histogram.shape[1] + 1)
    section.figures.append(
        Figure(
            "routing_entropy",
            plots.plot_counted_histogram,
            {
                "edges": edges,
                "counts": {name: histogram[l] for l, name in enumerate(layers)},
                "xlabel": "routing entropy / log E (0: one expert, 1: uniform)",
                "ylabel": "count (routed inputs)",
                "title": f"routing entropy, {n_routed} routed inputs",
            },
            "distribution of routing entropy per layer",
        )
    )
    for key in source.keys("specialisation"):
        if key == "token" or not source.has(f"specialisation/{key}/share"):
            continue
        _specialisation(section, source, key, layers)
    for mode in source.keys("ablation"):
        _ablation(section, source, mode, metric, layers, n_eval)
    return section


def _specialisation(section: Section, source: _Source, key: str, layers: list[str]) -> None:
    groups = source.names(f"names/{key}")
    share, lift = source.array(f"specialisation/{key}/share"), source.array(f"specialisation/{key}/lift_load")
    counts = source.array(f"specialisation/{key}/counts")
    experts = [f"expert {e}" for e in range(share.shape[2])]
    section.tables.append(
        Table(
            f"specialisation by {key}: mutual information",
            ["layer", "MI (nats)", "NMI"],
            [
                [
                    name,
                    source.cell(f"specialisation/{key}/mutual_information", l),
                    source.cell(f"specialisation/{key}/nmi", l),
                ]
                for l, name in enumerate(layers)
            ],
        )
    )
    size = plots.heatmap_size(len(groups), len(experts), max(map(len, groups), default=8))
    for l, name in enumerate(layers):
        n = int(counts[l].sum())
        section.figures.append(
            Figure(
                f"specialisation_{key}_layer{l}",
                plots.plot_heatmap,
                {
                    "values": share[l],
                    "rows": groups,
                    "columns": experts,
                    "xlabel": "expert",
                    "ylabel": key,
                    "limits": (0, 1),
                    "colorbar": "share of the group's slots",
                    "text_format": "{:.2f}",
                    "title": f"{key} × expert share, {name}\n{n} routed slots",
                },
                f"share of each {key}'s routed slots going to each expert ({name})",
                size=size,
            )
        )
        section.figures.append(
            Figure(
                f"lift_{key}_layer{l}",
                plots.plot_heatmap,
                {
                    "values": lift[l],
                    "rows": groups,
                    "columns": experts,
                    "xlabel": "expert",
                    "ylabel": key,
                    "log_center": 1.0,
                    "colorbar": "lift = share / load (log scale)",
                    "title": f"{key} × expert lift, {name}\n{n} routed slots; 1 = no preference",
                },
                f"lift of each {key} on each expert over the expert's load ({name}), log scale centred at 1",
                size=size,
            )
        )


def _ablation(section: Section, source: _Source, mode: str, metric: str, layers: list[str], n_eval: int) -> None:
    prefix = f"ablation/{mode}"
    if not source.has(f"{prefix}/delta_{metric}"):
        return
    layer, expert = source.array("ablations/layer"), source.array("ablations/expert")
    labels = [f"{layers[l] if l < len(layers) else l}, expert {e}" for l, e in zip(layer, expert)]
    config = source.task.config
    level = f"{100 * config.get('confidence', 0.95):g} %"
    interval = f"{level} paired bootstrap interval, {config.get('bootstrap', '?')} resamples"
    has_interval = source.has(f"{prefix}/delta_{metric}_low") and source.has(f"{prefix}/delta_{metric}_high")
    bounds = ("low", "high") if has_interval else ()
    rows = [
        [
            labels[a],
            source.cell(f"{prefix}/delta_{metric}", a),
            *[source.cell(f"{prefix}/delta_{metric}_{b}", a) for b in bounds],
        ]
        for a in range(len(labels))
    ]
    section.tables.append(
        Table(
            f"ablation ({mode}): change in {metric}, {n_eval} evaluated inputs",
            ["ablation", f"Δ {metric}", *bounds],
            rows,
            f"ablated − baseline; low, high: {interval}"
            if has_interval
            else "ablated − baseline; no bootstrap interval was computed (bootstrap: 0)",
        )
    )
    if has_interval:
        section.figures.append(
            Figure(
                f"ablation_{mode}_intervals",
                plots.plot_intervals,
                {
                    "labels": labels,
                    "value": source.array(f"{prefix}/delta_{metric}"),
                    "low": source.array(f"{prefix}/delta_{metric}_low"),
                    "high": source.array(f"{prefix}/delta_{metric}_high"),
                    "xlabel": f"Δ {metric} (ablated − baseline); bars: {interval}",
                    "value_label": None,
                    "title": f"ablation ({mode}), {n_eval} evaluated inputs",
                },
                f"effect of ablating each expert ({mode})",
                size=(8.0, max(3.2, 0.32 * len(labels) + 1.6)),
            )
        )
    for key in ("class", "domain", "stratum"):
        name = f"{prefix}/delta_{metric}_{key}"
        if not source.has(name):
            continue
        delta = source.array(name)
        marked = None
        if source.has(f"{name}_low") and source.has(f"{name}_high"):
            low, high = source.array(f"{name}_low"), source.array(f"{name}_high")
            marked = (low > 0) | (high < 0)
        groups = source.names(f"names/{key}")
        section.figures.append(
            Figure(
                f"ablation_{mode}_{key}",
                plots.plot_heatmap,
                {
                    "values": delta,
                    "rows": labels,
                    "columns": groups,
                    "xlabel": key,
                    "ylabel": "ablated expert",
                    "center": 0.0,
                    "colorbar": f"Δ {metric} (ablated − baseline)",
                    "marked": marked,
                    "title": f"ablation ({mode}) by {key}, {n_eval} evaluated inputs\n* : {level} interval excludes 0",
                },
                f"change in {metric} per {key} when each expert is ablated ({mode}); * = bootstrap interval excludes 0",
                size=plots.heatmap_size(len(labels), len(groups), max(map(len, labels), default=8)),
            )
        )


# --------------------------------------------------------------------------------------------------
# entry


def _lm_section(source: _Source) -> Section:
    from moespec.analysis.lm import lm_section  # imports this module

    return lm_section(source)


_SECTIONS = {
    "reduce": reduce_section,
    "fiber": fiber_section,
    "train": train_section,
    "lm": _lm_section,
    "ablate": ablate_section,
}


def _lora_sections(stage: str) -> Callable[[_Source], Section]:
    """The lora and route sections live in :mod:`moespec.analysis.lora` (imported when drawn)."""

    def build(source: _Source) -> Section:
        from moespec.analysis import lora

        return getattr(lora, f"{stage}_section")(source)

    return build


_SECTIONS.update({stage: _lora_sections(stage) for stage in ("lora", "route")})


def load_section(task: TaskRecord) -> Section:
    """The section of one task: its tables and figure data, or a message saying why there are none."""
    from moespec.artifacts import open_artifact
    from moespec.errors import ArtifactError

    builder = _SECTIONS.get(task.stage)
    if task.status == "not pulled":
        return Section(
            task.stage,
            task.stage,
            task,
            message=(
                f"NOT PULLED: finished on the cluster, but {task.h5_path.name} is not here (sync's filters left it "
                f"there); its summary is shown. Pull it with: moespec sync --from-hpc {task.dir.parent.parent.name} "
                f"--include '{task.stage}/{task.uid}/**'"
            ),
        )
    if task.status != "done":
        # FAILED.txt: "<label> failed at <time>", then the error, then the traceback.
        reason = " — ".join([line for line in task.error.splitlines() if line.strip()][:2])
        return Section(
            task.stage, task.stage, task, message=f"{task.status.upper()}" + (f": {reason}" if reason else "")
        )
    if builder is None:
        return Section(task.stage, task.stage, task)
    try:
        with open_artifact(task.h5_path) as reader:
            return builder(_Source(task, reader))
    except (ArtifactError, KeyError, ValueError, IndexError) as e:
        return Section(task.stage, task.stage, task, message=f"UNREADABLE: {type(e).__name__}: {e}")
