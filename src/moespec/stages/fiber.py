"""The fiber stage: the manifold / fiber-bundle test, its null calibration, and strata.

The test is Robinson, Dey & Chiang's (arXiv:2504.01002; :mod:`moespec.geometry.fiber_bundle`): per
tested point, a sliding Welch t-test on the slopes of log(neighbour count) against log(radius).
Every rejection rate is written beside the rate of the same test on null data matched to the input
(same N and dimension; a Gaussian with the input's covariance, or a smoothed resample): on smooth
data the test rejects a few percent of points by itself (3-4 % on the paper's parameters), so only a
rate well above the null rate says something about the data.

Strata are k-means or Gaussian-mixture clusters of the same points (Li & Sarwate's protocol), with
their scores, per-stratum intrinsic dimension and the test's rejection rate per stratum.

Output (``n`` = tested points, ``S`` = ``max_strata``):

=================================  ===================  =======================================
dataset                            shape                meaning
=================================  ===================  =======================================
points/index                       (n,) int64           row of each tested point in the input
points/<array>                     (n,) or (n, S[+1])   every array of ``FiberBundleResult``
rates/overall/<rate>               ()                   rejection_rate, fiber_rejection_rate,
                                                        fiber_small_..., fiber_large_... over
                                                        testable points
rates/all_points/<rate>            ()                   the same over all tested points (an
                                                        untestable point is not rejected)
null/<rate>                        (n_repeats,)         the rates (testable points) on matched
                                                        null data, one per repeat
null/n_testable                    (n_repeats,) int64   testable points of each null repeat
null_test/<rate>/t, /pvalue        ()                   prediction t-test of the observed rate
                                                        against the repeats (one-sided, R - 1 df)
null_test/<rate>/fisher_pvalue     ()                   Fisher's exact test against the pooled
                                                        null counts (points taken as independent)
rates/per_domain/<rate>            (n_domains,)         rates among tested points of each domain
rates/per_stratum/<rate>           (n_strata,)          rates among tested points of each stratum
local_dimension/levels             (q,)                 quantile levels
local_dimension/small, /large      (q,)                 quantiles of the first / second segment slope
strata/labels                      (N,) int64           stratum of every input row
strata/<score>                     ()                   silhouette, davies_bouldin, calinski_harabasz
strata/candidate_k, /candidate_score  (n_k,)            selection criterion per candidate k
strata/dimension/<estimator>       (n_strata,)          pca_count, twonn, mle_levina_bickel
strata/n_points                    (n_strata,) int64
strata/domain_table                (n_domains, n_strata) int64   rows of each domain in each stratum
domain, domain_names               (N,), (n_domains,)   carried from the input
=================================  ===================  =======================================

Per-domain and per-stratum rates should be read against the overall null rate (the null data carry
no domains or strata). Summary: ``n_tested``, ``n_testable``, the four rates (over testable points),
``<rate>_all_points``, their ``null_<rate>`` means and ``null_<rate>_std`` spreads over repeats,
``<rate>_null_pvalue`` and ``<rate>_null_fisher_pvalue``, ``dimension_small_median``,
``dimension_large_median``, ``n_strata``, ``silhouette``, and, when the input is ``reduce``, its
``variance_retained`` and ``id_*`` estimates.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moespec.artifacts import ArtifactReader, ArtifactWriter, DatasetSpec
from moespec.errors import ConfigError, DataError
from moespec.geometry.params import IntrinsicDimensionConfig, nest_legacy_id_keys
from moespec.stages.base import StageConfig

NAME = "fiber"
SCHEMA_VERSION = 2

RATES = ("rejection_rate", "fiber_rejection_rate", "fiber_small_rejection_rate", "fiber_large_rejection_rate")
DIMENSION_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)
_ID_ESTIMATORS = ("pca_count", "twonn", "mle_levina_bickel")


class CalibrationConfig(BaseModel):
    """Null calibration: the same test on smooth data matched to the input.

    Attributes
    ----------
    kind : {"gaussian", "resample"}
        A Gaussian with the input's mean and covariance, or a smoothed bootstrap of the input
        (:func:`moespec.geometry.null_sample`).
    n_repeats : int
        Independent null samples (their rates are all written; the summary has their mean and
        standard deviation, and the observed rates are tested against their spread).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["gaussian", "resample"] = "gaussian"
    n_repeats: int = Field(3, ge=1)


class StrataConfig(BaseModel):
    """Stratification of the points into clusters.

    Attributes
    ----------
    method : {"kmeans", "gmm"}
    k : int, optional
        Fixed number of strata; when omitted it is chosen over ``k_range`` by ``selection``.
    k_range : [int, int]
        Inclusive range of candidate k.
    selection : {"silhouette", "bic"}
        Highest silhouette, or lowest BIC (gmm only).
    n_init : int
        Restarts of k-means / the mixture.
    covariance_type : {"full", "diag", "tied", "spherical"}
        Of the Gaussian mixture.
    silhouette_sample_size : int
        Silhouette is computed on a seeded subsample above this many points (it is O(N^2)).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["kmeans", "gmm"] = "kmeans"
    k: Optional[int] = Field(None, ge=1)
    k_range: list[int] = Field(default_factory=lambda: [2, 8], min_length=2, max_length=2)
    selection: Literal["silhouette", "bic"] = "silhouette"
    n_init: int = Field(4, ge=1)
    covariance_type: Literal["full", "diag", "tied", "spherical"] = "full"
    silhouette_sample_size: int = Field(10000, ge=10)

    @model_validator(mode="after")
    def _valid(self) -> "StrataConfig":
        low, high = self.k_range
        if low < 2 or high < low:
            raise ValueError(f"k_range: need 2 <= low <= high, got [{low}, {high}]")
        if self.selection == "bic" and self.method != "gmm":
            raise ValueError("selection: bic needs method: gmm")
        return self


class Config(StageConfig):
    """The ``fiber`` section of an experiment.

    Attributes
    ----------
    input : {"reduce", "embed"}
        Test the reduced coordinates (default) or the raw embeddings.
    vol_min, vol_max : int
        Neighbour counts tested, ``vol_min .. vol_max - 1``; needs at least ``vol_max + 1`` points.
    window : int
        Slopes per window of the Welch test; ``vol_max - vol_min`` must exceed ``4 * window``.
    alpha : float
        Significance level (the paper's 1e-3), split over ``max_strata`` changes.
    max_strata : int
        Changes searched per point (2 as in the paper's Table 1: small and large radius).
    correction : {"none", "bonferroni_nominal", "bh_nominal"}
        Correction of the per-point p-values across the tested points. Nominal: the per-point
        p-values are not uniform on smooth data, so neither controls the error rate it names
        (:mod:`moespec.geometry.fiber_bundle`); they only make the test stricter.
    max_points : int, optional
        Test a seeded random subset of this many points (neighbours still come from all points).
    calibration : CalibrationConfig
        The null data the rejection rates are calibrated against (a YAML key cannot be ``null``).
    strata : StrataConfig
    intrinsic_dimension : IntrinsicDimensionConfig
        Intrinsic-dimension settings for each stratum (the reduce stage's sub-model; the flat keys
        ``id_threshold``, ``mle_k``, ``twonn_discard_fraction``, ``id_max_points`` are still accepted).
    seed : int
    """

    input: Literal["reduce", "embed"] = "reduce"
    vol_min: int = 10
    vol_max: int = 100
    window: int = 10
    alpha: float = 1e-3
    max_strata: int = 2
    correction: str = "none"
    max_points: Optional[int] = Field(None, ge=1)
    calibration: CalibrationConfig = CalibrationConfig()
    strata: StrataConfig = StrataConfig()
    intrinsic_dimension: IntrinsicDimensionConfig = IntrinsicDimensionConfig()
    seed: int = 0

    _legacy_id_keys = model_validator(mode="before")(nest_legacy_id_keys)

    @model_validator(mode="after")
    def _testable(self) -> "Config":
        from moespec.geometry.params import check_parameters

        problems = check_parameters(**self.test_parameters())
        if problems:
            raise ValueError("\n".join(problems))  # one "key: problem" line each; config.py splits them
        return self

    def test_parameters(self) -> dict[str, Any]:
        """Keyword arguments of :func:`moespec.geometry.fiber_bundle_test`."""
        return dict(
            vol_min=self.vol_min,
            vol_max=self.vol_max,
            window=self.window,
            alpha=self.alpha,
            max_strata=self.max_strata,
            correction=self.correction,
        )


def inputs(cfg: Config) -> dict[str, str]:
    return {cfg.input: cfg.input}


def schema(cfg: Config) -> dict[str, DatasetSpec]:
    s = cfg.max_strata
    spec = {
        "points/index": DatasetSpec(("n",), "int"),
        "points/testable": DatasetSpec(("n",), "bool"),
        "points/pvalue": DatasetSpec(("n",), "float"),
        "points/pvalue_adjusted": DatasetSpec(("n",), "float"),
        "points/n_changes": DatasetSpec(("n",), "int"),
        "points/change_radius": DatasetSpec(("n", s), "float"),
        "points/change_pvalue": DatasetSpec(("n", s), "float"),
        "points/change_volume": DatasetSpec(("n", s), "int"),
        "points/segment_dimension": DatasetSpec(("n", s + 1), "float"),
        "points/segment_start_radius": DatasetSpec(("n", s + 1), "float"),
        "points/dimension_small": DatasetSpec(("n",), "float"),
        "points/dimension_large": DatasetSpec(("n",), "float"),
        "local_dimension/levels": DatasetSpec(("q",), "float"),
        "local_dimension/small": DatasetSpec(("q",), "float"),
        "local_dimension/large": DatasetSpec(("q",), "float"),
        "rates/per_domain/n_testable": DatasetSpec(("n_domains",), "int"),
        "null/n_testable": DatasetSpec((cfg.calibration.n_repeats,), "int"),
        "rates/per_stratum/n_testable": DatasetSpec(("n_strata",), "int"),
        "strata/labels": DatasetSpec(("N",), "int"),
        "strata/n_points": DatasetSpec(("n_strata",), "int"),
        "strata/domain_table": DatasetSpec(("n_domains", "n_strata"), "int"),
        "strata/candidate_k": DatasetSpec(("n_k",), "int"),
        "strata/candidate_score": DatasetSpec(("n_k",), "float"),
        "domain": DatasetSpec(("N",), "int"),
        "domain_names": DatasetSpec(("n_domains",), "str"),
    }
    for name in ("reject_manifold", "reject_fiber_small", "reject_fiber_large", "reject_fiber"):
        spec[f"points/{name}"] = DatasetSpec(("n",), "bool")
    for rate in RATES:
        spec[f"rates/overall/{rate}"] = DatasetSpec((), "float")
        spec[f"null/{rate}"] = DatasetSpec((cfg.calibration.n_repeats,), "float")
        spec[f"rates/all_points/{rate}"] = DatasetSpec((), "float")
        for name in ("t", "pvalue", "fisher_pvalue"):
            spec[f"null_test/{rate}/{name}"] = DatasetSpec((), "float")
        spec[f"rates/per_domain/{rate}"] = DatasetSpec(("n_domains",), "float")
        spec[f"rates/per_stratum/{rate}"] = DatasetSpec(("n_strata",), "float")
    for score in ("silhouette", "davies_bouldin", "calinski_harabasz"):
        spec[f"strata/{score}"] = DatasetSpec((), "float")
    for estimator in _ID_ESTIMATORS:
        spec[f"strata/dimension/{estimator}"] = DatasetSpec(("n_strata",), "float")
    return spec


def run(cfg: Config, inputs: dict[str, ArtifactReader], out: ArtifactWriter) -> None:
    """Test, calibrate, stratify, and write everything with its headline numbers."""
    from moespec.geometry import fiber_bundle_test, null_calibration

    source = inputs[cfg.input]
    points = _load_points(cfg, source)
    domain, domain_names = source.read("domain").astype(np.int64), [str(d) for d in source.read("domain_names")]
    rng = np.random.default_rng(cfg.seed)
    tested = _tested_rows(cfg, len(points), rng)
    n_tested = len(points) if tested is None else len(tested)
    out.log.info(
        "fiber-bundle test of %d of %d points (D = %d), %s",
        n_tested,
        len(points),
        points.shape[1],
        cfg.test_parameters(),
    )
    result = fiber_bundle_test(points, points=tested, device=out.device, **cfg.test_parameters())
    null = null_calibration(
        points,
        kind=cfg.calibration.kind,
        n_repeats=cfg.calibration.n_repeats,
        n_points=None if tested is None else n_tested,
        random_state=rng,
        device=out.device,
        **cfg.test_parameters(),
    )
    _write_test(result, null, out)
    labels, n_strata, scores = _stratify(cfg, points, domain, len(domain_names), out)
    _write_group_rates(result, domain[result.point_index], len(domain_names), "per_domain", out)
    _write_group_rates(result, labels[result.point_index], n_strata, "per_stratum", out)
    out.write("domain", domain)
    out.write("domain_names", domain_names)
    _summarise(cfg, source, result, null, n_strata, scores, out)


def _load_points(cfg: Config, source: Any) -> np.ndarray:
    """The input coordinates in memory, checked before any neighbour search."""
    from moespec.geometry.knn import check_finite_rows

    dataset = source["reduced" if cfg.input == "reduce" else "embeddings"]
    n_rows = dataset.shape[0]
    if n_rows < cfg.vol_max + 1:
        raise DataError(
            f"fiber: the input has N = {n_rows} points, but fiber.vol_max = {cfg.vol_max} needs at "
            f"least vol_max + 1 = {cfg.vol_max + 1}"
        )
    if cfg.strata.k is not None and cfg.strata.k >= n_rows:
        raise ConfigError(
            f"fiber.strata.k: {cfg.strata.k} strata need more than {cfg.strata.k} points, the input has N = {n_rows}"
        )
    points = dataset[()]
    check_finite_rows(points, f"fiber input {cfg.input!r}")
    return points


def _tested_rows(cfg: Config, n_rows: int, rng: np.random.Generator) -> np.ndarray | None:
    if cfg.max_points is None or cfg.max_points >= n_rows:
        return None
    return np.sort(rng.choice(n_rows, cfg.max_points, replace=False))


def _write_test(result: Any, null: Any, out: Any) -> None:
    for name, values in result.arrays().items():
        out.write("points/index" if name == "point_index" else f"points/{name}", values)
    summary, tests = result.summary(), null.compare(result)
    for rate in RATES:
        out.write(f"rates/overall/{rate}", np.float64(summary[rate]))
        out.write(f"rates/all_points/{rate}", np.float64(summary[f"{rate}_all_points"]))
        out.write(f"null/{rate}", np.asarray(null.rates[rate], dtype=np.float64))
        for name in ("t", "pvalue", "fisher_pvalue"):
            out.write(f"null_test/{rate}/{name}", np.float64(tests[f"{rate}_null_{name}"]))
    out.write("null/n_testable", null.n_testable)
    out.attrs["null_kind"] = null.kind
    out.attrs["threshold"] = result.threshold
    testable = result.testable
    out.write("local_dimension/levels", np.asarray(DIMENSION_LEVELS))
    for name in ("small", "large"):
        values = getattr(result, f"dimension_{name}")[testable]
        quantiles = np.quantile(values, DIMENSION_LEVELS) if values.size else np.full(len(DIMENSION_LEVELS), np.nan)
        out.write(f"local_dimension/{name}", quantiles)


def _stratify(
    cfg: Config, points: np.ndarray, domain: np.ndarray, n_domains: int, out: Any
) -> tuple[np.ndarray, int, dict[str, float]]:
    from moespec.geometry import Stratifier, contingency_table, stratum_dimensions

    s, ids = cfg.strata, cfg.intrinsic_dimension
    high = min(s.k_range[1], len(points) - 1)
    stratifier = Stratifier(
        s.method,
        n_clusters=s.k,
        k_range=(min(s.k_range[0], high), high),
        selection=s.selection,
        silhouette_sample_size=s.silhouette_sample_size,
        covariance_type=s.covariance_type,
        n_init=s.n_init,
        random_state=cfg.seed,
    )
    stratifier.fit(points)
    labels, n_strata = stratifier.labels_, stratifier.n_clusters_
    out.write("strata/labels", labels)
    for name, value in stratifier.scores_.items():
        out.write(f"strata/{name}", np.float64(value))
    candidates = sorted(stratifier.selection_scores_)
    out.write("strata/candidate_k", np.asarray(candidates, dtype=np.int64))
    out.write("strata/candidate_score", np.asarray([stratifier.selection_scores_[k] for k in candidates], dtype=float))
    dims = stratum_dimensions(
        points,
        labels,
        n_strata,
        threshold=ids.threshold,
        mle_k=ids.mle_k,
        discard_fraction=ids.twonn_discard_fraction,
        max_points=ids.max_points,
        random_state=cfg.seed,
        device=out.device,
    )
    out.write("strata/n_points", dims.pop("n_points").astype(np.int64))
    for name, values in dims.items():
        out.write(f"strata/dimension/{name}", values)
    out.write("strata/domain_table", contingency_table(domain, labels, n_domains, n_strata))
    out.attrs["strata_method"] = s.method
    out.log.info("%d strata (%s), scores %s", n_strata, s.method, stratifier.scores_)
    return labels, n_strata, stratifier.scores_


def _write_group_rates(result: Any, groups: np.ndarray, n_groups: int, kind: str, out: Any) -> None:
    for name, values in result.group_rates(groups, n_groups).items():
        out.write(f"rates/{kind}/{name}", values)


def _summarise(
    cfg: Config, source: Any, result: Any, null: Any, n_strata: int, scores: dict[str, float], out: Any
) -> None:
    summary = result.summary()
    headline = {
        key: summary[key]
        for key in ("n_tested", "n_testable", *RATES, "dimension_small_median", "dimension_large_median")
    }
    headline.update({f"{rate}_all_points": summary[f"{rate}_all_points"] for rate in RATES})
    headline.update(null.summary())
    tests = null.compare(result)
    headline.update(
        {f"{rate}_null_{name}": tests[f"{rate}_null_{name}"] for rate in RATES for name in ("pvalue", "fisher_pvalue")}
    )
    headline.update(n_strata=int(n_strata), silhouette=scores["silhouette"])
    if cfg.input == "reduce":
        headline["variance_retained"] = float(source["variance_retained"][()])
        for name in (*_ID_ESTIMATORS, "pca_count_input"):
            if f"id/global/{name}" in source:
                headline[f"id_{name}"] = float(source[f"id/global/{name}"][()])
    out.summary.update({key: _rounded(value) for key, value in headline.items()})
    out.log.info(
        "manifold rejection rate %.4f over testable points, %.4f over all (null %.4f +- %.4f, one-sided "
        "p = %.3g); fiber-bundle %.4f (null %.4f +- %.4f, p = %.3g)",
        summary["rejection_rate"],
        summary["rejection_rate_all_points"],
        headline["null_rejection_rate"],
        headline["null_rejection_rate_std"],
        tests["rejection_rate_null_pvalue"],
        summary["fiber_rejection_rate"],
        headline["null_fiber_rejection_rate"],
        headline["null_fiber_rejection_rate_std"],
        tests["fiber_rejection_rate_null_pvalue"],
    )


def _rounded(value: Any) -> Any:
    if isinstance(value, (int, np.integer)):
        return int(value)
    value = float(value)
    return None if not np.isfinite(value) else round(value, 6)
