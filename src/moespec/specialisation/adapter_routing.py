"""How well a router over domain adapters does: losses with intervals, gain recovered, accuracy, calibration.

Everything here is pure numpy on per-text quantities, so it can be checked against hand computations:

- a text's loss under a choice of model is its summed next-token NLL; a domain's loss is the
  token-weighted mean ``sum(nll) / sum(tokens)`` over its texts, its perplexity ``exp(loss)``;
- gain recovered (per domain, and over all texts) is ``(L_base - L_router) / (L_base - L_oracle)``:
  1 when the router does as well as always choosing the true domain's adapter, 0 when it does no
  better than no adapter;
- intervals are percentile bootstraps over texts, stratified by domain (each domain's texts
  resampled within the domain) and paired (every router sees the same resampled texts, so the
  ratio in the gain is resampled as a whole);
- expected calibration error: ``sum_b |B_b| / n * |acc(B_b) - conf(B_b)|`` over equal-width
  confidence bins (Naeini et al. 2015; Guo et al. 2017, "On Calibration of Modern Neural
  Networks", eq. 3).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def domain_losses(nll: np.ndarray, tokens: np.ndarray, domain: np.ndarray, n_domains: int) -> np.ndarray:
    """Token-weighted mean loss per domain.

    Parameters
    ----------
    nll : ndarray of shape (n_rows, n_texts)
        Summed NLL of each text under each row's choice of model.
    tokens : ndarray of shape (n_texts,)
    domain : ndarray of shape (n_texts,), int
    n_domains : int

    Returns
    -------
    ndarray of shape (n_rows, n_domains)
        NaN for a domain without tokens.
    """
    member = np.zeros((len(domain), n_domains))
    member[np.arange(len(domain)), domain] = 1.0
    token_sums = tokens @ member  # (D,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(token_sums > 0, (np.atleast_2d(nll) @ member) / token_sums, np.nan)


def gain_recovered(loss: np.ndarray, base: np.ndarray, oracle: np.ndarray) -> np.ndarray:
    """``(base - loss) / (base - oracle)``, elementwise (NaN where base equals oracle)."""
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(base != oracle, (base - loss) / (base - oracle), np.nan)


@dataclass
class RouterLosses:
    """Losses and gains of several routers on the same texts, with bootstrap intervals.

    Attributes
    ----------
    domain_loss, domain_loss_low, domain_loss_high : ndarray of shape (n_rows, n_domains)
    loss, loss_low, loss_high : ndarray of shape (n_rows,)
        Over all texts (token-weighted).
    domain_gain, domain_gain_low, domain_gain_high : ndarray of shape (n_rows, n_domains)
    gain, gain_low, gain_high : ndarray of shape (n_rows,)
    domain_delta, domain_delta_low, domain_delta_high : ndarray of shape (n_rows, n_domains)
        Loss minus the base row's loss on the same texts (paired: its interval is the difference's).
    """

    domain_loss: np.ndarray
    domain_loss_low: np.ndarray
    domain_loss_high: np.ndarray
    loss: np.ndarray
    loss_low: np.ndarray
    loss_high: np.ndarray
    domain_gain: np.ndarray
    domain_gain_low: np.ndarray
    domain_gain_high: np.ndarray
    gain: np.ndarray
    gain_low: np.ndarray
    gain_high: np.ndarray
    domain_delta: np.ndarray
    domain_delta_low: np.ndarray
    domain_delta_high: np.ndarray


def router_losses(
    nll: np.ndarray,
    tokens: np.ndarray,
    domain: np.ndarray,
    n_domains: int,
    base_row: int,
    oracle_row: int,
    *,
    rng: np.random.Generator,
    n_resamples: int = 1000,
    confidence: float = 0.95,
) -> RouterLosses:
    """Per-domain and overall losses and gains of each row of ``nll``, with paired, stratified bootstraps.

    Parameters
    ----------
    nll : ndarray of shape (n_rows, n_texts)
        Summed NLL of each text under each router's choice.
    tokens : ndarray of shape (n_texts,)
    domain : ndarray of shape (n_texts,), int
    n_domains : int
    base_row, oracle_row : int
        The rows of the no-adapter and the oracle router (the two ends of the gain).
    rng : numpy.random.Generator
    n_resamples : int
        0 gives NaN intervals.
    confidence : float
    """
    nll, tokens = np.atleast_2d(np.asarray(nll, np.float64)), np.asarray(tokens, np.float64)
    domain = np.asarray(domain, np.int64)
    nll_sums, token_sums = _resampled_sums(nll, tokens, domain, n_domains, rng, n_resamples)  # (B, R, D), (B, D)
    point_loss = domain_losses(nll, tokens, domain, n_domains)
    point_all = nll.sum(axis=1) / tokens.sum()
    with np.errstate(invalid="ignore", divide="ignore"):
        boot_loss = nll_sums / token_sums[:, None, :]
        boot_all = nll_sums.sum(axis=2) / token_sums.sum(axis=1)[:, None]  # (B, R)
    tail = (1.0 - confidence) / 2 * 100

    def interval(samples: np.ndarray, shape: tuple) -> tuple[np.ndarray, np.ndarray]:
        if samples.shape[0] == 0:
            return np.full(shape, np.nan), np.full(shape, np.nan)
        with np.errstate(invalid="ignore"):
            low, high = np.nanpercentile(samples, [tail, 100 - tail], axis=0)
        return low, high

    def gains(losses: np.ndarray, rows_axis: int) -> np.ndarray:
        base = np.take(losses, [base_row], axis=rows_axis)
        return gain_recovered(losses, base, np.take(losses, [oracle_row], axis=rows_axis))

    return RouterLosses(
        point_loss,
        *interval(boot_loss, point_loss.shape),
        point_all,
        *interval(boot_all, point_all.shape),
        gains(point_loss, -2),
        *interval(gains(boot_loss, -2), point_loss.shape),
        gains(point_all, -1),
        *interval(gains(boot_all, -1), point_all.shape),
        point_loss - point_loss[base_row],
        *interval(boot_loss - boot_loss[:, base_row : base_row + 1], point_loss.shape),
    )


def _resampled_sums(
    nll: np.ndarray, tokens: np.ndarray, domain: np.ndarray, n_domains: int, rng: np.random.Generator, n_resamples: int
) -> tuple[np.ndarray, np.ndarray]:
    """Summed NLL (B, R, D) and tokens (B, D) of each stratified resample of the texts."""
    nll_sums = np.zeros((n_resamples, nll.shape[0], n_domains))
    token_sums = np.zeros((n_resamples, n_domains))
    for group in range(n_domains):
        members = np.flatnonzero(domain == group)
        if members.size == 0 or n_resamples == 0:
            continue
        # A multinomial draw of counts is a resample with replacement of the group's texts.
        counts = rng.multinomial(members.size, np.full(members.size, 1.0 / members.size), size=n_resamples)
        nll_sums[:, :, group] = counts @ nll[:, members].T
        token_sums[:, group] = counts @ tokens[members]
    return nll_sums, token_sums


def confusion_counts(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """Counts of (true, predicted) pairs, ndarray of shape (n_classes, n_classes), int64 (rows: true)."""
    counts = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(counts, (np.asarray(true, np.int64), np.asarray(predicted, np.int64)), 1)
    return counts


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, n_bins: int = 15) -> float:
    """ECE over ``n_bins`` equal-width bins of (0, 1] (Guo et al. 2017, eq. 3).

    Parameters
    ----------
    confidence : ndarray of shape (n,)
        Probability the router gave its choice.
    correct : ndarray of shape (n,), bool
        Whether the choice was right.
    n_bins : int
    """
    confidence = np.asarray(confidence, np.float64)
    correct = np.asarray(correct, np.float64)
    if confidence.size == 0:
        return float("nan")
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)  # bin b holds (b/n, (b+1)/n]
    total = 0.0
    for b in np.unique(bins):
        inside = bins == b
        total += inside.sum() / confidence.size * abs(correct[inside].mean() - confidence[inside].mean())
    return float(total)
