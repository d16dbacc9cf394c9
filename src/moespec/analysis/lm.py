"""The ``lm`` stage in reports and comparisons: loaders of its artifacts and ``plot_*(data, ax)`` drawers.

:func:`lm_section` reads one ``lm`` artifact into a report section (the final model's losses,
parameter counts and throughput; losses per domain; for an MoE, the token-level specialisation of
each layer and its routing figures). :func:`sweep_curves` reads the validation-loss curves of
every run of a comparison so that :func:`plot_sweep_curves` overlays them. Nothing here computes a
result: every number is one the stage wrote. Figures follow the report's conventions: grayscale-
readable series (marker and line style differ), the monotone ``cividis`` map for matrices.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np

from moespec.analysis.loaders import Figure, Section, Table

_STYLES = [
    ("#1b1b1b", "o", "-"),
    ("#6a6a6a", "s", "--"),
    ("#a0a0a0", "^", ":"),
    ("#3d3d3d", "D", "-."),
    ("#808080", "v", (0, (5, 1))),
    ("#c0c0c0", "P", (0, (1, 2))),
]

#: Per-layer specialisation rows of the report table: (label, dataset under specialisation/).
_SPECIALISATION_ROWS = (
    ("NMI(expert; token id)", "nmi_token"),
    ("NMI(expert; domain)", "nmi_domain"),
    ("I(expert; domain | token id), nats", "cmi_domain_given_token"),
    ("  shuffled-domain null, mean", "cmi_null_mean"),
    ("  permutation p-value", "cmi_p_value"),
    ("vocabulary specialisation", "vocab_specialisation"),
    ("  null (experts permuted)", "vocab_specialisation_null"),
)


def _style(index: int) -> dict[str, Any]:
    colour, marker, linestyle = _STYLES[index % len(_STYLES)]
    return {"color": colour, "marker": marker, "linestyle": linestyle, "markersize": 3}


# --------------------------------------------------------------------------------------------------
# drawing


def plot_lm_curves(data: Mapping[str, Any], ax) -> None:
    """Training loss per optimiser step (thin line) and validation loss at each evaluation (markers).

    ``data``: ``steps``, ``train`` (per step), ``eval_steps``, ``val`` (per evaluation), ``title``.
    """
    ax.plot(data["steps"], data["train"], color="#9a9a9a", linewidth=0.8, label="training (per step)")
    ax.plot(data["eval_steps"], data["val"], label="validation", **_style(0))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("next-token loss (nats / token)")
    ax.set_title(data["title"], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()


def plot_lm_lines(data: Mapping[str, Any], ax) -> None:
    """Several series over evaluation steps: ``x``, ``series`` ({label: values}), ``ylabel``, ``title``, ``ylim``."""
    for index, (label, values) in enumerate(data["series"].items()):
        ax.plot(data["x"], values, label=label, **_style(index))
    ax.set_xlabel(data.get("xlabel", "optimiser step"))
    ax.set_ylabel(data["ylabel"])
    if data.get("ylim") is not None:
        ax.set_ylim(*data["ylim"])
    ax.set_title(data["title"], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_lm_matrix(data: Mapping[str, Any], ax) -> None:
    """A labelled matrix: ``values`` (R, C), ``rows``, ``columns``, ``xlabel``, ``ylabel``, ``colorbar``, ``title``."""
    values = np.asarray(data["values"], dtype=float)
    image = ax.imshow(values, cmap="cividis", aspect="auto", vmin=data.get("vmin"), vmax=data.get("vmax"))
    ax.set_xticks(range(values.shape[1]), list(data["columns"]), fontsize=7)
    ax.set_yticks(range(values.shape[0]), list(data["rows"]), fontsize=7)
    if values.size <= 160:
        for (r, c), value in np.ndenumerate(values):
            if np.isfinite(value):
                ax.text(
                    c,
                    r,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if image.norm(value) < 0.5 else "black",
                )
    ax.set_xlabel(data["xlabel"])
    ax.set_ylabel(data["ylabel"])
    ax.set_title(data["title"], fontsize=10)
    ax.figure.colorbar(image, ax=ax, label=data["colorbar"])


def plot_sweep_curves(data: Mapping[str, Any], ax) -> None:
    """Validation loss curves of the runs of a sweep, overlaid: ``runs`` ({label: (steps, val_loss)})."""
    for index, (label, (steps, values)) in enumerate(data["runs"].items()):
        ax.plot(steps, values, label=label, **_style(index))
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("validation loss (nats / token)")
    ax.set_title(data["title"], fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)


# --------------------------------------------------------------------------------------------------
# loading


def lm_section(source: Any) -> Section:
    """The report section of one ``lm`` artifact (``source``: the loaders' open-artifact wrapper)."""
    model = source.task.config.get("model", {})
    moe = source.has("curves/expert_load")
    kind = (
        f"MoE, {model.get('num_experts')} experts, top-{model.get('top_k')}"
        if moe
        else f"dense twin matched on {model.get('dense_twin')} parameters"
    )
    section = Section(f"Language model (lm, {kind})", "lm", source.task)
    n_evals = len(source.array("curves/step"))
    section.tables.append(
        Table(
            "final model (validation texts)",
            ["quantity", "value"],
            [
                ["validation loss (nats/token)", source.cell("val_loss")],
                ["perplexity", source.cell("curves/val_perplexity", n_evals - 1)],
                ["bits per byte", source.cell("val_bits_per_byte")],
                ["next-token accuracy", source.cell("curves/val_accuracy", n_evals - 1)],
                ["parameters, total", source.cell("params_total")],
                ["parameters, active", source.cell("params_active")],
                ["training tokens/s", source.cell("tokens_per_s")],
            ],
        )
    )
    domains = source.names("domain_names")
    section.tables.append(
        Table(
            "per domain",
            ["domain", "loss (nats/token)", "bits per byte"],
            [
                [name, source.cell("val/domain_loss", i), source.cell("val/domain_bpb", i)]
                for i, name in enumerate(domains)
            ],
        )
    )
    section.figures.append(
        Figure(
            "lm_loss",
            plot_lm_curves,
            {
                "steps": source.array("steps/index"),
                "train": source.array("steps/train/lm"),
                "eval_steps": source.array("curves/step"),
                "val": source.array("curves/val_loss"),
                "title": "next-token loss",
            },
            "training and validation loss",
        )
    )
    if moe:
        _routing(section, source, domains)
    return section


def _routing(section: Section, source: Any, domains: list[str]) -> None:
    load = source.array("curves/expert_load")  # (n_evals, L, E)
    n_layers, n_experts = load.shape[1:]
    layers = [f"layer {layer}" for layer in range(n_layers)]
    section.tables.append(
        Table(
            "token-level specialisation (final model, validation tokens)",
            ["measure", *layers],
            [
                [label, *[source.cell(f"specialisation/{name}", layer) for layer in range(n_layers)]]
                for label, name in _SPECIALISATION_ROWS
            ],
            note="Experts follow token ids when NMI(token) is high and I(expert; domain | token "
            "id) is near its shuffled-domain null.",
        )
    )
    steps = source.array("curves/step")
    section.figures.append(
        Figure(
            "lm_expert_load",
            plot_lm_matrix,
            {
                "values": load[-1],
                "rows": layers,
                "columns": [str(e) for e in range(n_experts)],
                "xlabel": "expert",
                "ylabel": "MoE layer",
                "colorbar": "share of routed slots",
                "title": "expert load, final model",
                "vmin": 0.0,
            },
            "share of routed slots per expert",
        )
    )
    section.figures.append(
        Figure(
            "lm_router",
            plot_lm_lines,
            {
                "x": steps,
                "series": {
                    **{f"entropy, layer {l}": source.array("curves/router_entropy")[:, l] for l in range(n_layers)},
                    **{
                        f"saturation, layer {l}": source.array("curves/router_saturation")[:, l]
                        for l in range(n_layers)
                    },
                },
                "ylabel": "fraction",
                "ylim": (0, 1.05),
                "title": "router entropy / log E and top-k overlap with the final routing",
            },
            "router entropy and saturation",
        )
    )
    share = source.array("specialisation/domain_share")  # (L, n_domains, E)
    for layer in range(n_layers):
        section.figures.append(
            Figure(
                f"lm_domain_share_{layer}",
                plot_lm_matrix,
                {
                    "values": share[layer],
                    "rows": domains,
                    "columns": [str(e) for e in range(n_experts)],
                    "xlabel": "expert",
                    "ylabel": "domain",
                    "colorbar": "share of the domain's routed slots",
                    "title": f"layer {layer}: experts per domain",
                },
                f"domain x expert shares, layer {layer}",
            )
        )
    coactivation = source.array("specialisation/coactivation")
    section.figures.append(
        Figure(
            "lm_coactivation",
            plot_lm_matrix,
            {
                "values": coactivation[0],
                "rows": [str(e) for e in range(n_experts)],
                "columns": [str(e) for e in range(n_experts)],
                "xlabel": "expert j",
                "ylabel": "expert i",
                "colorbar": "P(j selected | i selected)",
                "title": "co-activation, layer 0",
                "vmin": 0.0,
            },
            "expert co-activation, first MoE layer",
        )
    )


def sweep_curves(named_runs: list[tuple[str, Any]]) -> Optional[dict[str, Any]]:
    """The validation-loss curve of every run with a finished ``lm`` task, for :func:`plot_sweep_curves`."""
    from moespec.artifacts import open_artifact
    from moespec.errors import ArtifactError

    curves = {}
    for _, run in named_runs:
        task = run.tasks.get("lm")
        if task is None or task.status != "done":
            continue
        try:
            with open_artifact(task.h5_path) as reader:
                curves[f"{run.name}"] = (reader.read("curves/step"), reader.read("curves/val_loss"))
        except (ArtifactError, KeyError) as e:
            raise ArtifactError(f"{task.h5_path}: cannot read the lm curves: {e}") from e
    if not curves:
        return None
    return {"runs": curves, "title": f"validation loss of {len(curves)} lm runs"}
