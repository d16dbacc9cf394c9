"""Tables of an ablation study, as pure functions of measured routing and per-input outcomes.

Each ``*_tables`` function returns ``{dataset name: array}`` (the names the ablate stage writes,
see :mod:`moespec.stages.ablate`); nothing here reads or writes files. The metrics themselves are
in :mod:`moespec.specialisation.metrics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from moespec.specialisation import metrics as spec


@dataclass
class Groups:
    """Groupings of the evaluated inputs and of the routed inputs (which may be their tokens).

    Attributes
    ----------
    eval : dict
        key (``"domain"``, ``"class"``, ``"stratum"``) -> codes of shape (n_eval,).
    routed : dict
        key -> codes of shape (n_routed,).
    names : dict
        key -> names of the codes.
    """

    eval: dict[str, np.ndarray]
    routed: dict[str, np.ndarray]
    names: dict[str, list[str]]

    def size(self, key: str) -> int:
        return len(self.names[key])


@dataclass
class AblationPlan:
    """Every ablation to run: the single-expert ones, then the random control sets.

    Attributes
    ----------
    masks : ndarray of shape (A + R, E), bool
        Experts ablated by each ablation.
    layer : ndarray of shape (A + R,), int
        MoE layer of each ablation.
    n_single : int
        ``A``: rows ``[0, A)`` ablate one expert each; rows ``[A, A + R)`` are control sets.
    expert : ndarray of shape (A,), int
    control_target : ndarray of shape (R,), int
        The single ablation whose load each control set matches.
    """

    masks: np.ndarray
    layer: np.ndarray
    n_single: int
    expert: np.ndarray
    control_target: np.ndarray


def plan_ablations(
    layers: list[int], experts: list[int], load: np.ndarray, n_random: int, rng: np.random.Generator
) -> AblationPlan:
    """Single-expert ablations of ``experts`` in each of ``layers``, and ``n_random`` matched-load sets for each.

    Parameters
    ----------
    layers, experts : list of int
    load : ndarray of shape (n_layers, n_experts)
        Unablated load per layer (:func:`~moespec.specialisation.metrics.expert_load`).
    n_random : int
    rng : numpy.random.Generator
    """
    n_experts = load.shape[-1]
    singles = [(layer, expert) for layer in layers for expert in experts]
    masks = [np.eye(n_experts, dtype=bool)[expert] for _, expert in singles]
    layer_of = [layer for layer, _ in singles]
    targets = []
    for index, (layer, expert) in enumerate(singles):
        for mask in spec.matched_load_sets(load[layer], expert, n_random, rng):
            if mask.any():
                masks.append(mask)
                layer_of.append(layer)
                targets.append(index)
    return AblationPlan(
        np.array(masks, dtype=bool).reshape(-1, n_experts),
        np.array(layer_of, dtype=np.int64),
        len(singles),
        np.array([e for _, e in singles], dtype=np.int64),
        np.array(targets, dtype=np.int64),
    )


def plan_tables(plan: AblationPlan, load: np.ndarray) -> dict[str, np.ndarray]:
    """``ablations/*`` and ``controls/random/{experts,layer,target,load}``."""
    controls = slice(plan.n_single, None)
    control_layer = plan.layer[controls]
    control_load = (plan.masks[controls] * load[control_layer]).sum(axis=-1) if len(control_layer) else np.zeros(0)
    return {
        "ablations/layer": plan.layer[: plan.n_single],
        "ablations/expert": plan.expert,
        "controls/random/experts": plan.masks[controls],
        "controls/random/layer": control_layer,
        "controls/random/target": plan.control_target,
        "controls/random/load": control_load.astype(np.float64),
    }


# --------------------------------------------------------------------------------------------------
# routing and specialisation


def routing_tables(
    probs: np.ndarray, expert_index: np.ndarray, groups: Groups, *, entropy_bins: int = 20, dead_threshold: float = 0.1
) -> dict[str, np.ndarray]:
    """Load, importance, entropy and the specialisation tables of each MoE layer.

    Parameters
    ----------
    probs : ndarray of shape (n_routed, n_layers, n_experts)
        Unablated router probabilities.
    expert_index : ndarray of shape (n_routed, n_layers, k)
        Selected experts, best first.
    groups : Groups
        ``groups.routed`` gives the specialisation keys.

    Returns
    -------
    dict
        ``routing/entropy``, ``experts/*``, ``layers/*``, ``entropy_bin_edges`` and
        ``specialisation/<key>/*`` (see the ablate stage).
    """
    from moespec.specialisation.metrics import dead_expert_mask

    selected = np.zeros(probs.shape, dtype=bool)
    np.put_along_axis(selected, expert_index, True, axis=-1)
    n_layers, n_experts = probs.shape[1:]
    entropy = spec.routing_entropy(probs)  # (T, L)
    load = np.stack([spec.expert_load(selected[:, layer]) for layer in range(n_layers)])
    distributions = [spec.entropy_distribution(entropy[:, layer], entropy_bins) for layer in range(n_layers)]
    tables = {
        "routing/entropy": entropy.astype(np.float32),
        "experts/load": load,
        "experts/importance": np.stack([spec.expert_importance(probs[:, layer]) for layer in range(n_layers)]),
        "experts/dead": dead_expert_mask(load, dead_threshold),
        "experts/entropy": np.stack(
            [spec.mean_entropy_by_expert(entropy[:, layer], selected[:, layer]) for layer in range(n_layers)]
        ),
        "layers/load_cv": np.array([spec.coefficient_of_variation(row) for row in load]),
        "layers/entropy_mean": entropy.mean(axis=0).astype(np.float64),
        "layers/router_information": np.array([spec.router_information(probs[:, layer]) for layer in range(n_layers)]),
        "layers/entropy_histogram": np.stack([d[0] for d in distributions]),
        "layers/entropy_quantiles": np.stack([d[2] for d in distributions]),
        "entropy_bin_edges": distributions[0][1],
    }
    for key, codes in groups.routed.items():
        counts = np.stack(
            [spec.contingency_table(codes, selected[:, layer], groups.size(key)) for layer in range(n_layers)]
        )  # (L, G, E)
        share = np.stack([spec.specialisation_share(table) for table in counts])
        tables.update(
            {
                f"specialisation/{key}/counts": counts,
                f"specialisation/{key}/share": share,
                f"specialisation/{key}/lift_uniform": spec.lift_over_uniform(share),
                f"specialisation/{key}/lift_load": np.stack([spec.lift_over_load(s, l) for s, l in zip(share, load)]),
                f"specialisation/{key}/mutual_information": np.array([spec.mutual_information(t) for t in counts]),
                f"specialisation/{key}/nmi": np.array([spec.normalized_mutual_information(t) for t in counts]),
            }
        )
    return tables


def token_tables(
    top1: np.ndarray,
    token_ids: np.ndarray,
    sequence: np.ndarray,
    n_experts: int,
    *,
    min_count: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Token-level specialisation per layer, to compare with the domain / class tables.

    Parameters
    ----------
    top1 : ndarray of shape (n_tokens, n_layers), int
    token_ids, sequence : ndarray of shape (n_tokens,), int
        Token id and text of each token, tokens in text order.

    Returns
    -------
    dict
        ``specialisation/token/{consistency, consistency_weighted, consistency_shuffled,
        mutual_information, nmi, repetition}`` of shape (L,) and ``n_token_ids`` (): the
        consistency with token ids shuffled over positions is what routing independent of the
        token would give at the same token frequencies.
    """
    shuffled = rng.permutation(token_ids)
    _, codes = np.unique(token_ids, return_inverse=True)
    codes = codes.reshape(-1)
    rows: dict[str, list[float]] = {
        name: []
        for name in (
            "consistency",
            "consistency_weighted",
            "consistency_shuffled",
            "mutual_information",
            "nmi",
            "repetition",
        )
    }
    n_counted = 0
    for layer in range(top1.shape[1]):
        vocab_mean, occurrence_mean, n_counted = spec.token_consistency(token_ids, top1[:, layer], n_experts, min_count)
        table = spec.contingency_table(codes, spec.one_hot(top1[:, layer], n_experts), int(codes.max()) + 1)
        rows["consistency"].append(vocab_mean)
        rows["consistency_weighted"].append(occurrence_mean)
        rows["consistency_shuffled"].append(spec.token_consistency(shuffled, top1[:, layer], n_experts, min_count)[0])
        rows["mutual_information"].append(spec.mutual_information(table))
        rows["nmi"].append(spec.normalized_mutual_information(table))
        rows["repetition"].append(spec.consecutive_repetition(top1[:, layer], sequence))
    tables = {f"specialisation/token/{name}": np.array(values, dtype=np.float64) for name, values in rows.items()}
    tables["specialisation/token/n_token_ids"] = np.int64(n_counted)
    return tables


# --------------------------------------------------------------------------------------------------
# ablation outcomes


def _keyed_codes(n: int, groups: Groups) -> dict[str, tuple[np.ndarray, int]]:
    """ "" (everything) and "_<key>" -> (codes, number of groups)."""
    keyed = {"": (np.zeros(n, dtype=np.int64), 1)}
    keyed.update({f"_{key}": (codes, groups.size(key)) for key, codes in groups.eval.items()})
    return keyed


def baseline_tables(
    metric: str,
    baseline: np.ndarray,
    groups: Groups,
    *,
    rng: np.random.Generator,
    n_resamples: int,
    confidence: float,
    weights: Optional[np.ndarray] = None,
) -> dict[str, Any]:
    """``baseline/<metric>[_<key>]`` with ``_low`` / ``_high`` bootstrap bounds.

    Parameters
    ----------
    baseline : ndarray of shape (n_eval,)
        Per-input metric of the unablated model.
    weights : ndarray of shape (n_eval,), optional
        Per-input weights (tokens per text for a per-token loss).
    """
    tables: dict[str, Any] = {}
    for suffix, (codes, n_groups) in _keyed_codes(len(baseline), groups).items():
        point, low, high = spec.bootstrap_group_means(
            baseline, codes, n_groups, rng=rng, n_resamples=n_resamples, confidence=confidence, weights=weights
        )
        for name, array in [("", point), ("_low", low), ("_high", high)]:
            tables[f"baseline/{metric}{suffix}{name}"] = np.float64(array[0, 0]) if suffix == "" else array[0]
    return tables


def comparison_tables(
    prefix: str,
    metric: str,
    baseline: np.ndarray,
    values: np.ndarray,
    groups: Groups,
    *,
    rng: np.random.Generator,
    n_resamples: int,
    confidence: float,
    weights: Optional[np.ndarray] = None,
) -> dict[str, np.ndarray]:
    """Group means of per-input ``values`` and their paired differences from ``baseline``.

    Parameters
    ----------
    values : ndarray of shape (n_ablations, n_eval)
    baseline : ndarray of shape (n_eval,)

    Returns
    -------
    dict
        ``<prefix>/<metric>[_<key>]`` of shape (n_ablations,) or (n_ablations, G),
        ``<prefix>/delta_<metric>[_<key>]`` (ablated - baseline) with ``_low`` / ``_high`` bounds,
        and ``<prefix>/n_changed_<metric>[_<key>]`` (int64), the inputs whose value changed, which
        every interval is read with. For a 0/1 metric without weights (correct / wrong) the bounds are
        Tango's paired score interval from the counts of inputs that changed (:func:`paired_score_interval`);
        otherwise a paired percentile bootstrap over inputs. The percentile bootstrap under-covers when
        few inputs change (coverage 0.78-0.85 for a nominal 0.95 with 1 % of 200 inputs flipping) and
        gives ``[0, 0]`` when none does; the score interval does neither.
    """
    tables = {}
    binary = weights is None and _is_binary(baseline) and _is_binary(values)
    changed = values != baseline  # (A, N)
    for suffix, (codes, n_groups) in _keyed_codes(len(baseline), groups).items():
        means = spec.group_means(values, codes, n_groups, weights)
        if binary:
            delta, low, high = _paired_score_by_group(baseline, values, codes, n_groups, confidence)
        else:
            delta, low, high = spec.bootstrap_group_means(
                values - baseline,
                codes,
                n_groups,
                rng=rng,
                n_resamples=n_resamples,
                confidence=confidence,
                weights=weights,
            )
        squeeze = (lambda array: array[:, 0]) if suffix == "" else (lambda array: array)
        tables[f"{prefix}/{metric}{suffix}"] = squeeze(means)
        tables[f"{prefix}/n_changed_{metric}{suffix}"] = squeeze(_group_counts(changed, codes, n_groups))
        for name, array in [("", delta), ("_low", low), ("_high", high)]:
            tables[f"{prefix}/delta_{metric}{suffix}{name}"] = squeeze(array)
    return tables


def _is_binary(values: np.ndarray) -> bool:
    return bool(np.isin(np.asarray(values), (0.0, 1.0)).all())


def _group_counts(flags: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Per row of ``flags`` (R, N), how many True entries fall in each group: (R, n_groups) int64."""
    one_hot = np.eye(n_groups, dtype=np.int64)[codes]  # (N, G)
    return flags.astype(np.int64) @ one_hot


def _paired_score_by_group(
    baseline: np.ndarray, values: np.ndarray, codes: np.ndarray, n_groups: int, confidence: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean paired difference of 0/1 outcomes per group with Tango's score interval: (A, G) each."""
    gained = _group_counts((values == 1) & (baseline == 0), codes, n_groups)  # wrong -> correct
    lost = _group_counts((values == 0) & (baseline == 1), codes, n_groups)  # correct -> wrong
    sizes = np.bincount(codes, minlength=n_groups)[:n_groups]
    delta, low, high = (np.full(gained.shape, np.nan) for _ in range(3))
    present = np.broadcast_to(sizes > 0, gained.shape)
    estimate, lower, upper = paired_score_interval(
        gained[present], lost[present], np.broadcast_to(sizes, gained.shape)[present], confidence
    )
    delta[present], low[present], high[present] = estimate, lower, upper
    return delta, low, high


def paired_score_interval(
    gained, lost, n, confidence: float = 0.95, iterations: int = 60
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Tango's score interval for the difference of two paired proportions (Tango 1998, Stat. Med. 17:891).

    Of ``n`` inputs, ``gained`` went from 0 to 1 and ``lost`` from 1 to 0; the difference is
    ``delta = (gained - lost) / n``. For a candidate ``d``, the score statistic is (Tango eq. 3, with the
    restricted maximum-likelihood estimate of the 1 -> 0 probability under ``delta = d``, eq. 4)::

        T(d) = (gained - lost - n d) / sqrt(n (2 q + d (1 - d))),
        q = (sqrt(W^2 + 8 n lost d (1 - d)) - W) / (4 n),   W = -(gained + lost) + d (2 n - gained + lost),

    and the interval is ``{d : |T(d)| <= z}``, found by bisection on each side of the estimate (T is
    decreasing in d). It needs only the counts of changed inputs, stays inside [-1, 1], and is not
    degenerate when nothing changed (then it is ``+-z^2 / (n + z^2)``). Fagerland, Lydersen & Laake
    (2014, BMC Med. Res. Methodol. 14:1) recommend it among the asymptotic intervals for paired proportions.

    Parameters
    ----------
    gained, lost, n : array_like of int, broadcastable
    confidence : float
    iterations : int
        Bisection steps (60 reach float64 resolution on [-1, 1]).

    Returns
    -------
    estimate, low, high : ndarray of float64
    """
    from scipy import special

    gained, lost, n = (np.asarray(a, dtype=np.float64) for a in np.broadcast_arrays(gained, lost, n))
    z = special.ndtri(0.5 + confidence / 2)
    estimate = (gained - lost) / n
    bounds = []
    for side, target in ((-1.0, z), (1.0, -z)):
        inside, outside = estimate.copy(), np.full(estimate.shape, side)
        for _ in range(iterations):
            middle = (inside + outside) / 2
            statistic = _tango_statistic(gained, lost, n, middle)
            beyond = statistic > target if side < 0 else statistic < target
            outside = np.where(beyond, middle, outside)
            inside = np.where(beyond, inside, middle)
        bounds.append(inside)
    return estimate, bounds[0], bounds[1]


def paired_interval_coverage(n: int, p_gained: float, p_lost: float, confidence: float = 0.95) -> float:
    """Exact coverage of :func:`paired_score_interval` when each input changes independently.

    Each of ``n`` inputs goes 0 -> 1 with probability ``p_gained``, 1 -> 0 with ``p_lost`` and stays
    otherwise, so ``(gained, lost)`` is trinomial and the true difference is ``p_gained - p_lost``.
    The coverage is the probability of the outcomes whose interval holds the truth, summed over every
    outcome (no simulation error). It explains what the interval can promise: with ``n (p_gained +
    p_lost)`` below about 5 changed inputs expected, the outcomes are so few and discrete that the
    coverage sits above the nominal level (``docs/artifacts/ablate.md``, "Intervals of 0/1 metrics").

    Returns
    -------
    float
    """
    from scipy import special

    gained, lost = (grid.ravel() for grid in np.meshgrid(np.arange(n + 1), np.arange(n + 1), indexing="ij"))
    possible = gained + lost <= n
    gained, lost = gained[possible], lost[possible]
    unchanged = n - gained - lost
    with np.errstate(divide="ignore"):
        log_p = (
            special.gammaln(n + 1)
            - special.gammaln(gained + 1)
            - special.gammaln(lost + 1)
            - special.gammaln(unchanged + 1)
            + special.xlogy(gained, p_gained)
            + special.xlogy(lost, p_lost)
            + special.xlogy(unchanged, 1 - p_gained - p_lost)
        )
    # Outcomes below 1e-15 each (at most ~5e-10 together for n = 1000) do not move the sum: skip them.
    likely = log_p > np.log(1e-15)
    gained, lost, probability = gained[likely], lost[likely], np.exp(log_p[likely])
    truth = p_gained - p_lost
    _, low, high = paired_score_interval(gained, lost, n, confidence)
    # The bisection resolves bounds to float64; a truth on a bound counts as inside.
    tolerance = 1e-12
    return float(np.sum(probability * ((low <= truth + tolerance) & (truth - tolerance <= high))))


def _tango_statistic(gained: np.ndarray, lost: np.ndarray, n: np.ndarray, delta: np.ndarray) -> np.ndarray:
    w = -(gained + lost) + delta * (2 * n - gained + lost)
    q = (np.sqrt(np.maximum(w * w + 8 * n * lost * delta * (1 - delta), 0.0)) - w) / (4 * n)
    variance = n * (2 * q + delta * (1 - delta))
    numerator = gained - lost - n * delta
    with np.errstate(invalid="ignore", divide="ignore"):
        statistic = numerator / np.sqrt(variance)
        # A zero variance away from the estimate means d is impossible: infinitely far outside.
        return np.where(numerator == 0, 0.0, np.where(variance > 0, statistic, np.sign(numerator) * np.inf))


# --------------------------------------------------------------------------------------------------
# the per-expert headline table


def expert_table(
    plan: AblationPlan,
    routing: dict[str, np.ndarray],
    tables: dict[str, dict[str, np.ndarray]],
    modes: list[str],
    metric: str,
    names: dict[str, list[str]],
    *,
    higher_is_better: bool,
    extra: Optional[dict[str, np.ndarray]] = None,
) -> dict[str, list]:
    """One row per single-expert ablation: utilisation, entropy, the metric change and the group it hits most.

    Parameters
    ----------
    plan : AblationPlan
    routing : dict
        :func:`routing_tables` output.
    tables : dict
        mode -> :func:`comparison_tables` output (prefix ``ablation/<mode>``), plus the control
        tables under ``controls/random/<mode>`` when there are control sets.
    modes : list of str
        The first is the table's mode; the others add one column each.
    metric : str
    names : dict
        Group names per key.
    higher_is_better : bool
        Accuracy (a drop hurts) or a loss (an increase hurts); columns report the harm, so
        positive numbers always mean the ablation hurt.
    extra : dict, optional
        Additional columns (name -> values per single ablation).

    Returns
    -------
    dict of lists
        Column-wise: ``layer``, ``expert``, ``utilisation``, ``importance``, ``entropy``,
        ``<metric>_<drop|increase>``, ``max_<key>_<drop|increase>`` and ``max_<key>`` (key ``class``
        if present, else ``domain``; None when no group is hurt), ``control_mean`` (mean harm of
        the matched-load control sets), then ``extra`` and other modes.
    """
    sign = -1.0 if higher_is_better else 1.0
    harm = "drop" if higher_is_better else "increase"
    first = tables[modes[0]]
    layer, expert = plan.layer[: plan.n_single], plan.expert
    table: dict[str, list] = {
        "layer": layer.tolist(),
        "expert": expert.tolist(),
        "utilisation": [rounded(v) for v in routing["experts/load"][layer, expert]],
        "importance": [rounded(v) for v in routing["experts/importance"][layer, expert]],
        "entropy": [rounded(v) for v in routing["experts/entropy"][layer, expert]],
        f"{metric}_{harm}": [rounded(v) for v in sign * first[f"ablation/{modes[0]}/delta_{metric}"]],
    }
    key = "class" if "class" in names else "domain"
    by_group = sign * first[f"ablation/{modes[0]}/delta_{metric}_{key}"]  # (A, G)
    worst = np.where(np.isfinite(by_group), by_group, -np.inf).argmax(axis=1)
    table[f"max_{key}_{harm}"] = [rounded(by_group[a, g]) for a, g in enumerate(worst)]
    # When no group is hurt (every change <= 0) there is no group to name.
    table[f"max_{key}"] = [names[key][g] if by_group[a, g] > 0 else None for a, g in enumerate(worst)]
    control = first.get(f"controls/random/{modes[0]}/delta_{metric}")
    if control is not None and len(control):
        table["control_mean"] = [
            rounded(np.mean(sign * control[plan.control_target == a])) if (plan.control_target == a).any() else None
            for a in range(plan.n_single)
        ]
    for name, values in (extra or {}).items():
        table[name] = [rounded(v) for v in values]
    for mode in modes[1:]:
        table[f"{metric}_{harm}_{mode}"] = [rounded(v) for v in sign * tables[mode][f"ablation/{mode}/delta_{metric}"]]
    return table


def format_table(table: dict[str, list]) -> str:
    """Columns of equal length as aligned text (floats with 4 decimals, None as "-")."""
    columns = list(table)
    cells = {c: [_cell(v) for v in table[c]] for c in columns}
    widths = {c: max([len(c), *(len(v) for v in cells[c])]) for c in columns}
    lines = ["  ".join(c.rjust(widths[c]) for c in columns)]
    n_rows = len(next(iter(table.values()))) if table else 0
    lines += ["  ".join(cells[c][row].rjust(widths[c]) for c in columns) for row in range(n_rows)]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def rounded(value: Any, digits: int = 4) -> Optional[float]:
    """``value`` rounded for a summary; None when it is NaN or infinite (JSON has no NaN)."""
    value = float(value)
    return round(value, digits) + 0.0 if math.isfinite(value) else None  # + 0.0: no "-0.0" in tables


def layer_summary(routing: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-layer headline numbers: mean routing entropy, load CV, NMI per key, dead experts, token specialisation."""
    summary: dict[str, Any] = {
        "routing_entropy": [rounded(v) for v in routing["layers/entropy_mean"]],
        "load_cv": [rounded(v) for v in routing["layers/load_cv"]],
        "dead_experts": int(routing["experts/dead"].sum()),
    }
    for name, values in routing.items():
        if name.startswith("specialisation/") and name.endswith("/nmi"):
            summary[f"nmi_{name.split('/')[1]}"] = [rounded(v) for v in values]
    for name in ("consistency", "consistency_shuffled"):
        if f"specialisation/token/{name}" in routing:
            summary[f"token_{name}"] = [rounded(v) for v in routing[f"specialisation/token/{name}"]]
    return summary
