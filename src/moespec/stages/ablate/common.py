"""What both ablate sources share: index checks, routing and comparison tables, the summary, one writer.

Every function here returns ``{dataset name: array}`` tables (or the summary); :func:`write_tables`
is the one place they are written. Each comparison (the baseline, each mode's ablations, each
mode's control sets, the seed control) draws its bootstrap from a generator of its own
(:func:`comparison_rng`), so adding a mode or a control changes no other interval.
"""

from __future__ import annotations

import zlib
from typing import Any, Optional

import numpy as np

from moespec.artifacts import ArtifactWriter
from moespec.errors import ConfigError
from moespec.specialisation import ablation as tables_
from moespec.specialisation.ablation import AblationPlan, Groups
from moespec.specialisation.metrics import collapse_report

#: Config mode -> mode of ``moespec.models.routing.Ablation`` (whose "drop" is the renormalising one).
LIBRARY_MODE = {"mask": "mask", "zero": "zero", "renormalise": "drop"}


def comparison_rng(seed: int, *key: str) -> np.random.Generator:
    """The generator of one comparison: seeded by the stage seed and the comparison's name."""
    return np.random.default_rng([seed, *(zlib.crc32(part.encode()) for part in key)])


def check_indices(cfg: Any, n_layers: int, n_experts: int) -> tuple[list[int], list[int]]:
    """The MoE layers and experts to ablate; ConfigError naming any that does not exist."""
    problems = [
        f"ablate.experts: expert {expert} does not exist; the model has {n_experts} experts "
        f"(0..{n_experts - 1}) per MoE layer"
        for expert in cfg.experts or []
        if expert >= n_experts
    ]
    problems += [
        f"ablate.layers: MoE layer {layer} does not exist; the model has {n_layers} MoE layer(s) (0..{n_layers - 1})"
        for layer in cfg.layers or []
        if layer >= n_layers
    ]
    if problems:
        raise ConfigError(problems)
    return list(cfg.layers or range(n_layers)), list(cfg.experts or range(n_experts))


def write_tables(out: ArtifactWriter, tables: dict[str, Any]) -> None:
    """Write every table; an empty list of names becomes an empty string dataset."""
    import h5py

    for name, value in tables.items():
        if isinstance(value, list) and not value:
            out.create_dataset(name, (0,), h5py.string_dtype())
        else:
            out.write(name, value)


def group_tables(groups: Groups) -> dict[str, Any]:
    """``names/<key>`` and ``eval/<key>`` of every grouping."""
    tables: dict[str, Any] = {f"names/{key}": list(names) for key, names in groups.names.items()}
    tables.update({f"eval/{key}": codes.astype(np.int64) for key, codes in groups.eval.items()})
    return tables


def routing_analysis(
    cfg: Any,
    probs: np.ndarray,
    expert_index: np.ndarray,
    groups: Groups,
    layer_names: list[str],
    layers: list[int],
    experts: list[int],
    token_ids: Optional[np.ndarray] = None,
    sequence: Optional[np.ndarray] = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray], AblationPlan]:
    """Routing and specialisation tables, and the ablations to run (control sets matched to the load).

    Returns the tables to write, the routing statistics the summary needs, and the plan.
    """
    routing = tables_.routing_tables(
        probs, expert_index, groups, entropy_bins=cfg.entropy_bins, dead_threshold=cfg.dead_threshold
    )
    if "token" in cfg.by:
        routing.update(
            tables_.token_tables(
                expert_index[..., 0],
                token_ids,
                sequence,
                probs.shape[-1],
                min_count=cfg.min_token_count,
                rng=np.random.default_rng([cfg.seed, 2]),
            )
        )
    plan = tables_.plan_ablations(
        layers, experts, routing["experts/load"], cfg.random_sets, np.random.default_rng([cfg.seed, 1])
    )
    tables = {
        "routing/probs": probs.astype(np.float32),
        "routing/expert_index": expert_index.astype(np.int64),
        "layers/name": layer_names,
        **routing,
        **tables_.plan_tables(plan, routing["experts/load"]),
    }
    return tables, routing, plan


def baseline_tables(
    cfg: Any, metric: str, values: np.ndarray, groups: Groups, weights: Optional[np.ndarray] = None
) -> dict[str, Any]:
    """The unablated metric per input, its mean per group and its bootstrap bounds."""
    return {
        "baseline/values": values,
        **tables_.baseline_tables(
            metric,
            values,
            groups,
            rng=comparison_rng(cfg.seed, "baseline"),
            n_resamples=cfg.bootstrap,
            confidence=cfg.confidence,
            weights=weights,
        ),
    }


def comparison(
    cfg: Any,
    mode: str,
    metric: str,
    baseline: np.ndarray,
    values: np.ndarray,
    plan: AblationPlan,
    groups: Groups,
    weights: Optional[np.ndarray] = None,
) -> dict[str, Any]:
    """The single ablations and the control sets of one mode, against the baseline, with paired intervals."""
    single, controls = values[: plan.n_single], values[plan.n_single :]
    tables = {f"ablation/{mode}/values": single.astype(np.float64)}
    for prefix, compared in ((f"ablation/{mode}", single), (f"controls/random/{mode}", controls)):
        if len(compared):
            tables.update(
                tables_.comparison_tables(
                    prefix,
                    metric,
                    baseline,
                    compared,
                    groups,
                    rng=comparison_rng(cfg.seed, prefix),
                    n_resamples=cfg.bootstrap,
                    confidence=cfg.confidence,
                    weights=weights,
                )
            )
    return tables


def seed_control_tables(
    cfg: Any, seeds: list[int], values: np.ndarray, baseline: np.ndarray, metric: str, groups: Groups
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The "another seed" control against the baseline; returns its tables and its summary entry."""
    tables = {
        "controls/seed/seeds": np.array(seeds, dtype=np.int64),
        "controls/seed/values": values,
        **tables_.comparison_tables(
            "controls/seed",
            metric,
            baseline,
            values,
            groups,
            rng=comparison_rng(cfg.seed, "controls/seed"),
            n_resamples=cfg.bootstrap,
            confidence=cfg.confidence,
        ),
    }
    return tables, {"seed_control_delta": [tables_.rounded(v) for v in tables[f"controls/seed/delta_{metric}"]]}


def summarise(
    cfg: Any,
    out: ArtifactWriter,
    plan: AblationPlan,
    routing: dict,
    results: dict,
    metric: str,
    groups: Groups,
    baseline: float,
    summary: dict,
    extra: Optional[dict] = None,
) -> None:
    """The per-expert table (logged and in the summary) and the layer headline numbers."""
    table = tables_.expert_table(
        plan,
        routing,
        results,
        list(cfg.modes),
        metric,
        groups.names,
        higher_is_better=metric == "accuracy",
        extra=extra,
    )
    out.log.info(
        "per-expert ablation (mode %s; %s %.4f without ablation; positive = the ablation hurt)\n%s",
        cfg.modes[0],
        metric,
        baseline,
        tables_.format_table(table),
    )
    out.attrs["metric"] = metric
    collapsed, reasons = collapse_report(routing["experts/load"], cfg.dead_threshold)
    out.summary.update(
        modes=list(cfg.modes),
        metric=metric,
        baseline=tables_.rounded(baseline),
        **summary,
        experts=table,
        **tables_.layer_summary(routing),
        collapsed=collapsed,
        collapse_reasons=reasons,
    )
