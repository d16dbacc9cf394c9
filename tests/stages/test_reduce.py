"""The reduce stage, run for real: PCA against scikit-learn, carried rows, ID estimates, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.decomposition import PCA

from moespec.artifacts import open_artifact
from moespec.config import load_experiment
from moespec.errors import ConfigError, DataError, StageError
from moespec.launch.runner import run_inline
from moespec.stages import reduce
from tests.builders import run_stage, tiny_experiment, write_embed_artifact


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("reduce")
    arts = run_inline(tiny_experiment("r", n_per_domain=30, reduce={"n_components": 8, "mle_k": 10}), root=root)
    paths = {key[0]: path for key, path in arts.items()}
    return root, paths


def test_reduced_data_match_sklearn_pca(demo):
    _, paths = demo
    with open_artifact(paths["embed"]) as emb, open_artifact(paths["reduce"]) as red:
        X = emb["embeddings"][()].astype(np.float64)
        ref = PCA(8, svd_solver="covariance_eigh").fit(X)
        np.testing.assert_allclose(red["explained_variance_ratio"][()], ref.explained_variance_ratio_, atol=1e-6)
        signs = np.sign((red["components"][()] * ref.components_).sum(axis=1))
        np.testing.assert_allclose(red["components"][()] * signs[:, None], ref.components_, atol=1e-4)
        np.testing.assert_allclose(red["reduced"][()] * signs, ref.transform(X), atol=1e-4)
        np.testing.assert_allclose(red["mean"][()], X.mean(axis=0), atol=1e-6)
        assert red["variance_retained"].shape == ()
        assert red["variance_retained"][()] == pytest.approx(ref.explained_variance_ratio_.sum(), abs=1e-6)
        assert red["spectrum"].shape == (X.shape[1],)


def test_rows_are_carried_and_id_is_estimated(demo):
    _, paths = demo
    with open_artifact(paths["embed"]) as emb, open_artifact(paths["reduce"]) as red:
        for name in ("domain", "label", "text_id", "domain_names", "label_names", "label_domain"):
            np.testing.assert_array_equal(red.read(name), emb.read(name))
        n_domains = len(emb.read("domain_names"))
        for name in ("pca_count", "twonn", "mle_levina_bickel"):
            value = red[f"id/global/{name}"][()]
            assert np.isfinite(value) and 1 <= value <= 8, name
            per_domain = red[f"id/per_domain/{name}"][()]
            assert per_domain.shape == (n_domains,) and np.isfinite(per_domain).all()
        assert red["id/per_domain/n_points"][()].sum() == len(emb.read("domain"))
        assert 1 <= red["id/global/pca_count_input"][()] <= emb["embeddings"].shape[1]
    summary = json.loads((paths["reduce"] / "summary.json").read_text())
    assert set(summary) >= {"variance_retained", "n_components", "id_pca_count", "id_twonn", "id_mle_levina_bickel"}


def test_variance_target_keeps_the_smallest_k(demo):
    root, paths = demo
    arts = run_inline(tiny_experiment("r", n_per_domain=30, reduce={"variance_target": 0.5, "mle_k": 10}), root=root)
    path = next(p for key, p in arts.items() if key[0] == "reduce")
    with open_artifact(path) as red, open_artifact(paths["reduce"]) as full:
        spectrum = full["spectrum"][()]
        k = int(np.argmax(np.cumsum(spectrum) / spectrum.sum() >= 0.5)) + 1
        assert red["reduced"].shape[1] == k and red["variance_retained"][()] >= 0.5


def test_known_dimensions_on_a_synthetic_embed_artifact(tmp_path):
    rng = np.random.default_rng(0)
    rotation = np.linalg.qr(rng.standard_normal((20, 20)))[0]
    square = np.c_[rng.random((600, 2)), np.zeros((600, 18))] @ rotation
    cube = np.c_[rng.random((600, 4)), np.zeros((600, 16))] @ rotation + 3.0
    source = write_embed_artifact(tmp_path / "embed", np.r_[square, cube], np.repeat([0, 1], 600))
    cfg = reduce.Config(n_components=6, id_max_points=1000)
    with source:
        red, summary = run_stage(reduce, cfg, {"embed": source}, tmp_path / "reduce")
    with red:
        np.testing.assert_allclose(red["id/per_domain/twonn"][()], [2, 4], rtol=0.15)
        np.testing.assert_allclose(red["id/per_domain/mle_levina_bickel"][()], [2, 4], rtol=0.15)
        assert red["id/global/twonn"].shape == ()
    assert summary["n_components"] == 6


@pytest.mark.parametrize(
    "section, message",
    [
        ({}, "exactly one of n_components and variance_target"),
        ({"n_components": 4, "variance_target": 0.5}, "exactly one"),
        ({"variance_target": 0.5, "solver": "randomized"}, "variance_target needs solver: covariance"),
        ({"n_components": 0}, "n_components"),
        ({"variance_target": 1.5}, "variance_target"),
    ],
)
def test_bad_sections_fail_at_load_time(section, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(tiny_experiment(reduce=section))
    assert "reduce" in str(info.value)


def test_target_larger_than_d_is_a_config_error_naming_it(demo):
    root, _ = demo
    with pytest.raises(StageError, match="reduce.n_components: 300 exceeds the embedding dimension D = 256"):
        run_inline(tiny_experiment("r", n_per_domain=30, reduce={"n_components": 300}), root=root)
    (log,) = [p.read_text() for p in (root / "r" / "reduce").glob("*/log.txt") if "n_components: 300" in p.read_text()]
    assert "moespec.errors.ConfigError" in log and "PCA of" not in log


def test_nan_rows_are_a_data_error(tmp_path):
    X = np.random.default_rng(1).standard_normal((200, 10))
    X[17, 3] = np.nan
    with write_embed_artifact(tmp_path / "embed", X, np.zeros(200, dtype=int)) as source:
        with pytest.raises(DataError, match="first at row 17"):
            run_stage(reduce, reduce.Config(n_components=3), {"embed": source}, tmp_path / "reduce")
    assert not list((tmp_path / "reduce").glob("*.h5"))


def test_intrinsic_dimension_settings_are_one_sub_model_shared_with_fiber():
    from moespec.geometry.params import IntrinsicDimensionConfig
    from moespec.stages import fiber

    assert reduce.Config.model_fields["intrinsic_dimension"].annotation is IntrinsicDimensionConfig
    assert fiber.Config.model_fields["intrinsic_dimension"].annotation is IntrinsicDimensionConfig
    assert reduce.Config(n_components=2).intrinsic_dimension == fiber.Config().intrinsic_dimension


def test_flat_intrinsic_dimension_keys_still_load_into_the_sub_section():
    flat = reduce.Config(n_components=2, id_threshold=0.5, mle_k=5, twonn_discard_fraction=0.2, id_max_points=50)
    nested = reduce.Config(
        n_components=2,
        intrinsic_dimension={"threshold": 0.5, "mle_k": 5, "twonn_discard_fraction": 0.2, "max_points": 50},
    )
    assert flat == nested
    with pytest.raises(ValueError, match="mle_k and intrinsic_dimension.mle_k are both set"):
        reduce.Config(n_components=2, mle_k=5, intrinsic_dimension={"mle_k": 6})
    with pytest.raises(ValueError, match="max_points = 5 must exceed mle_k = 20"):
        reduce.Config(n_components=2, intrinsic_dimension={"max_points": 5})
