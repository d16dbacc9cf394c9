"""Expert-specialisation metrics computed from measured routing: pure numpy functions.

Notation (docs/moe.md, "Specialisation metrics"): ``n`` routed inputs (samples or tokens), ``E`` experts,
``k`` experts selected per input, router probabilities ``p`` (n, E), the selected set as a boolean
matrix ``selected`` (n, E) with ``k`` True per row, and a grouping of the inputs (class, domain,
stratum or token id) as integer codes ``groups`` (n,).

Every function takes arrays and returns arrays or floats; nothing reads files or keeps state.
Randomness (bootstrap, random control sets) comes from an explicit ``numpy.random.Generator``.
Entropies and mutual information are in nats.
"""

from __future__ import annotations

import math

import numpy as np

#: Quantile levels reported for the per-input routing entropy distribution.
ENTROPY_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
#: Up to this many experts, matched-load control sets are chosen among all subsets (2^(E-1) of them).
MAX_ENUMERATED_EXPERTS = 16


# --------------------------------------------------------------------------------------------------
# load, importance, balance


def expert_load(selected: np.ndarray) -> np.ndarray:
    """Share of routed slots each expert receives, ``L_e = (1 / kn) sum_t 1[e in S_t]``.

    Parameters
    ----------
    selected : ndarray of shape (n, n_experts), bool
        The experts chosen for each input (k per row).

    Returns
    -------
    ndarray of shape (n_experts,)
        Sums to 1 (NaN for an empty input).
    """
    counts = np.asarray(selected, dtype=np.float64).sum(axis=0)
    total = counts.sum()
    return counts / total if total > 0 else np.full(counts.shape, np.nan)


def expert_importance(router_probs: np.ndarray) -> np.ndarray:
    """Mean router probability of each expert, ``I_e = (1/n) sum_t p_{t,e}`` (soft load).

    Parameters
    ----------
    router_probs : ndarray of shape (n, n_experts)

    Returns
    -------
    ndarray of shape (n_experts,)
    """
    return np.asarray(router_probs, dtype=np.float64).mean(axis=0)


def coefficient_of_variation(values: np.ndarray) -> float:
    """``std / mean`` (population std): 0 for a perfectly balanced load."""
    values = np.asarray(values, dtype=np.float64)
    mean = values.mean()
    return float(values.std() / mean) if mean > 0 else float("nan")


# dead experts and collapse: the one definition used by the train and ablate stages

#: An expert is dead when its load is below this fraction of the balanced share ``1 / E``.
DEAD_THRESHOLD = 0.1
#: Routing has collapsed when one expert takes more than this share of the rows.
MAX_SHARE = 0.9


def dead_expert_mask(load, dead_threshold: float = DEAD_THRESHOLD):
    """Experts whose share of the traffic is below ``dead_threshold / E`` (that fraction of the balanced share).

    Parameters
    ----------
    load : array_like of shape (..., n_experts)
        Fraction of the rows (or tokens) each expert receives; rows sum to 1 (top-1) or k (top-k) and
        are normalised to shares here, so the balanced share is ``1 / E`` either way.
    dead_threshold : float in (0, 1)

    Returns
    -------
    ndarray of bool, shape (..., n_experts)
    """
    share = _shares(load)
    return share < dead_threshold / share.shape[-1]


def _shares(load) -> np.ndarray:
    load = np.asarray(load, dtype=np.float64)
    total = load.sum(axis=-1, keepdims=True)
    return np.divide(load, total, out=np.zeros_like(load), where=total > 0)


def collapse_report(
    load, dead_threshold: float = DEAD_THRESHOLD, max_share: float = MAX_SHARE
) -> tuple[bool, list[str]]:
    """Whether routing has collapsed, and why: a dead expert, or one expert above ``max_share``.

    Both count: an MoE whose 7 experts carry loads 0, 0, 0.002, 0.18, 0.21, 0.29, 0.31 uses 4 experts
    even though no expert holds most of the traffic.

    Parameters
    ----------
    load : array_like of shape (n_experts,) or (n_layers, n_experts)
        Fraction of the rows each expert receives, per MoE layer (normalised to shares as in
        :func:`dead_expert_mask`).
    dead_threshold : float in (0, 1)
        An expert is dead below ``dead_threshold / E`` (:func:`dead_expert_mask`).
    max_share : float in (0, 1]
        Largest share one expert may hold.

    Returns
    -------
    collapsed : bool
    reasons : list of str
        One line per layer that collapsed (empty when none did), e.g.
        ``"layer 0: experts [0, 3] dead (load < 0.0143)"``.
    """
    load = np.atleast_2d(_shares(load))
    if not 0.0 < dead_threshold < 1.0 or not 0.0 < max_share <= 1.0:
        raise ValueError(f"need 0 < dead_threshold < 1 and 0 < max_share <= 1, got {dead_threshold}, {max_share}")
    dead = dead_expert_mask(load, dead_threshold)
    reasons = []
    for layer, (row, dead_row) in enumerate(zip(load, dead)):
        problems = []
        if dead_row.any():
            problems.append(
                f"experts {np.flatnonzero(dead_row).tolist()} dead (load < {dead_threshold / load.shape[-1]:.4g})"
            )
        if row.max() > max_share:
            problems.append(f"expert {int(row.argmax())} takes {row.max():.1%} of the rows (> {max_share:.0%})")
        if problems:
            reasons.append(f"layer {layer}: " + "; ".join(problems))
    return bool(reasons), reasons


def entropy(probs: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy ``-sum p log p`` along ``axis`` (0 log 0 = 0), in nats."""
    probs = np.asarray(probs, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1.0)), 0.0)
    return -terms.sum(axis=axis)


def routing_entropy(router_probs: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Per-input routing entropy, divided by ``log E`` when ``normalize`` (1 = uniform, 0 = one-hot).

    Parameters
    ----------
    router_probs : ndarray of shape (..., n_experts)

    Returns
    -------
    ndarray of shape (...)
    """
    values = entropy(router_probs)
    n_experts = np.shape(router_probs)[-1]
    return values / math.log(n_experts) if normalize and n_experts > 1 else values


def entropy_distribution(normalized_entropy: np.ndarray, n_bins: int = 20) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Histogram on [0, 1] and quantiles (:data:`ENTROPY_QUANTILES`) of normalised entropies.

    Returns
    -------
    counts : ndarray of shape (n_bins,), int64
    edges : ndarray of shape (n_bins + 1,)
    quantiles : ndarray of shape (len(ENTROPY_QUANTILES),)
    """
    values = np.clip(np.asarray(normalized_entropy, dtype=np.float64), 0.0, 1.0)
    counts, edges = np.histogram(values, bins=n_bins, range=(0.0, 1.0))
    quantiles = np.quantile(values, ENTROPY_QUANTILES) if values.size else np.full(len(ENTROPY_QUANTILES), np.nan)
    return counts.astype(np.int64), edges, quantiles


def router_information(router_probs: np.ndarray) -> float:
    """Information the router extracts from its input, ``I(X; E) = H(mean_t p_t) - mean_t H(p_t)`` (nats)."""
    probs = np.asarray(router_probs, dtype=np.float64)
    return float(entropy(probs.mean(axis=0)) - entropy(probs).mean())


def mean_entropy_by_expert(normalized_entropy: np.ndarray, selected: np.ndarray) -> np.ndarray:
    """Mean routing entropy of the inputs routed to expert ``e`` in any of their k slots.

    Every expert with traffic gets a value (NaN only for an expert no input is routed to); with
    top-1 routing this is the mean over the inputs whose choice is ``e``.

    Parameters
    ----------
    normalized_entropy : ndarray of shape (n,)
    selected : ndarray of shape (n, n_experts), bool
        The experts each input is routed to.

    Returns
    -------
    ndarray of shape (n_experts,)
    """
    weights = selected.astype(np.float64)
    sums = normalized_entropy.astype(np.float64) @ weights
    counts = weights.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


# --------------------------------------------------------------------------------------------------
# contingency tables and mutual information


def contingency_table(groups: np.ndarray, selected: np.ndarray, n_groups: int) -> np.ndarray:
    """Counts ``N[g, e]`` of routed slots of group ``g`` that went to expert ``e``.

    Parameters
    ----------
    groups : ndarray of shape (n,), int
        Group code of each input in ``[0, n_groups)``.
    selected : ndarray of shape (n, n_experts), bool
        Selected experts (k per row: each input contributes k slots); pass a one-hot of the top-1
        expert for a top-1 table.
    n_groups : int

    Returns
    -------
    ndarray of shape (n_groups, n_experts), int64
    """
    groups = np.asarray(groups, dtype=np.int64)
    one_hot = np.zeros((len(groups), n_groups), dtype=np.int64)
    one_hot[np.arange(len(groups)), groups] = 1
    return one_hot.T @ np.asarray(selected, dtype=np.int64)


def one_hot(index: np.ndarray, n_classes: int) -> np.ndarray:
    """Boolean one-hot rows: ``index`` (n,) -> (n, n_classes)."""
    rows = np.zeros((len(index), n_classes), dtype=bool)
    rows[np.arange(len(index)), np.asarray(index, dtype=np.int64)] = True
    return rows


def mutual_information(table: np.ndarray) -> float:
    """Mutual information (nats) between the row and column variables of a contingency table.

    ``I(Y; E) = sum_{y,e} P(y,e) log(P(y,e) / (P(y) P(e)))``; equals
    ``sklearn.metrics.mutual_info_score(contingency=table)``.
    """
    joint = np.asarray(table, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return float("nan")
    joint = joint / total
    outer = joint.sum(axis=1, keepdims=True) * joint.sum(axis=0, keepdims=True)
    nonzero = joint > 0
    return float(max(0.0, np.sum(joint[nonzero] * np.log(joint[nonzero] / outer[nonzero]))))


def normalized_mutual_information(table: np.ndarray) -> float:
    """NMI with the arithmetic-mean normalisation, ``I / ((H(Y) + H(E)) / 2)``.

    Equals ``sklearn.metrics.normalized_mutual_info_score`` on the labels the table counts
    (its default ``average_method="arithmetic"``); 1.0 when both variables are constant (sklearn's
    convention), 0.0 when only one is.
    """
    joint = np.asarray(table, dtype=np.float64)
    total = joint.sum()
    if total <= 0:
        return float("nan")
    h_rows, h_cols = entropy(joint.sum(axis=1) / total), entropy(joint.sum(axis=0) / total)
    if h_rows == 0 and h_cols == 0:
        return 1.0
    if h_rows == 0 or h_cols == 0:
        return 0.0
    return float(mutual_information(joint) / ((h_rows + h_cols) / 2))


def specialisation_share(table: np.ndarray) -> np.ndarray:
    """``S[g, e] = N[g, e] / (k N_g)``: the share of group ``g``'s routed slots that go to ``e``.

    Rows sum to 1 (NaN for a group without inputs).
    """
    table = np.asarray(table, dtype=np.float64)
    totals = table.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, table / np.where(totals > 0, totals, 1.0), np.nan)


def lift_over_uniform(share: np.ndarray) -> np.ndarray:
    """``S[g, e] * E``: how many times more than the uniform share ``1/E`` group g sends to e."""
    share = np.asarray(share, dtype=np.float64)
    return share * share.shape[-1]


def lift_over_load(share: np.ndarray, load: np.ndarray) -> np.ndarray:
    """``S[g, e] / L_e``: group g's share of expert e against e's overall load (1 = no preference)."""
    load = np.asarray(load, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(load > 0, np.asarray(share, dtype=np.float64) / np.where(load > 0, load, 1.0), np.nan)


# --------------------------------------------------------------------------------------------------
# tokens


def token_consistency(
    token_ids: np.ndarray, top1: np.ndarray, n_experts: int, min_count: int = 1
) -> tuple[float, float, int]:
    """How often a token goes to its most frequent top-1 expert (OLMoE's vocabulary specialisation).

    For each token id ``v`` seen at least ``min_count`` times, ``c_v = max_e N[v, e] / N_v``
    (Muennighoff et al. 2024, ``allenai/OLMoE:scripts/run_moe_analysis.py``). A token seen once is
    trivially consistent, hence ``min_count``.

    Parameters
    ----------
    token_ids : ndarray of shape (n,), int
    top1 : ndarray of shape (n,), int
        Top-1 expert of each token occurrence.
    n_experts : int
    min_count : int

    Returns
    -------
    vocab_mean : float
        Mean of ``c_v`` over the counted token ids (NaN when none qualifies).
    occurrence_mean : float
        The same weighted by ``N_v`` (share of counted occurrences routed to their token's usual expert).
    n_token_ids : int
        Token ids counted.
    """
    _, codes = np.unique(np.asarray(token_ids), return_inverse=True)
    codes = codes.reshape(-1)
    table = contingency_table(codes, one_hot(top1, n_experts), int(codes.max()) + 1 if codes.size else 0)
    counts = table.sum(axis=1)
    kept = counts >= min_count
    if not kept.any():
        return float("nan"), float("nan"), 0
    best = table[kept].max(axis=1)
    return float(np.mean(best / counts[kept])), float(best.sum() / counts[kept].sum()), int(kept.sum())


def consecutive_repetition(top1: np.ndarray, sequence: np.ndarray) -> float:
    """P(top-1 of token t+1 = top-1 of token t) within sequences (Mixtral paper section 5; random: 1/E).

    Parameters
    ----------
    top1 : ndarray of shape (n,), int
        Tokens in sequence order.
    sequence : ndarray of shape (n,), int
        Sequence (text) of each token; pairs across two sequences are not counted.
    """
    same_sequence = sequence[1:] == sequence[:-1]
    if not same_sequence.any():
        return float("nan")
    return float(np.mean(top1[1:][same_sequence] == top1[:-1][same_sequence]))


# --------------------------------------------------------------------------------------------------
# grouped means and the bootstrap


def group_means(values: np.ndarray, groups: np.ndarray, n_groups: int, weights: np.ndarray | None = None) -> np.ndarray:
    """Weighted mean of ``values`` within each group, ``sum_i w_i v_i / sum_i w_i``.

    Parameters
    ----------
    values : ndarray of shape (..., n)
    groups : ndarray of shape (n,), int
    n_groups : int
    weights : ndarray of shape (n,), optional
        Per-input weights (e.g. token counts when ``values`` are per-text loss sums divided by
        them: pass ``values = sums / weights`` and the weighted mean is the per-token mean).

    Returns
    -------
    ndarray of shape (..., n_groups)
        NaN for an empty group.
    """
    values = np.asarray(values, dtype=np.float64)
    weights = np.ones(values.shape[-1]) if weights is None else np.asarray(weights, dtype=np.float64)
    member = np.zeros((values.shape[-1], n_groups))
    member[np.arange(values.shape[-1]), np.asarray(groups, dtype=np.int64)] = 1.0
    member *= weights[:, None]
    totals = member.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, (values @ member) / np.where(totals > 0, totals, 1.0), np.nan)


def bootstrap_group_means(
    values: np.ndarray,
    groups: np.ndarray,
    n_groups: int,
    *,
    rng: np.random.Generator,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group means of per-input values with percentile bootstrap intervals over inputs.

    The bootstrap is stratified: each group's inputs are resampled with replacement within the
    group, so no resample leaves a group empty. Rows of ``values`` (e.g. one per ablation) share
    the resampled inputs, so a paired difference ``ablated - baseline`` passed as ``values`` gets a
    paired interval.

    Parameters
    ----------
    values : ndarray of shape (n_rows, n)
    groups : ndarray of shape (n,), int
    n_groups : int
    rng : numpy.random.Generator
    n_resamples : int
    confidence : float
        Central coverage of the interval.
    weights : ndarray of shape (n,), optional
        As in :func:`group_means` (a ratio estimator is resampled).

    Returns
    -------
    point, low, high : ndarray of shape (n_rows, n_groups)
        The group means and the interval bounds (NaN for empty groups, or when ``n_resamples`` is 0).
    """
    values = np.atleast_2d(np.asarray(values, dtype=np.float64))
    groups = np.asarray(groups, dtype=np.int64)
    weights = np.ones(values.shape[-1]) if weights is None else np.asarray(weights, dtype=np.float64)
    point = group_means(values, groups, n_groups, weights)
    low = np.full(point.shape, np.nan)
    high = np.full(point.shape, np.nan)
    if n_resamples <= 0:
        return point, low, high
    tail = (1.0 - confidence) / 2 * 100
    for group in range(n_groups):
        members = np.flatnonzero(groups == group)
        if members.size == 0:
            continue
        # Resample counts (n_resamples, n_g): a multinomial draw is a resample with replacement.
        counts = rng.multinomial(members.size, np.full(members.size, 1.0 / members.size), size=n_resamples)
        resample_weights = counts * weights[members]  # (R, n_g)
        totals = resample_weights.sum(axis=1)  # (R,)
        with np.errstate(invalid="ignore", divide="ignore"):
            means = (resample_weights @ values[:, members].T) / totals[:, None]  # (R, n_rows)
        low[:, group], high[:, group] = np.nanpercentile(means, [tail, 100 - tail], axis=0)
    return point, low, high


# --------------------------------------------------------------------------------------------------
# controls


def matched_load_sets(
    load: np.ndarray, target: int, n_sets: int, rng: np.random.Generator, tolerance: float = 0.25
) -> np.ndarray:
    """Random expert sets, excluding ``target``, whose total load matches the target's.

    The candidates are the non-empty subsets of the other experts whose summed load is within
    ``tolerance * load[target]`` of ``load[target]`` (or, when none is, those nearest to it);
    ``n_sets`` of them are drawn uniformly with replacement. Ablating such a set removes as much
    routed traffic as ablating the target, from experts chosen at random: the control for "is this
    expert special, or would any equal amount of capacity matter as much?". With more than
    :data:`MAX_ENUMERATED_EXPERTS` experts, candidates are prefixes of random permutations instead.

    Parameters
    ----------
    load : ndarray of shape (n_experts,)
    target : int
    n_sets : int
    rng : numpy.random.Generator
    tolerance : float

    Returns
    -------
    ndarray of shape (n_sets, n_experts), bool
        All-False rows when there is no other expert.
    """
    load = np.asarray(load, dtype=np.float64)
    others = np.array([e for e in range(len(load)) if e != target], dtype=np.int64)
    sets = np.zeros((n_sets, len(load)), dtype=bool)
    if others.size == 0 or n_sets == 0:
        return sets
    if others.size <= MAX_ENUMERATED_EXPERTS:
        codes = np.arange(1, 2**others.size)  # every non-empty subset of the others, as bit masks
        members = (codes[:, None] >> np.arange(others.size)) & 1  # (n_subsets, n_others)
    else:
        prefix = np.arange(others.size)[None, :] <= np.arange(others.size)[:, None]  # (n_others, n_others)
        members = np.concatenate([prefix[:, np.argsort(rng.permutation(others.size))] for _ in range(4 * n_sets)])
    distance = np.abs(members @ load[others] - load[target])
    candidates = np.flatnonzero(distance <= max(tolerance * load[target], distance.min()))
    chosen = members[rng.choice(candidates, size=n_sets, replace=True)].astype(bool)
    sets[:, others] = chosen
    return sets
