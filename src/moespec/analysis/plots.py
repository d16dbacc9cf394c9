"""``plot_*(data, ax)``: draw saved results; never compute a result, never read a file.

Every function takes the plain data a loader of :mod:`moespec.analysis.loaders` returned (arrays
and names read from artifacts) and one matplotlib ``Axes``. The style is fixed so that figures of
different runs can be compared by eye, and readable in grayscale: series differ by marker,
line style and hatch as well as by colour; heatmaps use ``cividis`` (monotone in lightness).
Axis labels carry units and the sample counts the data came from.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

#: Series styles, in order: (colour, marker, linestyle, hatch).
SERIES = [("#1b1b1b", "o", "-", ""), ("#6a6a6a", "s", "--", "//"), ("#a0a0a0", "^", ":", ".."),
          ("#3d3d3d", "D", "-.", "xx"), ("#808080", "v", (0, (5, 1)), "\\\\"), ("#c0c0c0", "P", (0, (1, 2)), "--")]
HEATMAP_CMAP = "cividis"
# Signed maps use the same monotone map on limits symmetric about the centre: a diverging map
# (PuOr, RdBu) has equal lightness at both ends, so the sign would vanish in grayscale.
DIVERGING_CMAP = "cividis"
FIGSIZE = (6.4, 4.0)


def style(index: int) -> dict[str, Any]:
    colour, marker, linestyle, _ = SERIES[index % len(SERIES)]
    return {"color": colour, "marker": marker, "linestyle": linestyle, "markersize": 4}


def hatch(index: int) -> str:
    return SERIES[index % len(SERIES)][3]


def new_figure(width: float = FIGSIZE[0], height: float = FIGSIZE[1]):
    """A figure with one Axes in the fixed report style (Agg backend; no display needed)."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    return figure, figure.add_subplot(1, 1, 1)


def plot_explained_variance(data: Mapping[str, Any], ax) -> None:
    """Explained variance ratio per component and its cumulative sum (reduce)."""
    ratio = np.asarray(data["explained_variance_ratio"], dtype=float)
    components = np.arange(1, len(ratio) + 1)
    ax.plot(components, ratio, label="per component", **style(0))
    ax.plot(components, np.cumsum(ratio), label="cumulative", **style(1))
    ax.set_xlabel("principal component (index)")
    ax.set_ylabel("share of input variance (fraction)")
    ax.set_ylim(0, 1)
    ax.set_title(f"explained variance, N = {data['n_samples']}, D = {data['n_features']}")
    ax.grid(alpha=0.3)
    ax.legend()


def plot_grouped_bars(data: Mapping[str, Any], ax) -> None:
    """Bars of several series over named groups; optional reference lines (e.g. a null rate).

    ``data``: ``groups`` (names), ``series`` ({label: values}), ``ylabel``, ``title``, optional
    ``reference`` ({label: value}) drawn as horizontal lines.
    """
    groups = list(data["groups"])
    series = data["series"]
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    for index, (label, values) in enumerate(series.items()):
        values = np.asarray(values, dtype=float)
        ax.bar(x + index * width - 0.4 + width / 2, np.nan_to_num(values), width, label=label,
               color=SERIES[index % len(SERIES)][0], hatch=hatch(index), edgecolor="black", linewidth=0.5)
    for index, (label, value) in enumerate((data.get("reference") or {}).items()):
        ax.axhline(value, color="black", linestyle=SERIES[(index + 1) % len(SERIES)][2], linewidth=1, label=label)
    ax.set_xticks(x, groups, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(data["ylabel"])
    ax.set_title(data["title"], fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


def plot_histograms(data: Mapping[str, Any], ax) -> None:
    """Step histograms of several samples on shared bins.

    ``data``: ``samples`` ({label: values}), ``xlabel``, ``title``, optional ``bins``.
    """
    samples = {k: np.asarray(v, dtype=float) for k, v in data["samples"].items()}
    finite = [v[np.isfinite(v)] for v in samples.values()]
    pooled = np.concatenate(finite) if finite else np.array([])
    bins = data.get("bins")
    if bins is None:
        bins = np.histogram_bin_edges(pooled, bins=30) if pooled.size else 10
    for index, (label, values) in enumerate(samples.items()):
        values = values[np.isfinite(values)]
        ax.hist(values, bins=bins, histtype="step", linewidth=1.5, color=SERIES[index % len(SERIES)][0],
                linestyle=SERIES[index % len(SERIES)][2], hatch=hatch(index), label=f"{label} (n = {values.size})")
    ax.set_xlabel(data["xlabel"])
    ax.set_ylabel("count (points)")
    ax.set_title(data["title"], fontsize=10)
    ax.legend(fontsize=7)


def plot_counted_histogram(data: Mapping[str, Any], ax) -> None:
    """Histograms already counted by a stage: ``edges`` (n_bins + 1,), ``counts`` {label: (n_bins,)}."""
    edges = np.asarray(data["edges"], dtype=float)
    for index, (label, counts) in enumerate(data["counts"].items()):
        counts = np.asarray(counts, dtype=float)
        ax.stairs(counts, edges, linewidth=1.5, color=SERIES[index % len(SERIES)][0],
                  linestyle=SERIES[index % len(SERIES)][2], hatch=hatch(index),
                  label=f"{label} (n = {int(counts.sum())})")
    ax.set_xlabel(data["xlabel"])
    ax.set_ylabel(data.get("ylabel", "count"))
    ax.set_title(data["title"], fontsize=10)
    ax.legend(fontsize=7)


def plot_curves(data: Mapping[str, Any], ax) -> None:
    """Lines over a shared x: ``x``, ``series`` {label: values}, ``xlabel``, ``ylabel``, ``title``."""
    x = np.asarray(data["x"])
    for index, (label, values) in enumerate(data["series"].items()):
        ax.plot(x, np.asarray(values, dtype=float), label=label, **style(index))
    if data.get("marker_x") is not None:
        ax.axvline(data["marker_x"], color="black", linestyle=":", linewidth=1, label=data.get("marker_label"))
    if data.get("ylim") is not None:   # fixed ranges for fractions, so runs compare by eye
        ax.set_ylim(*data["ylim"])
    ax.set_xlabel(data["xlabel"])
    ax.set_ylabel(data["ylabel"])
    ax.set_title(data["title"], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_heatmap(data: Mapping[str, Any], ax) -> None:
    """A labelled matrix: ``values`` (R, C), ``rows``, ``columns``, ``xlabel``, ``ylabel``, ``title``,
    ``colorbar`` (label with unit); optional ``center`` (diverging map around it) and ``marked``
    (R, C) bool drawn as a dot (e.g. a bootstrap interval that excludes zero)."""
    values = np.asarray(data["values"], dtype=float)
    center = data.get("center")
    if data.get("limits") is not None:
        low, high = data["limits"]
        image = ax.imshow(values, cmap=DIVERGING_CMAP if center is not None else HEATMAP_CMAP, vmin=low, vmax=high,
                          aspect="auto")
    elif center is not None:
        span = np.nanmax(np.abs(values - center)) if np.isfinite(values).any() else 1.0
        span = span or 1.0
        image = ax.imshow(values, cmap=DIVERGING_CMAP, vmin=center - span, vmax=center + span, aspect="auto")
    else:
        image = ax.imshow(values, cmap=HEATMAP_CMAP, aspect="auto")
    ax.set_xticks(range(values.shape[1]), list(data["columns"]), rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(values.shape[0]), list(data["rows"]), fontsize=7)
    if values.size <= 150:
        for (r, c), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(c, r, f"{value:.2g}", ha="center", va="center", fontsize=6,
                        color="white" if image.norm(value) < 0.5 else "black")
    marked = data.get("marked")
    if marked is not None:
        rows, cols = np.nonzero(np.asarray(marked))
        ax.scatter(cols, rows + 0.3, marker="*", s=12, color="black")
    ax.set_xlabel(data["xlabel"])
    ax.set_ylabel(data["ylabel"])
    ax.set_title(data["title"], fontsize=10)
    ax.figure.colorbar(image, ax=ax, label=data["colorbar"])


def plot_intervals(data: Mapping[str, Any], ax) -> None:
    """Point estimates with intervals: ``labels``, ``value``, ``low``, ``high``, ``xlabel``, ``title``;
    optional ``control`` values drawn as open markers."""
    value = np.asarray(data["value"], dtype=float)
    low, high = np.asarray(data["low"], dtype=float), np.asarray(data["high"], dtype=float)
    y = np.arange(len(value))
    ax.errorbar(value, y, xerr=[value - low, high - value], fmt="o", color="black", capsize=3,
                label=data.get("value_label", "estimate"))
    if data.get("control") is not None:
        ax.scatter(np.asarray(data["control"], dtype=float), y, marker="s", facecolors="none", edgecolors="#555555",
                   label=data.get("control_label", "control"))
    ax.axvline(0, color="#777777", linestyle=":", linewidth=1)
    ax.set_yticks(y, list(data["labels"]), fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(data["xlabel"])
    ax.set_title(data["title"], fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=7)

