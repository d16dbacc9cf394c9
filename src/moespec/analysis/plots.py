"""``plot_*(data, ax)``: draw saved results; never compute a result, never read a file.

Every function takes the plain data a loader of :mod:`moespec.analysis.loaders` returned (arrays
and names read from artifacts) and one matplotlib ``Axes``. The style is fixed so that figures of
different runs can be compared by eye, and readable in grayscale: series differ by marker,
line style and hatch as well as by colour; heatmaps use ``cividis`` (monotone in lightness).
Axis labels carry units and the sample counts the data came from.

Readability at 100 % zoom: figures are saved at 100 dpi and shown at their natural size (the
page never scales them down below it), text is at least :data:`MIN_FONT` points (about 12 px),
sizes grow with the number of labels (:func:`heatmap_size`), and legends sit outside the axes so
they never hide data.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

#: Series styles, in order: (colour, marker, linestyle, hatch). Colours from the Okabe-Ito palette
#: (distinct for colour-blind readers) and, in grayscale, the markers and line styles still differ.
SERIES = [
    ("#000000", "o", "-", ""),
    ("#0072B2", "s", "--", "//"),
    ("#D55E00", "^", ":", ".."),
    ("#009E73", "D", "-.", "xx"),
    ("#CC79A7", "v", (0, (5, 1)), "\\\\"),
    ("#E69F00", "P", (0, (1, 2)), "--"),
    ("#56B4E9", "X", (0, (3, 1, 1, 1)), "++"),
    ("#999999", "*", (0, (5, 5)), "oo"),
]
HEATMAP_CMAP = "cividis"
# Signed maps use the same monotone map on limits symmetric about the centre: a diverging map
# (PuOr, RdBu) has equal lightness at both ends, so the sign would vanish in grayscale.
DIVERGING_CMAP = "cividis"
FIGSIZE = (6.4, 4.0)
#: Smallest font (points; 9 pt at 100 dpi is 12.5 px) of any text in a figure.
MIN_FONT = 9
#: Widest figure (inches at 100 dpi): the report's text column is 1100 px.
MAX_WIDTH = 10.8
RC = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": MIN_FONT,
    "ytick.labelsize": MIN_FONT,
    "legend.fontsize": MIN_FONT,
    "figure.dpi": 100,
}


def style(index: int) -> dict[str, Any]:
    colour, marker, linestyle, _ = SERIES[index % len(SERIES)]
    return {"color": colour, "marker": marker, "linestyle": linestyle, "markersize": 4}


def hatch(index: int) -> str:
    return SERIES[index % len(SERIES)][3]


def new_figure(width: float = FIGSIZE[0], height: float = FIGSIZE[1]):
    """A figure with one Axes in the fixed report style (Agg backend; no display needed)."""
    import matplotlib
    from matplotlib.figure import Figure

    matplotlib.rcParams.update(RC)
    figure = Figure(figsize=(min(width, MAX_WIDTH), height), dpi=100, layout="constrained")
    return figure, figure.add_subplot(1, 1, 1)


def clipped_texts(figure) -> list[str]:
    """What of ``figure`` reaches outside it (cut off in the saved PNG): the title of each Axes (or
    colour bar) whose drawn extent, labels, tick labels and legend included, leaves the figure; and
    the figure's own legends. Draws the figure once."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    renderer, (width, height) = canvas.get_renderer(), canvas.get_width_height()
    clipped = []
    for artist in [*figure.axes, *figure.legends]:
        box = artist.get_tightbbox(renderer) if hasattr(artist, "get_tightbbox") else artist.get_window_extent()
        if box is not None and (box.x0 < -1 or box.y0 < -1 or box.x1 > width + 1 or box.y1 > height + 1):
            name = artist.get_title() if hasattr(artist, "get_title") else "legend"
            clipped.append(f"{name or artist.get_ylabel() or type(artist).__name__}: {box.bounds}")
    return clipped


def heatmap_size(n_rows: int, n_columns: int, label_chars: int = 12) -> tuple[float, float]:
    """Figure size (inches) that gives each cell room for a 9-pt label: 0.32 in per row, 0.5 per column.

    ``label_chars``: the longest row label, which takes width on the left; the colour bar and
    rotated column labels take the rest of the margins.
    """
    width = 0.5 * n_columns + 0.075 * label_chars + 2.6
    height = 0.32 * n_rows + 2.4
    return min(MAX_WIDTH, max(5.0, width)), max(3.8, height)


def outside_legend(ax, below: bool = False, **kwargs) -> None:
    """A legend right of the axes (or below them: long labels), never over the data; constrained
    layout makes room for it."""
    handles, labels = ax.get_legend_handles_labels()
    if not handles:
        return
    if below:
        ax.figure.legend(handles, labels, loc="outside lower center", frameon=False, **kwargs)
    else:
        ax.legend(
            handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0, frameon=False, **kwargs
        )


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
    outside_legend(ax)


def plot_grouped_bars(data: Mapping[str, Any], ax) -> None:
    """Bars of several series over named groups, optional intervals and reference lines.

    ``data``: ``groups`` (names), ``series`` ({label: values}), ``ylabel``, ``title``; optional
    ``low``/``high`` ({label: values}, an interval per bar), ``reference`` ({label: value}) drawn
    as horizontal lines, ``reference_band`` ({label: (low, high)}) drawn as shaded bands.
    """
    groups = list(data["groups"])
    series = data["series"]
    width = 0.8 / max(len(series), 1)
    x = np.arange(len(groups))
    low, high = data.get("low") or {}, data.get("high") or {}
    for index, (label, values) in enumerate(series.items()):
        values = np.asarray(values, dtype=float)
        position = x + index * width - 0.4 + width / 2
        ax.bar(
            position,
            np.nan_to_num(values),
            width,
            label=label,
            color=SERIES[index % len(SERIES)][0],
            hatch=hatch(index),
            edgecolor="black",
            linewidth=0.5,
            alpha=0.85,
        )
        if label in low and label in high:
            lo, hi = np.asarray(low[label], dtype=float), np.asarray(high[label], dtype=float)
            ax.errorbar(
                position, values, yerr=[values - lo, hi - values], fmt="none", ecolor="black", capsize=3, linewidth=1
            )
    for index, (label, (lo, hi)) in enumerate((data.get("reference_band") or {}).items()):
        ax.axhspan(lo, hi, color=SERIES[(index + 2) % len(SERIES)][0], alpha=0.18, label=label)
    for index, (label, value) in enumerate((data.get("reference") or {}).items()):
        ax.axhline(value, color="black", linestyle=SERIES[(index + 1) % len(SERIES)][2], linewidth=1, label=label)
    ax.set_xticks(x, groups, rotation=30 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel(data["ylabel"])
    if data.get("ylim") is not None:
        ax.set_ylim(*data["ylim"])
    ax.set_title(data["title"])
    ax.grid(axis="y", alpha=0.3)
    outside_legend(ax)


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
        ax.hist(
            values,
            bins=bins,
            histtype="step",
            linewidth=1.5,
            color=SERIES[index % len(SERIES)][0],
            linestyle=SERIES[index % len(SERIES)][2],
            hatch=hatch(index),
            label=f"{label} (n = {values.size})",
        )
    ax.set_xlabel(data["xlabel"])
    ax.set_ylabel("count (points)")
    ax.set_title(data["title"])
    outside_legend(ax)


def plot_counted_histogram(data: Mapping[str, Any], ax) -> None:
    """Histograms already counted by a stage: ``edges`` (n_bins + 1,), ``counts`` {label: (n_bins,)}."""
    edges = np.asarray(data["edges"], dtype=float)
    for index, (label, counts) in enumerate(data["counts"].items()):
        counts = np.asarray(counts, dtype=float)
        ax.stairs(
            counts,
            edges,
            linewidth=1.5,
            color=SERIES[index % len(SERIES)][0],
            linestyle=SERIES[index % len(SERIES)][2],
            hatch=hatch(index),
            label=f"{label} (n = {int(counts.sum())})",
        )
    ax.set_xlabel(data["xlabel"])
    ax.set_ylabel(data.get("ylabel", "count"))
    ax.set_title(data["title"])
    outside_legend(ax)


def plot_curves(data: Mapping[str, Any], ax) -> None:
    """Lines over a shared x: ``x``, ``series`` {label: values}, ``xlabel``, ``ylabel``, ``title``.

    Optional: ``styles`` {label: index into :data:`SERIES`} (several series may share a colour,
    e.g. the training and validation values of one loss term), ``dashed`` (labels drawn dashed),
    ``xs`` {label: x values} for series on their own x, ``marker_x`` (a vertical line),
    ``reference`` {label: y} (horizontal lines, e.g. chance level), ``ylim``, ``logy``.
    """
    x = np.asarray(data["x"])
    styles, dashed, xs = data.get("styles") or {}, set(data.get("dashed") or ()), data.get("xs") or {}
    for index, (label, values) in enumerate(data["series"].items()):
        values = np.asarray(values, dtype=float)
        line = style(styles.get(label, index))
        if label in dashed:  # a pair of series in one colour: the second dashed with open markers
            line["linestyle"], line["markerfacecolor"] = "--", "white"
        elif label in styles:
            line["linestyle"] = "-"
        if len(values) > 60:  # per-step curves: a thin line, markers would hide it
            line.update(marker="", linewidth=0.8)
        ax.plot(np.asarray(xs.get(label, x)), values, label=label, **line)
    if data.get("marker_x") is not None:
        ax.axvline(data["marker_x"], color="#555555", linestyle=":", linewidth=1, label=data.get("marker_label"))
    for index, (label, value) in enumerate((data.get("reference") or {}).items()):
        ax.axhline(
            value, color="#555555", linestyle=(0, (4, 2)) if index == 0 else (0, (1, 1)), linewidth=1.2, label=label
        )
    if data.get("logy"):
        ax.set_yscale("log")
    if data.get("ylim") is not None:  # fixed ranges for fractions, so runs compare by eye
        ax.set_ylim(*data["ylim"])
    if np.issubdtype(x.dtype, np.integer):  # epochs, steps, k: no tick at 2.5
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(data["xlabel"])
    ax.set_ylabel(data["ylabel"])
    ax.set_title(data["title"])
    ax.grid(alpha=0.3)
    outside_legend(ax, below=bool(data.get("legend_below")))


def _annotate(ax, values: np.ndarray, image, text_format: str = "{:.2g}") -> None:
    """Write each finite value in its cell (when the cells are few enough to hold the text), in
    white on dark cells and black on light ones."""
    if values.size > 300:
        return
    shown = np.ma.getdata(image.get_array())
    for (r, c), value in np.ndenumerate(values):
        if np.isnan(value):
            ax.text(c, r, "n/a", ha="center", va="center", fontsize=MIN_FONT - 1, color="#555555")
        elif np.isfinite(value):
            dark = float(np.ma.getdata(image.norm(shown[r, c]))) < 0.5
            ax.text(
                c,
                r,
                text_format.format(value),
                ha="center",
                va="center",
                fontsize=MIN_FONT - 1,
                color="white" if dark else "black",
            )


def plot_heatmap(data: Mapping[str, Any], ax) -> None:
    """A labelled matrix: ``values`` (R, C), ``rows``, ``columns``, ``xlabel``, ``ylabel``, ``title``,
    ``colorbar`` (label with unit); optional ``limits``, ``center`` (limits symmetric about it),
    ``log_center`` (a log colour scale symmetric about this value in ratio, e.g. 1 for a lift;
    zeros are shown as cells at the bottom of the scale), ``marked`` (R, C) bool drawn as a star
    (e.g. a bootstrap interval that excludes zero), ``text_format`` for the cell values."""
    from matplotlib.colors import LogNorm

    values = np.asarray(data["values"], dtype=float)
    center, log_center = data.get("center"), data.get("log_center")
    if log_center is not None:
        positive = values[np.isfinite(values) & (values > 0)]
        ratio = float(np.max(np.abs(np.log(positive / log_center)))) if positive.size else 1.0
        span = float(np.exp(max(ratio, np.log(2.0))))
        norm = LogNorm(vmin=log_center / span, vmax=log_center * span)
        # zero share: the bottom of the scale; NaN (an expert without load) stays blank
        shown = np.where(np.isnan(values), np.nan, np.where(values > 0, values, log_center / span))
        image = ax.imshow(shown, cmap=DIVERGING_CMAP, norm=norm, aspect="auto")
    elif data.get("limits") is not None:
        low, high = data["limits"]
        image = ax.imshow(
            values, cmap=DIVERGING_CMAP if center is not None else HEATMAP_CMAP, vmin=low, vmax=high, aspect="auto"
        )
    elif center is not None:
        span = np.nanmax(np.abs(values - center)) if np.isfinite(values).any() else 1.0
        span = span or 1.0
        image = ax.imshow(values, cmap=DIVERGING_CMAP, vmin=center - span, vmax=center + span, aspect="auto")
    else:
        image = ax.imshow(values, cmap=HEATMAP_CMAP, aspect="auto")
    ax.set_xticks(
        range(values.shape[1]),
        list(data["columns"]),
        rotation=45 if values.shape[1] > 3 else 0,
        ha="right" if values.shape[1] > 3 else "center",
        rotation_mode="anchor",
    )
    ax.set_yticks(range(values.shape[0]), list(data["rows"]))
    _annotate(ax, values, image, data.get("text_format", "{:.2g}"))
    marked = data.get("marked")
    if marked is not None:
        rows, cols = np.nonzero(np.asarray(marked))
        ax.scatter(cols + 0.32, rows - 0.28, marker="*", s=30, color="#D55E00", edgecolors="black", linewidths=0.4)
    ax.set_xlabel(data["xlabel"])
    ax.set_ylabel(data["ylabel"])
    ax.set_title(data["title"])
    colorbar = ax.figure.colorbar(image, ax=ax, shrink=0.9 if values.shape[0] > 4 else 1.0)
    colorbar.set_label(data["colorbar"])
    if log_center is not None:
        from matplotlib.ticker import FixedLocator, FuncFormatter

        low, high = image.norm.vmin, image.norm.vmax
        ticks = [t for t in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16) if low <= t * log_center <= high]
        colorbar.ax.yaxis.set_major_locator(FixedLocator([t * log_center for t in ticks]))
        colorbar.ax.yaxis.set_minor_locator(FixedLocator([]))
        colorbar.ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def plot_intervals(data: Mapping[str, Any], ax) -> None:
    """Point estimates with intervals: ``labels``, ``value``, ``low``, ``high``, ``xlabel``, ``title``;
    optional ``control`` values drawn as open markers, ``reference`` {label: x} vertical lines."""
    value = np.asarray(data["value"], dtype=float)
    low, high = np.asarray(data["low"], dtype=float), np.asarray(data["high"], dtype=float)
    y = np.arange(len(value))
    ax.errorbar(
        value, y, xerr=[value - low, high - value], fmt="o", color="black", capsize=3, label=data.get("value_label")
    )  # None: no legend entry (the axis label says what it is)
    if data.get("control") is not None:
        ax.scatter(
            np.asarray(data["control"], dtype=float),
            y,
            marker="s",
            facecolors="none",
            edgecolors="#0072B2",
            label=data.get("control_label", "control"),
        )
    for index, (label, x) in enumerate((data.get("reference") or {"0": 0.0}).items()):
        ax.axvline(
            x,
            color="#777777",
            linestyle=":" if index == 0 else "--",
            linewidth=1,
            label=None if label == "0" else label,
        )
    ax.set_yticks(y, list(data["labels"]))
    ax.invert_yaxis()
    ax.set_xlabel(data["xlabel"])
    ax.set_title(data["title"])
    ax.grid(axis="x", alpha=0.3)
    outside_legend(ax)


def plot_scatter(data: Mapping[str, Any], ax) -> None:
    """Points coloured (and marked) by group: ``x``, ``y`` (n,), ``group`` (n,) int, ``group_names``,
    ``xlabel``, ``ylabel``, ``title``. Group ``-1`` (if any) is drawn in gray as ``other``."""
    x, y = np.asarray(data["x"], dtype=float), np.asarray(data["y"], dtype=float)
    group = np.asarray(data["group"])
    size = 10 if len(x) > 2000 else 16
    for index, name in enumerate(data["group_names"]):
        chosen = group == index
        colour, marker = SERIES[(index + 1) % len(SERIES)][:2]
        ax.scatter(
            x[chosen],
            y[chosen],
            s=size,
            marker=marker,
            color=colour,
            alpha=0.6,
            linewidths=0,
            label=f"{name} (n = {int(chosen.sum())})",
        )
    ax.set_xlabel(data["xlabel"])
    ax.set_ylabel(data["ylabel"])
    ax.set_title(data["title"])
    ax.grid(alpha=0.3)
    outside_legend(ax, markerscale=1.6)
