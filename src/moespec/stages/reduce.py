"""The reduce stage: embeddings -> principal components, variance retained, intrinsic dimension.

PCA is streamed over row chunks of the embed artifact (:class:`moespec.geometry.StreamingPCA`):
memory is one chunk plus D x D float64 (covariance solver) or D x (k + 10) (randomized), whatever N.

Output:

==============================  ==================  ============================================
dataset                         shape, dtype        meaning
==============================  ==================  ============================================
reduced                         (N, k) float64      coordinates on the leading k components
components                      (k, D) float64      principal axes (rows), sign fixed as sklearn
mean                            (D,) float64        mean embedding
explained_variance              (k,) float64        variance along each axis (ddof = 1)
explained_variance_ratio        (k,) float64        share of the total variance of the input
variance_retained               () float64          sum of ``explained_variance_ratio``
spectrum                        (D,) float64        every covariance eigenvalue (covariance solver)
id/global/<estimator>           () float64          intrinsic dimension of the reduced data
id/per_domain/<estimator>       (n_domains,)        the same per domain (NaN: too few points)
id/per_domain/n_points          (n_domains,) int64  rows of each domain
domain, label, text_id, ...     (N,) ...            carried over from embed (and the names tables)
==============================  ==================  ============================================

Intrinsic-dimension estimators, all on the reduced coordinates as written (the space downstream
stages see; whitened when ``whiten`` is set):
``pca_count`` (components reaching ``id_threshold`` of the *reduced* variance: the earlier
pipeline's "intrinsic dimension"), ``twonn`` (Facco et al. 2017) and ``mle_levina_bickel``
(Levina & Bickel 2004, ``mle_k`` neighbours), the last two on at most ``id_max_points`` seeded
random rows. ``id/global/pca_count_input`` counts components reaching ``id_threshold`` of the
*input's* total variance (from ``spectrum``; NaN when the randomized solver's k components do
not reach it).

Summary: ``n_components``, ``variance_retained``, ``id_pca_count``, ``id_pca_count_input``,
``id_twonn``, ``id_mle_levina_bickel``.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field, model_validator

from moespec.artifacts import ArtifactReader, ArtifactWriter, DatasetSpec
from moespec.errors import ConfigError, DataError
from moespec.geometry.params import IntrinsicDimensionConfig, nest_legacy_id_keys
from moespec.stages.base import StageConfig
from moespec.stages.embed import ROW_METADATA

NAME = "reduce"
SCHEMA_VERSION = 1

#: Per-row datasets of the embed artifact copied into reduce, so downstream stages read one file.
CARRIED = (*ROW_METADATA, "token_id")
ID_ESTIMATORS = ("pca_count", "twonn", "mle_levina_bickel")


class Config(StageConfig):
    """The ``reduce`` section of an experiment.

    Attributes
    ----------
    n_components : int, optional
        Components to keep. Give exactly one of ``n_components`` and ``variance_target``.
    variance_target : float in (0, 1], optional
        Keep the fewest components whose explained variance ratios reach this (covariance solver).
    solver : {"covariance", "randomized"}
        Exact one-pass covariance (D up to a few thousand), or randomized subspace iteration for
        very wide inputs (``2 + 12`` passes, D x (k + 10) memory).
    whiten : bool
        Scale ``reduced`` to unit variance per component.
    chunk_rows : int
        Rows read per chunk.
    intrinsic_dimension : IntrinsicDimensionConfig
        ``threshold``, ``mle_k``, ``twonn_discard_fraction``, ``max_points`` (shared with the fiber
        stage); the flat keys ``id_threshold``, ``mle_k``, ``twonn_discard_fraction`` and
        ``id_max_points`` of earlier configs are still accepted and moved here.
    seed : int
        Seed of the subsample and of the randomized solver.
    """

    n_components: Optional[int] = Field(None, ge=1)
    variance_target: Optional[float] = Field(None, gt=0.0, le=1.0)
    solver: Literal["covariance", "randomized"] = "covariance"
    whiten: bool = False
    chunk_rows: int = Field(8192, ge=1)
    intrinsic_dimension: IntrinsicDimensionConfig = IntrinsicDimensionConfig()
    seed: int = 0

    _legacy_id_keys = model_validator(mode="before")(nest_legacy_id_keys)

    @model_validator(mode="after")
    def _one_target(self) -> "Config":
        if (self.n_components is None) == (self.variance_target is None):
            raise ValueError(
                "give exactly one of n_components and variance_target, got "
                f"n_components={self.n_components}, variance_target={self.variance_target}"
            )
        if self.variance_target is not None and self.solver == "randomized":
            raise ValueError(
                "variance_target needs solver: covariance (the randomized solver sees only the "
                "leading spectrum); give n_components instead"
            )
        return self


def inputs(cfg: Config) -> dict[str, str]:
    return {"embed": "embed"}


def schema(cfg: Config) -> dict[str, DatasetSpec]:
    spec = {
        "reduced": DatasetSpec(("N", "k"), "float"),
        "components": DatasetSpec(("k", "D"), "float"),
        "mean": DatasetSpec(("D",), "float"),
        "explained_variance": DatasetSpec(("k",), "float"),
        "explained_variance_ratio": DatasetSpec(("k",), "float"),
        "variance_retained": DatasetSpec((), "float"),
        "spectrum": DatasetSpec(("D",), "float", required=cfg.solver == "covariance"),
        **ROW_METADATA,
        "token_id": DatasetSpec(("N",), "int", required=False),
        "id/global/pca_count_input": DatasetSpec((), "float"),
        "id/per_domain/n_points": DatasetSpec(("n_domains",), "int"),
    }
    for name in ID_ESTIMATORS:
        spec[f"id/global/{name}"] = DatasetSpec((), "float")
        spec[f"id/per_domain/{name}"] = DatasetSpec(("n_domains",), "float")
    return spec


def run(cfg: Config, inputs: dict[str, ArtifactReader], out: ArtifactWriter) -> None:
    """Fit the PCA on the embeddings, write the reduced data, the carried rows and the ID estimates."""
    from moespec.geometry import StreamingPCA

    embeddings = inputs["embed"]["embeddings"]
    _check_sizes(cfg, embeddings.shape)
    pca = StreamingPCA(
        cfg.n_components,
        variance_target=cfg.variance_target,
        solver=cfg.solver,
        whiten=cfg.whiten,
        chunk_rows=cfg.chunk_rows,
        random_state=cfg.seed,
    )
    out.log.info(
        "PCA of %d x %d embeddings (%s solver, chunks of %d rows)", *embeddings.shape, cfg.solver, cfg.chunk_rows
    )
    pca.fit(embeddings)
    reduced = out.create_dataset("reduced", (embeddings.shape[0], pca.n_components_), "float64")
    pca.transform(embeddings, reduced)
    _write_pca(pca, out)
    _carry_rows(inputs["embed"], out)
    out.log.info("kept %d components, variance retained %.4f", pca.n_components_, pca.variance_retained_)
    estimates = _write_intrinsic_dimension(
        cfg, pca, reduced[()], inputs["embed"]["domain"][()], len(inputs["embed"]["domain_names"]), out
    )
    out.summary.update(
        n_components=int(pca.n_components_),
        variance_retained=round(pca.variance_retained_, 6),
        **{f"id_{name}": _rounded(value) for name, value in estimates.items()},
    )


def _check_sizes(cfg: Config, shape: tuple[int, ...]) -> None:
    """Fail before reading any row when the target cannot be met."""
    n_rows, dim = shape
    if cfg.n_components is not None and cfg.n_components > dim:
        raise ConfigError(f"reduce.n_components: {cfg.n_components} exceeds the embedding dimension D = {dim}")
    if cfg.n_components is not None and cfg.n_components > n_rows:
        raise ConfigError(f"reduce.n_components: {cfg.n_components} exceeds the number of embeddings N = {n_rows}")
    mle_k = cfg.intrinsic_dimension.mle_k
    if n_rows <= mle_k:
        raise DataError(
            f"reduce: {n_rows} embeddings are too few for the intrinsic-dimension estimates "
            f"(reduce.intrinsic_dimension.mle_k = {mle_k} needs more than {mle_k})"
        )


def _write_pca(pca: Any, out: Any) -> None:
    out.write("components", pca.components_)
    out.write("mean", pca.mean_)
    out.write("explained_variance", pca.explained_variance_)
    out.write("explained_variance_ratio", pca.explained_variance_ratio_)
    out.write("variance_retained", np.float64(pca.variance_retained_))
    if pca.spectrum_ is not None:
        out.write("spectrum", pca.spectrum_)
    for key in ("n_components_", "n_samples_", "n_features_in_", "total_variance_"):
        out.attrs[f"pca_{key.rstrip('_')}"] = getattr(pca, key)
    out.attrs["whiten"] = bool(pca.whiten)


def _carry_rows(embed: Any, out: Any) -> None:
    """Copy the per-row metadata and its names tables (small next to the embeddings)."""
    for name in CARRIED:
        if name not in embed:
            continue
        values = embed.read(name)
        if values.dtype.kind in "OUS":
            _write_strings(out, name, [str(v) for v in values])
        else:
            out.write(name, values)


def _write_strings(out: Any, name: str, values: list[str]) -> None:
    if values:
        out.write(name, values)
    else:  # an empty list has no dtype to tell h5py it holds strings
        import h5py

        out.create_dataset(name, (0,), h5py.string_dtype())


def _write_intrinsic_dimension(
    cfg: Config, pca: Any, reduced: np.ndarray, domain: np.ndarray, n_domains: int, out: Any
) -> dict[str, float]:
    from moespec.geometry import covariance_spectrum, pca_count

    ids = cfg.intrinsic_dimension
    # Every estimate describes the reduced coordinates as written (whitened when cfg.whiten).
    estimates = _estimates(ids, reduced, covariance_spectrum(reduced), out.device, np.random.default_rng(cfg.seed))
    for name, value in estimates.items():
        out.write(f"id/global/{name}", np.float64(value))
    input_count = (
        pca_count(pca.spectrum_, ids.threshold)
        if pca.spectrum_ is not None
        else _count_if_reached(pca.explained_variance_ratio_, ids.threshold)
    )
    out.write("id/global/pca_count_input", np.float64(input_count))
    per_domain = _per_domain(cfg, reduced, domain, n_domains, out)
    for name, values in per_domain.items():
        out.write(f"id/per_domain/{name}", values)
    for key, value in {
        "threshold": ids.threshold,
        "mle_k": ids.mle_k,
        "space": "reduced",
        "twonn_discard_fraction": ids.twonn_discard_fraction,
        "max_points": ids.max_points or 0,
    }.items():
        out.attrs[f"id_{key}"] = value
    out.log.info("intrinsic dimension of the reduced data: %s (input pca_count %s)", estimates, input_count)
    return {**estimates, "pca_count_input": float(input_count)}


def _estimates(
    ids: IntrinsicDimensionConfig, points: np.ndarray, variances: np.ndarray, device: str, rng: np.random.Generator
) -> dict[str, float]:
    """The three estimators on one point set; NaN where the set is too small or degenerate."""
    from moespec.geometry import knn_distances, mle_levina_bickel, pca_count, twonn

    values = {name: float("nan") for name in ID_ESTIMATORS}
    if len(points) >= 2 and np.asarray(variances).sum() > 0:
        values["pca_count"] = float(pca_count(variances, ids.threshold))
    if len(points) <= ids.mle_k:
        return values
    if ids.max_points is not None and len(points) > ids.max_points:
        points = points[np.sort(rng.choice(len(points), ids.max_points, replace=False))]
    distances, _ = knn_distances(points, ids.mle_k, device=device)
    try:
        values["twonn"] = twonn(distances, ids.twonn_discard_fraction)
        values["mle_levina_bickel"] = mle_levina_bickel(distances, ids.mle_k)
    except DataError:
        pass  # every point duplicates another: no neighbour ratio exists, the estimates stay NaN
    return values


def _per_domain(
    cfg: Config, reduced: np.ndarray, domain: np.ndarray, n_domains: int, out: Any
) -> dict[str, np.ndarray]:
    from moespec.geometry import covariance_spectrum

    ids = cfg.intrinsic_dimension
    rng = np.random.default_rng(cfg.seed + 1)
    per_domain = {name: np.full(n_domains, np.nan) for name in ID_ESTIMATORS}
    counts = np.bincount(domain, minlength=n_domains)[:n_domains].astype(np.int64)
    for d in range(n_domains):
        rows = reduced[domain == d]
        spectrum = covariance_spectrum(rows) if len(rows) >= 2 else np.zeros(1)
        for name, value in _estimates(ids, rows, spectrum, out.device, rng).items():
            per_domain[name][d] = value
        if len(rows) <= ids.mle_k:
            out.log.warning(
                "domain %d has %d rows: too few for twonn / mle_levina_bickel (mle_k = %d); NaN",
                d,
                len(rows),
                ids.mle_k,
            )
    return {**per_domain, "n_points": counts}


def _count_if_reached(ratios: np.ndarray, threshold: float) -> float:
    cumulative = np.cumsum(ratios)
    return float(np.searchsorted(cumulative, threshold) + 1) if cumulative[-1] >= threshold else float("nan")


def _rounded(value: float) -> float | None:
    return None if not np.isfinite(value) else round(float(value), 4)
