"""Read each stage's artifact once into report sections: tables of numbers and data for plots.

A section holds :class:`Table` objects whose number cells remember the artifact, dataset and
index they were read from (so the HTML can be checked against the artifacts) and :class:`Figure`
objects pairing a ``plot_*`` function of :mod:`moespec.analysis.plots` with the data it draws.
Nothing here derives a new statistic: means, rates, intervals and tables are the stages' own.
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
    """Six significant digits; ``n/a`` for NaN (a stage could not compute it)."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "n/a" if math.isnan(value) else f"{float(value):.6g}"
    return str(value)


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


_ESTIMATORS = ("pca_count", "twonn", "mle_levina_bickel")


def reduce_section(source: _Source) -> Section:
    section = Section("PCA and intrinsic dimension (reduce)", "reduce", source.task)
    ratio = source.array("explained_variance_ratio")
    n_samples = len(source.reader["reduced"])
    section.tables.append(Table("variance retained", ["components", "variance retained (fraction)"],
                                [[len(ratio), source.cell("variance_retained")]]))
    estimators = [e for e in source.keys("id/global")]
    section.tables.append(Table(
        f"intrinsic dimension, global (N = {n_samples})", ["estimator", "dimension"],
        [[e, source.cell(f"id/global/{e}")] for e in estimators],
        "pca_count: components reaching the threshold of the reduced variance; pca_count_input: of the input's"))
    domains = source.names("domain_names")
    per_domain = [e for e in source.keys("id/per_domain") if e != "n_points"]
    section.tables.append(Table(
        "intrinsic dimension per domain", ["domain", "points", *per_domain],
        [[d, source.cell("id/per_domain/n_points", i), *[source.cell(f"id/per_domain/{e}", i) for e in per_domain]]
         for i, d in enumerate(domains)], "n/a: too few points in the domain for the estimator"))
    section.figures.append(Figure("explained_variance", plots.plot_explained_variance, {
        "explained_variance_ratio": ratio, "n_samples": n_samples, "n_features": source.reader["mean"].shape[0]},
        "explained variance ratio per principal component and cumulative"))
    return section


# --------------------------------------------------------------------------------------------------
# fiber


_RATES = ("rejection_rate", "fiber_rejection_rate", "fiber_small_rejection_rate", "fiber_large_rejection_rate")


def fiber_section(source: _Source) -> Section:
    section = Section("Fiber-bundle test and strata (fiber)", "fiber", source.task)
    rates = [r for r in _RATES if source.has(f"rates/overall/{r}")]
    n_tested = len(source.reader["points/index"])
    n_repeats = len(source.reader[f"null/{rates[0]}"]) if source.has(f"null/{rates[0]}") else 0
    section.tables.append(Table(
        f"rejection rates, overall ({n_tested} tested points) beside the null calibration ({n_repeats} repeat(s))",
        ["rate", "data", *[f"null #{i + 1}" for i in range(n_repeats)]],
        [[r, source.cell(f"rates/overall/{r}"), *[source.cell(f"null/{r}", i) for i in range(n_repeats)]]
         for r in rates], "only a rate well above its null rate is evidence of structure"))
    domains, strata = source.names("domain_names"), list(range(len(source.reader["strata/n_points"])))
    for key, names in (("per_domain", domains), ("per_stratum", [f"stratum {s}" for s in strata])):
        section.tables.append(Table(
            f"rejection rates {key.replace('_', ' ')} (read against the overall null rate)",
            ["group", "testable points", *rates],
            [[n, source.cell(f"rates/{key}/n_testable", i), *[source.cell(f"rates/{key}/{r}", i) for r in rates]]
             for i, n in enumerate(names)]))
    levels = source.array("local_dimension/levels")
    section.tables.append(Table("local dimension quantiles (testable points)",
                                ["quantile level", "small-radius slope", "large-radius slope"],
                                [[source.cell("local_dimension/levels", q), source.cell("local_dimension/small", q),
                                  source.cell("local_dimension/large", q)] for q in range(len(levels))]))
    scores = [s for s in ("silhouette", "davies_bouldin", "calinski_harabasz") if source.has(f"strata/{s}")]
    section.tables.append(Table("strata scores", ["score", "value"], [[s, source.cell(f"strata/{s}")] for s in scores]))
    dims = source.keys("strata/dimension")
    section.tables.append(Table("strata: size and intrinsic dimension", ["stratum", "points", *dims],
                                [[f"stratum {s}", source.cell("strata/n_points", s),
                                  *[source.cell(f"strata/dimension/{e}", s) for e in dims]] for s in strata]))
    if source.has("strata/candidate_k"):
        method = source.task.config.get("strata", {}).get("selection", "selection criterion")
        section.figures.append(Figure("strata_selection", plots.plot_curves, {
            "x": source.array("strata/candidate_k"), "series": {str(method): source.array("strata/candidate_score")},
            "marker_x": len(strata), "marker_label": f"chosen k = {len(strata)}", "xlabel": "number of strata k",
            "ylabel": f"{method} (score)", "title": f"choice of the number of strata, N = {len(source.reader['strata/labels'])}"},
            "selection criterion per candidate number of strata"))
    table = source.array("strata/domain_table")
    section.tables.append(Table("domain × stratum (rows)", ["domain", *[f"stratum {s}" for s in strata]],
                                [[d, *[source.cell("strata/domain_table", i, s) for s in strata]]
                                 for i, d in enumerate(domains)]))
    # the null data carry no domains or strata: every group is read against the overall null rate
    null_reference = {f"null {r} (mean of {n_repeats} repeat(s))": float(np.mean(source.array(f"null/{r}")))
                      for r in rates[:2]} if n_repeats else {}
    for key, names in (("per_domain", domains), ("per_stratum", [f"stratum {s}" for s in strata])):
        section.figures.append(Figure(f"rates_{key}", plots.plot_grouped_bars, {
            "groups": names, "series": {r: source.array(f"rates/{key}/{r}") for r in rates[:2]},
            "reference": null_reference, "ylabel": "rejection rate (fraction of testable points)",
            "title": f"rejection rates {key.replace('_', ' ')}, {n_tested} tested points"},
            f"manifold and fiber-bundle rejection rates {key.replace('_', ' ')}, with the null rate"))
    testable = source.array("points/testable").astype(bool)
    section.figures.append(Figure("local_dimension", plots.plot_histograms, {
        "samples": {"small-radius slope": source.array("points/dimension_small")[testable],
                    "large-radius slope": source.array("points/dimension_large")[testable]},
        "xlabel": "local dimension (log-count / log-radius slope)",
        "title": f"local dimensions of {int(testable.sum())} testable points"}, "distribution of local dimensions"))
    section.figures.append(Figure("domain_stratum", plots.plot_heatmap, {
        "values": table, "rows": domains, "columns": [f"stratum {s}" for s in strata], "xlabel": "stratum",
        "ylabel": "domain", "colorbar": "rows (count)", "title": f"domain × stratum, N = {int(table.sum())}"},
        "rows of each domain in each stratum"))
    return section


# --------------------------------------------------------------------------------------------------
# train


def train_section(source: _Source) -> Section:
    section = Section("MoE training (train)", "train", source.task)
    model = source.task.config.get("model", {}).get("kind", "?")
    section.title = f"MoE training (train, {model})"
    epochs = source.array("curves/epoch")
    n_train, n_val = len(source.reader["split/train_index"]), len(source.reader["split/val_index"])
    section.tables.append(Table(f"training ({n_train} training rows, {n_val} held-out rows)", ["quantity", "value"], [
        ["epochs run", source.cell("epochs_run")], ["best epoch", source.cell("best_epoch")],
        ["best validation loss", source.cell("best_val_loss")],
        ["validation accuracy, last epoch", source.cell("curves/val_accuracy", len(epochs) - 1)],
        ["collapsed, last epoch", source.cell("curves/collapsed", len(epochs) - 1)]]))
    best = int(source.array("best_epoch"))
    for part, label in (("train", f"training ({n_train} rows)"), ("val", f"validation ({n_val} rows)")):
        terms = source.keys(f"curves/{part}")
        section.figures.append(Figure(f"curves_{part}", plots.plot_curves, {
            "x": epochs, "series": {t: source.array(f"curves/{part}/{t}") for t in terms}, "xlabel": "epoch",
            "ylabel": "loss (mean per row)", "title": f"{label} loss terms", "marker_x": best,
            "marker_label": "best epoch"}, f"{label} loss terms per epoch"))
    section.figures.append(Figure("val_accuracy", plots.plot_curves, {
        "x": epochs, "series": {"validation accuracy": source.array("curves/val_accuracy")}, "xlabel": "epoch",
        "ylabel": "accuracy (fraction)", "title": f"validation accuracy, {n_val} rows", "ylim": (0, 1)}, "validation accuracy per epoch"))
    load = source.array("curves/expert_load")  # (n_epochs, L, E)
    pairs = [(l, e) for l in range(load.shape[1]) for e in range(load.shape[2])]
    if len(pairs) <= len(plots.SERIES):
        section.figures.append(Figure("expert_load_curve", plots.plot_curves, {
            "x": epochs, "series": {f"layer {l} expert {e}": load[:, l, e] for l, e in pairs},
            "xlabel": "epoch", "ylabel": "top-1 share (fraction of rows)",
            "title": f"expert load on {n_val} held-out rows"}, "expert utilisation per epoch"))
    else:  # too many lines to tell apart in grayscale: one cell per (epoch, expert)
        section.figures.append(Figure("expert_load_curve", plots.plot_heatmap, {
            "values": load.reshape(len(epochs), -1), "rows": [str(e) for e in epochs],
            "columns": [f"l{l} e{e}" for l, e in pairs], "xlabel": "layer, expert", "ylabel": "epoch",
            "colorbar": "top-1 share (fraction of rows)", "title": f"expert load on {n_val} held-out rows"},
            "expert utilisation per epoch", size=(max(6.4, 0.3 * len(pairs) + 2.5), max(3.0, 0.2 * len(epochs) + 2))))
    entropy = source.array("curves/routing_entropy")  # (n_epochs, L)
    section.figures.append(Figure("routing_entropy_curve", plots.plot_curves, {
        "x": epochs, "series": {f"layer {l}": entropy[:, l] for l in range(entropy.shape[1])}, "xlabel": "epoch",
        "ylabel": "mean routing entropy / log E", "title": f"routing entropy on {n_val} held-out rows",
        "ylim": (0, 1)},
        "mean normalised routing entropy per epoch"))
    return section


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
    section.tables.append(Table(f"routing per layer ({n_routed} routed inputs)",
                                ["layer", "load CV", "mean routing entropy (/log E)", "router information (nats)"],
                                [[name, source.cell("layers/load_cv", l), source.cell("layers/entropy_mean", l),
                                  source.cell("layers/router_information", l)] for l, name in enumerate(layers)]))
    section.tables.append(Table("experts", ["layer", "expert", "utilisation (load)", "importance", "entropy", "dead"],
                                [[layers[l], e, source.cell("experts/load", l, e), source.cell("experts/importance", l, e),
                                  source.cell("experts/entropy", l, e), source.cell("experts/dead", l, e)]
                                 for l in range(len(layers)) for e in range(n_experts)]))
    section.figures.append(Figure("utilisation", plots.plot_grouped_bars, {
        "groups": [f"expert {e}" for e in range(n_experts)],
        "series": {name: load[l] for l, name in enumerate(layers)},
        "reference": {"uniform 1/E": 1.0 / n_experts}, "ylabel": "share of routed slots (fraction)",
        "title": f"expert utilisation, {n_routed} routed inputs"}, "expert utilisation per layer"))
    edge_name = next((n for n in ("layers/entropy_bin_edges", "entropy_bin_edges") if n in reader), None)
    histogram = source.array("layers/entropy_histogram")
    edges = source.array(edge_name) if edge_name else np.linspace(0, 1, histogram.shape[1] + 1)
    section.figures.append(Figure("routing_entropy", plots.plot_counted_histogram, {
        "edges": edges, "counts": {name: histogram[l] for l, name in enumerate(layers)},
        "xlabel": "routing entropy / log E (0: one expert, 1: uniform)", "ylabel": "count (routed inputs)",
        "title": f"routing entropy, {n_routed} routed inputs"}, "distribution of routing entropy per layer"))
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
    section.tables.append(Table(f"specialisation by {key}: mutual information", ["layer", "MI (nats)", "NMI"],
                                [[name, source.cell(f"specialisation/{key}/mutual_information", l),
                                  source.cell(f"specialisation/{key}/nmi", l)] for l, name in enumerate(layers)]))
    for l, name in enumerate(layers):
        n = int(counts[l].sum())
        section.figures.append(Figure(f"specialisation_{key}_layer{l}", plots.plot_heatmap, {
            "values": share[l], "rows": groups, "columns": experts, "xlabel": "expert", "ylabel": key, "limits": (0, 1),
            "colorbar": "share of the group's slots (fraction)",
            "title": f"{key} × expert share, {name}, {n} routed slots"},
            f"share of each {key}'s routed slots going to each expert ({name})",
            size=(6.4, max(3.0, 0.25 * len(groups) + 1.5))))
        section.figures.append(Figure(f"lift_{key}_layer{l}", plots.plot_heatmap, {
            "values": lift[l], "rows": groups, "columns": experts, "xlabel": "expert", "ylabel": key, "center": 1.0,
            "colorbar": "lift over load (share / load; 1 = no preference)",
            "title": f"{key} × expert lift, {name}, {n} routed slots"},
            f"lift of each {key} on each expert over the expert's load ({name})",
            size=(6.4, max(3.0, 0.25 * len(groups) + 1.5))))


def _ablation(section: Section, source: _Source, mode: str, metric: str, layers: list[str], n_eval: int) -> None:
    prefix = f"ablation/{mode}"
    if not source.has(f"{prefix}/delta_{metric}"):
        return
    layer, expert = source.array("ablations/layer"), source.array("ablations/expert")
    labels = [f"{layers[l] if l < len(layers) else l} e{e}" for l, e in zip(layer, expert)]
    config = source.task.config
    interval = f"{100 * config.get('confidence', 0.95):g}% paired bootstrap interval, {config.get('bootstrap', '?')} resamples"
    has_interval = source.has(f"{prefix}/delta_{metric}_low") and source.has(f"{prefix}/delta_{metric}_high")
    bounds = ("low", "high") if has_interval else ()
    rows = [[labels[a], source.cell(f"{prefix}/delta_{metric}", a),
             *[source.cell(f"{prefix}/delta_{metric}_{b}", a) for b in bounds]] for a in range(len(labels))]
    section.tables.append(Table(f"ablation ({mode}): change in {metric}, {n_eval} evaluated inputs",
                                ["ablation", f"Δ {metric}", *bounds], rows,
                                f"ablated − baseline; low, high: {interval}" if has_interval else
                                "ablated − baseline; no bootstrap interval was computed (bootstrap: 0)"))
    if has_interval:
        section.figures.append(Figure(f"ablation_{mode}_intervals", plots.plot_intervals, {
            "labels": labels, "value": source.array(f"{prefix}/delta_{metric}"),
            "low": source.array(f"{prefix}/delta_{metric}_low"), "high": source.array(f"{prefix}/delta_{metric}_high"),
            "xlabel": f"Δ {metric} (ablated − baseline)", "value_label": f"single expert ({interval})",
            "title": f"ablation ({mode}), {n_eval} evaluated inputs"}, f"effect of ablating each expert ({mode})",
            size=(6.4, max(3.0, 0.3 * len(labels) + 1.2))))
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
        section.figures.append(Figure(f"ablation_{mode}_{key}", plots.plot_heatmap, {
            "values": delta, "rows": labels, "columns": groups, "xlabel": key, "ylabel": "ablated expert",
            "center": 0.0, "colorbar": f"Δ {metric} (ablated − baseline)", "marked": marked,
            "title": f"ablation ({mode}) by {key}, {n_eval} evaluated inputs; * interval excludes 0"},
            f"change in {metric} per {key} when each expert is ablated ({mode}); * = bootstrap interval excludes 0",
            size=(max(6.4, 0.35 * len(groups) + 2.5), max(3.0, 0.3 * len(labels) + 1.8))))


# --------------------------------------------------------------------------------------------------
# entry


def _lm_section(source: _Source) -> Section:
    from moespec.analysis.lm import lm_section  # imports this module

    return lm_section(source)


_SECTIONS = {"reduce": reduce_section, "fiber": fiber_section, "train": train_section, "lm": _lm_section,
             "ablate": ablate_section}


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
    if task.status != "done":
        # FAILED.txt: "<label> failed at <time>", then the error, then the traceback.
        reason = " — ".join([line for line in task.error.splitlines() if line.strip()][:2])
        return Section(task.stage, task.stage, task, message=f"{task.status.upper()}" + (f": {reason}" if reason else ""))
    if builder is None:
        return Section(task.stage, task.stage, task)
    try:
        with open_artifact(task.h5_path) as reader:
            return builder(_Source(task, reader))
    except (ArtifactError, KeyError, ValueError, IndexError) as e:
        return Section(task.stage, task.stage, task, message=f"UNREADABLE: {type(e).__name__}: {e}")
