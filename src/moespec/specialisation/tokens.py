"""Token-level specialisation of an MoE language model's experts (pure numpy).

Do experts follow tokens or domains? OpenMoE (Xue et al. 2024, arXiv 2402.01739, §4) found routing
"predominantly based on token IDs"; the Mixtral paper (Jiang et al. 2024, §5) saw no topic pattern.
Neither separates the two: a domain's texts use their own words, so an expert that follows token
ids also looks domain-specific. This module measures, per MoE layer, on held-out tokens:

- ``I(E; V)`` and ``I(E; D)``, and their NMI: mutual information of the top-1 expert E with the
  token id V and with the text's domain D (nats; NMI with the arithmetic mean of the entropies,
  as ``sklearn.metrics.normalized_mutual_info_score``);
- ``I(E; D | V) = H(E, V) + H(D, V) - H(E, D, V) - H(V)``: what the domain says about the expert
  beyond the token id (Cover & Thomas 2006, eq. 2.60), next to its *shuffled-domain null*: the same
  quantity after permuting domains among the occurrences of each token id, which keeps P(D | V)
  and P(E | V) and breaks any E–D link given V. The plug-in estimate is biased upwards for rare
  tokens; the null carries the same bias, so the excess over the null is the evidence;
- vocabulary specialisation (OLMoE, Muennighoff et al. 2024, ``scripts/run_moe_analysis.py``):
  for token ids seen at least ``min_count`` times, the share of their occurrences routed to their
  most frequent top-1 expert, beside the same after permuting experts across occurrences;
- the co-activation matrix ``P(j selected | i selected)`` over the top-k sets (every pair of the
  set, not OLMoE's rank-adjacent pairs);
- router saturation (OLMoE §5): the top-k overlap ``|S_ckpt ∩ S_final| / k`` of an earlier
  checkpoint's routing with the final model's on the same tokens.

Counts go through ``numpy.bincount`` on joint codes, never a one-hot matrix, so a vocabulary of
tens of thousands of ids costs O(n) memory.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _codes(values: np.ndarray) -> np.ndarray:
    """Dense codes 0..m-1 of the distinct values."""
    return np.unique(np.asarray(values), return_inverse=True)[1].reshape(-1).astype(np.int64)


def joint_entropy(*variables: np.ndarray) -> float:
    """Plug-in entropy (nats) of the joint distribution of several discrete variables of equal length."""
    joint = np.zeros(len(variables[0]), dtype=np.int64)
    for values in variables:
        codes = _codes(values)
        joint = joint * (int(codes.max()) + 1 if codes.size else 1) + codes
        joint = _codes(joint)  # keep the combined code small
    counts = np.bincount(joint).astype(np.float64)
    p = counts[counts > 0] / len(joint)
    return float(-(p * np.log(p)).sum())


def mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """``I(A; B) = H(A) + H(B) - H(A, B)`` in nats (plug-in; equals ``sklearn.metrics.mutual_info_score``)."""
    return max(0.0, joint_entropy(a) + joint_entropy(b) - joint_entropy(a, b))


def normalized_mutual_information(a: np.ndarray, b: np.ndarray) -> float:
    """``I / ((H(A) + H(B)) / 2)``, sklearn's default NMI (1 when both are constant, 0 when one is)."""
    h_a, h_b = joint_entropy(a), joint_entropy(b)
    if h_a == 0 and h_b == 0:
        return 1.0
    if h_a == 0 or h_b == 0:
        return 0.0
    return mutual_information(a, b) / ((h_a + h_b) / 2)


def conditional_mutual_information(a: np.ndarray, b: np.ndarray, given: np.ndarray) -> float:
    """``I(A; B | C) = H(A, C) + H(B, C) - H(A, B, C) - H(C)`` in nats (plug-in)."""
    value = joint_entropy(a, given) + joint_entropy(b, given) - joint_entropy(a, b, given) - joint_entropy(given)
    return max(0.0, value)


def shuffle_within_groups(values: np.ndarray, groups: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``values`` permuted among the rows of each group (each group keeps its multiset of values)."""
    by_group = np.argsort(groups, kind="stable")
    shuffled = np.lexsort((rng.random(len(groups)), groups))  # same group blocks, random order inside
    out = np.empty_like(values)
    out[by_group] = values[shuffled]
    return out


def vocabulary_specialisation(top1: np.ndarray, token_id: np.ndarray, min_count: int) -> tuple[float, int]:
    """Share of the occurrences of frequent token ids routed to their id's most frequent top-1 expert.

    Parameters
    ----------
    top1, token_id : ndarray of shape (n,), int
    min_count : int
        Only token ids seen at least this often count (a token seen once is trivially consistent).

    Returns
    -------
    share : float
        Mean over the counted token ids of ``max_e N[v, e] / N_v`` (NaN when none qualifies).
    n_token_ids : int
    """
    tokens = _codes(token_id)
    n_experts = int(np.max(top1)) + 1 if len(top1) else 1
    table = np.bincount(
        tokens * n_experts + np.asarray(top1, dtype=np.int64),
        minlength=(int(tokens.max()) + 1 if tokens.size else 0) * n_experts,
    )
    table = table.reshape(-1, n_experts)
    counts = table.sum(axis=1)
    kept = counts >= min_count
    if not kept.any():
        return float("nan"), 0
    return float(np.mean(table[kept].max(axis=1) / counts[kept])), int(kept.sum())


def coactivation(expert_index: np.ndarray, n_experts: int) -> np.ndarray:
    """``P(j selected | i selected)`` over tokens' top-k sets.

    Parameters
    ----------
    expert_index : ndarray of shape (n, k), int
    n_experts : int

    Returns
    -------
    ndarray of shape (n_experts, n_experts), float64
        Row ``i``: among tokens that selected ``i``, the share that also selected ``j`` (diagonal 0;
        NaN rows for experts never selected).
    """
    selected = np.zeros((len(expert_index), n_experts), dtype=np.float64)
    np.put_along_axis(selected, np.asarray(expert_index, dtype=np.int64), 1.0, axis=1)
    together = selected.T @ selected  # (E, E), diagonal = count(i)
    counts = np.diag(together).copy()
    np.fill_diagonal(together, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts[:, None] > 0, together / np.maximum(counts[:, None], 1.0), np.nan)


def router_saturation(expert_index: np.ndarray, final_index: np.ndarray) -> float:
    """Mean top-k overlap ``|S ∩ S_final| / k`` of two routings of the same tokens.

    Parameters
    ----------
    expert_index, final_index : ndarray of shape (n, k), int
    """
    a, b = np.asarray(expert_index), np.asarray(final_index)
    shared = (a[:, :, None] == b[:, None, :]).any(axis=2).sum(axis=1)
    return float(shared.mean() / a.shape[1]) if len(a) else float("nan")


def domain_expert_share(expert_index: np.ndarray, domain: np.ndarray, n_domains: int, n_experts: int) -> np.ndarray:
    """Share of each domain's routed slots that go to each expert: (n_domains, n_experts), rows sum to 1."""
    k = expert_index.shape[1]
    table = (
        np.bincount(
            np.repeat(np.asarray(domain, dtype=np.int64), k) * n_experts + expert_index.reshape(-1),
            minlength=n_domains * n_experts,
        )
        .reshape(n_domains, n_experts)
        .astype(np.float64)
    )
    totals = table.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, table / np.maximum(totals, 1.0), np.nan)


@dataclass(frozen=True)
class LayerSpecialisation:
    """Token-level specialisation of one MoE layer (see the module docstring; information in nats).

    Attributes
    ----------
    mi_token, nmi_token : float
        Top-1 expert vs token id.
    mi_domain, nmi_domain : float
        Top-1 expert vs domain.
    cmi_domain_given_token : float
        ``I(E; D | V)``.
    cmi_null_mean, cmi_null_std : float
        The same under the shuffled-domain null.
    cmi_p_value : float
        ``(1 + #{null >= observed}) / (1 + n_shuffles)``.
    vocab_specialisation, vocab_specialisation_null : float
        Vocabulary specialisation, and its mean after permuting top-1 experts across occurrences.
    n_token_ids : int
        Token ids with at least ``min_count`` occurrences.
    """

    mi_token: float
    nmi_token: float
    mi_domain: float
    nmi_domain: float
    cmi_domain_given_token: float
    cmi_null_mean: float
    cmi_null_std: float
    cmi_p_value: float
    vocab_specialisation: float
    vocab_specialisation_null: float
    n_token_ids: int


def layer_specialisation(
    top1: np.ndarray,
    token_id: np.ndarray,
    domain: np.ndarray,
    *,
    n_shuffles: int,
    min_count: int,
    rng: np.random.Generator,
) -> LayerSpecialisation:
    """Every token-level measure of one layer from the top-1 expert, token id and domain of n tokens.

    Parameters
    ----------
    top1, token_id, domain : ndarray of shape (n,), int
    n_shuffles : int
        Permutations of the shuffled-domain null (and of the vocabulary-specialisation null).
    min_count : int
    rng : numpy Generator
    """
    top1, token_id, domain = (np.asarray(v, dtype=np.int64) for v in (top1, token_id, domain))
    cmi = conditional_mutual_information(top1, domain, token_id)
    null = np.array(
        [
            conditional_mutual_information(top1, shuffle_within_groups(domain, token_id, rng), token_id)
            for _ in range(n_shuffles)
        ]
    )
    vocab, n_ids = vocabulary_specialisation(top1, token_id, min_count)
    vocab_null = np.mean(
        [
            vocabulary_specialisation(rng.permutation(top1), token_id, min_count)[0]
            for _ in range(max(1, n_shuffles // 4))
        ]
    )
    return LayerSpecialisation(
        mi_token=mutual_information(top1, token_id),
        nmi_token=normalized_mutual_information(top1, token_id),
        mi_domain=mutual_information(top1, domain),
        nmi_domain=normalized_mutual_information(top1, domain),
        cmi_domain_given_token=cmi,
        cmi_null_mean=float(null.mean()) if n_shuffles else float("nan"),
        cmi_null_std=float(null.std()) if n_shuffles else float("nan"),
        cmi_p_value=float((1 + (null >= cmi).sum()) / (1 + n_shuffles)),
        vocab_specialisation=vocab,
        vocab_specialisation_null=float(vocab_null),
        n_token_ids=n_ids,
    )
