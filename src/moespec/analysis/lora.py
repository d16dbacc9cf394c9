"""Report sections of the lora and route stages: tables, and ``plot_*(data, ax)`` that only draw.

:func:`lora_section` and :func:`route_section` read one artifact into a
:class:`~moespec.analysis.loaders.Section` (numbers as cells that name their dataset); the
``plot_*`` functions draw what they are given in the report's fixed, grayscale-safe style
(:mod:`moespec.analysis.plots`). Nothing here computes a statistic: losses, gains, intervals,
accuracies and confusion counts are the route stage's own.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from moespec.analysis import plots


# --------------------------------------------------------------------------------------------------
# drawing


def plot_loss_matrix(data: Mapping[str, Any], ax) -> None:
    """Adapter x domain loss change against the base: ``delta`` (M, D), ``models``, ``domains``, ``n_texts``.

    Each cell is ``loss(model, domain) - loss(base, domain)`` in nats per token (negative: the model
    helps); a star marks the best model of each domain.
    """
    delta = np.asarray(data["delta"], dtype=float)
    best = np.zeros(delta.shape, dtype=bool)
    finite = np.isfinite(delta).any(axis=0)
    best[np.nanargmin(np.where(np.isfinite(delta), delta, np.inf), axis=0)[finite], np.flatnonzero(finite)] = True
    plots.plot_heatmap(
        {
            "values": delta,
            "rows": data["models"],
            "columns": data["domains"],
            "center": 0.0,
            "marked": best,
            "xlabel": "test texts of domain",
            "ylabel": "model (adapter of domain)",
            "colorbar": "loss − base loss (nats/token)",
            "title": f"adapter × domain loss vs the base, {data['n_texts']} test texts (* best)",
        },
        ax,
    )


def plot_confusion(data: Mapping[str, Any], ax) -> None:
    """A router's confusion matrix: ``counts`` (D, D) (rows: true domain), ``domains``, ``router``.

    Cells are shares of each true domain's texts (rows sum to 1), annotated with the counts.
    """
    counts = np.asarray(data["counts"], dtype=float)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.full(counts.shape, np.nan), where=totals > 0)
    image = ax.imshow(shares, cmap=plots.HEATMAP_CMAP, vmin=0.0, vmax=1.0, aspect="auto")
    for (row, col), count in np.ndenumerate(counts):
        ax.text(
            col,
            row,
            f"{int(count)}",
            ha="center",
            va="center",
            fontsize=7,
            color="white" if shares[row, col] < 0.5 else "black",
        )
    domains = list(data["domains"])
    ax.set_xticks(range(len(domains)), domains, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(len(domains)), domains, fontsize=7)
    ax.set_xlabel("domain chosen by the router")
    ax.set_ylabel("true domain")
    ax.set_title(f"{data['router']}: accuracy {data['accuracy']:.3f} on {int(counts.sum())} test texts", fontsize=10)
    ax.figure.colorbar(image, ax=ax, label="share of the true domain's texts (fraction)")


def plot_router_bars(data: Mapping[str, Any], ax) -> None:
    """Per-domain values of each router with interval bars.

    ``data``: ``domains``, ``routers`` (names), ``value``, ``low``, ``high`` (R, D), ``ylabel``, ``title``.
    """
    value = np.asarray(data["value"], dtype=float)
    low, high = np.asarray(data["low"], dtype=float), np.asarray(data["high"], dtype=float)
    routers, domains = list(data["routers"]), list(data["domains"])
    width = 0.8 / max(len(routers), 1)
    x = np.arange(len(domains))
    for index, router in enumerate(routers):
        position = x + index * width - 0.4 + width / 2
        colour = plots.SERIES[index % len(plots.SERIES)][0]
        ax.bar(
            position,
            np.nan_to_num(value[index]),
            width,
            label=router,
            color=colour,
            hatch=plots.hatch(index),
            edgecolor="black",
            linewidth=0.5,
        )
        ax.axhline(0.0, color="black", linewidth=0.8)
        has = np.isfinite(low[index]) & np.isfinite(high[index])
        ax.errorbar(
            position[has],
            value[index][has],
            yerr=[value[index][has] - low[index][has], high[index][has] - value[index][has]],
            fmt="none",
            ecolor="black",
            capsize=2,
            linewidth=0.8,
        )
    ax.set_xticks(x, domains, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(data["ylabel"])
    ax.set_title(data["title"], fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)


# --------------------------------------------------------------------------------------------------
# loading


def lora_section(source: Any) -> Any:
    """The lora artifact: one table row per adapter and the validation curves."""
    from moespec.analysis.loaders import Figure, Section, Table

    section = Section("Domain LoRA adapters (lora)", "lora", source.task)
    names = source.names("adapter_name")
    columns = [
        "base_val_loss",
        "best_val_loss",
        "best_step",
        "steps_run",
        "trainable_params",
        "n_train",
        "n_val",
        "n_test",
        "train_seconds",
    ]
    section.tables.append(
        Table(
            "adapters (validation loss in nats/token)",
            ["domain", *columns],
            [[name, *[source.cell(c, i) for c in columns]] for i, name in enumerate(names)],
        )
    )
    steps, losses = source.array("curves/val_step"), source.array("curves/val_loss")
    kept = steps[0] >= 0
    section.figures.append(
        Figure(
            "adapter_val_loss",
            plots.plot_curves,
            {
                "x": steps[0][kept],
                "series": {name: losses[i][kept] for i, name in enumerate(names)},
                "xlabel": "optimiser step",
                "ylabel": "validation loss (nats/token)",
                "title": "validation loss of each domain's adapter",
            },
            "validation loss per adapter during training",
        )
    )
    return section


def route_section(source: Any) -> Any:
    """The route artifact: routers compared, the loss matrix, confusion matrices, per-domain bars."""
    from moespec.analysis.loaders import Figure, Section

    section = Section("Routers over domain adapters (route)", "route", source.task)
    routers, kinds = source.names("router_names"), source.names("router_kinds")
    domains, models = source.names("domain_names"), source.names("model_names")
    n_texts = len(source.array("text_id"))
    section.tables.append(_router_table(source, routers, n_texts))
    section.tables.append(_matrix_table(source, models, domains))
    matrix = source.array("loss_matrix")
    section.figures.append(
        Figure(
            "loss_matrix",
            plot_loss_matrix,
            {
                "delta": matrix - matrix[models.index("base")][None, :],
                "models": models,
                "domains": domains,
                "n_texts": n_texts,
            },
            "adapter × domain loss change against the base model (does each adapter help its own domain most?)",
            size=(6.4, 0.45 * len(models) + 2.2),
        )
    )
    confusion, accuracy = source.array("confusion"), source.array("router_accuracy")
    for index, (router, kind) in enumerate(zip(routers, kinds)):
        if kind in ("keyword", "learned"):
            section.figures.append(
                Figure(
                    f"confusion_{index}",
                    plot_confusion,
                    {"counts": confusion[index], "domains": domains, "router": router, "accuracy": accuracy[index]},
                    f"confusion matrix of the {router} router",
                )
            )
    interval = f"{100 * source.reader.h5.attrs.get('confidence', 0.95):.0f}% bootstrap intervals"
    for name, label in (
        ("router_domain_delta", "loss − base loss (nats/token)"),
        ("router_domain_gain", "gain recovered"),
    ):
        section.figures.append(
            Figure(
                name,
                plot_router_bars,
                {
                    "domains": domains,
                    "routers": routers,
                    "value": source.array(name),
                    "low": source.array(name + "_low"),
                    "high": source.array(name + "_high"),
                    "ylabel": label,
                    "title": f"{label.split(' (')[0]} per domain, {n_texts} test texts ({interval})",
                },
                f"{label} per domain and router, with {interval} over the test texts",
            )
        )
    return section


def _router_table(source: Any, routers: list[str], n_texts: int) -> Any:
    from moespec.analysis.loaders import Table

    base_seconds = float(source.reader.h5.attrs.get("base_forward_seconds_per_text", np.nan))
    header = [
        "router",
        "accuracy",
        "gain recovered",
        "low",
        "high",
        "loss (nats/token)",
        "calibration error",
        "routing s/text",
    ]
    rows = [
        [
            router,
            source.cell("router_accuracy", i),
            source.cell("gain_recovered", i),
            source.cell("gain_recovered_low", i),
            source.cell("gain_recovered_high", i),
            source.cell("router_loss", i),
            source.cell("calibration_error", i),
            source.cell("routing_seconds_per_text", i),
        ]
        for i, router in enumerate(routers)
    ]
    return Table(
        f"routers on {n_texts} test texts",
        header,
        rows,
        f"gain recovered = (base − router) / (base − oracle); one base forward pass costs "
        f"{base_seconds:.3g} s/text; n/a: the router picks no domain",
    )


def _matrix_table(source: Any, models: list[str], domains: list[str]) -> Any:
    from moespec.analysis.loaders import Table

    return Table(
        "loss (nats/token) of each model on each domain's test texts",
        ["model", *domains],
        [[model, *[source.cell("loss_matrix", m, d) for d in range(len(domains))]] for m, model in enumerate(models)],
    )
