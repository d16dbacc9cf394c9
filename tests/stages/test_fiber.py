"""The fiber stage, run for real: outputs beside their null rates, strata, known geometry, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moespec.artifacts import open_artifact
from moespec.config import load_experiment
from moespec.errors import ConfigError, DataError, StageError
from moespec.launch.runner import run_inline
from moespec.stages import fiber
from tests.builders import run_stage, write_embed_artifact
from tests.builders import tiny_experiment

SMALL_TEST = {"vol_min": 5, "vol_max": 40, "window": 5, "strata": {"k_range": [2, 4], "n_init": 2}}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("fiber")
    config = tiny_experiment(
        "f", n_per_domain=30, reduce={"n_components": 8, "mle_k": 10}, fiber={**SMALL_TEST, "mle_k": 10}
    )
    arts = run_inline(config, root=root)
    return root, {key[0]: path for key, path in arts.items()}


def test_pipeline_writes_rates_beside_null_rates(demo):
    _, paths = demo
    summary = json.loads((paths["fiber"] / "summary.json").read_text())
    for key in (
        "rejection_rate",
        "null_rejection_rate",
        "fiber_rejection_rate",
        "null_fiber_rejection_rate",
        "silhouette",
        "variance_retained",
        "id_twonn",
        "id_mle_levina_bickel",
        "id_pca_count",
        "n_strata",
    ):
        assert key in summary, key
    with open_artifact(paths["fiber"]) as art, open_artifact(paths["reduce"]) as red:
        n = len(red.read("domain"))
        n_domains = len(red.read("domain_names"))
        assert art["points/index"][()].tolist() == list(range(n))
        reject = art["points/reject_manifold"][()]
        assert summary["rejection_rate_all_points"] == pytest.approx(reject.mean(), abs=1e-6)
        for key in ("null_rejection_rate_std", "rejection_rate_null_pvalue", "rejection_rate_null_fisher_pvalue"):
            assert key in summary, key
        assert art["null/rejection_rate"].shape == (3,)  # three null repeats by default
        assert art["null/n_testable"].shape == (3,)
        testable = art["points/testable"][()]
        assert art["rates/all_points/rejection_rate"][()] == pytest.approx(reject.mean())
        assert art["rates/overall/rejection_rate"][()] == pytest.approx(reject[testable].mean())
        pvalue = art["null_test/rejection_rate/pvalue"][()]
        assert np.isnan(pvalue) or 0.0 <= pvalue <= 1.0
        assert 0.0 <= art["null_test/rejection_rate/fisher_pvalue"][()] <= 1.0
        assert art["points/segment_dimension"].shape == (n, 3)
        per_domain = art["rates/per_domain/rejection_rate"][()]
        counts = art["rates/per_domain/n_testable"][()]
        assert per_domain.shape == (n_domains,)
        assert np.nansum(per_domain * counts) == pytest.approx(reject.sum())
        k = summary["n_strata"]
        assert art["strata/labels"].shape == (n,) and art["strata/labels"][()].max() == k - 1
        assert art["strata/domain_table"].shape == (n_domains, k) and art["strata/domain_table"][()].sum() == n
        assert art["rates/per_stratum/rejection_rate"].shape == (k,)
        assert art["strata/dimension/twonn"].shape == (k,)
        assert art["strata/candidate_k"][()].tolist() == [2, 3, 4]
        assert art["local_dimension/small"].shape == art["local_dimension/levels"].shape
        assert np.isfinite(art["points/pvalue"][()]).all()


def test_embed_input_and_subsampled_points(demo):
    root, _ = demo
    config = tiny_experiment(
        "f",
        n_per_domain=30,
        fiber={**SMALL_TEST, "input": "embed", "max_points": 50, "mle_k": 10, "calibration": {"n_repeats": 2}},
    )
    arts = run_inline(config, root=root)
    path = next(p for key, p in arts.items() if key[0] == "fiber")
    with open_artifact(path) as art:
        index = art["points/index"][()]
        assert len(index) == 50 and len(set(index.tolist())) == 50
        assert art["null/rejection_rate"].shape == (2,)
    summary = json.loads((path / "summary.json").read_text())
    assert summary["n_tested"] == 50 and "variance_retained" not in summary


def test_known_geometry_line_piercing_plane(tmp_path):
    rng = np.random.default_rng(0)
    line = np.c_[np.zeros((300, 2)), rng.uniform(-1, 1, 300)]
    plane = np.c_[rng.uniform(-1, 1, (3000, 2)), np.zeros(3000)]
    rotation = np.linalg.qr(rng.standard_normal((6, 6)))[0]
    points = np.c_[np.r_[line, plane], np.zeros((3300, 3))] @ rotation * 50.0 + 7.0
    domain = np.r_[np.zeros(300, int), np.ones(3000, int)]
    cfg = fiber.Config(
        input="embed",
        vol_min=5,
        vol_max=200,
        window=10,
        strata={"k": 2, "n_init": 1},
        max_points=1500,
        id_max_points=1000,
    )
    with write_embed_artifact(tmp_path / "embed", points, domain, ["line", "plane"]) as source:
        art, summary = run_stage(fiber, cfg, {"embed": source}, tmp_path / "fiber")
    with art:
        rates = art["rates/per_domain/fiber_rejection_rate"][()]
        null = art["null/fiber_rejection_rate"][()]
    # Line points see the plane enter at r = their height: the slope rises from 1, a fiber bundle cannot.
    assert rates[0] > 0.4 and rates[0] > 4 * max(rates[1], null[0])
    # A Gaussian's density falls off across balls holding up to 6 % of the data: the null rejects a
    # few percent by itself, which is why it is reported at all.
    assert 0.0 < summary["null_rejection_rate"] < 0.15


@pytest.mark.parametrize(
    "section, message",
    [
        (
            {"vol_min": 10, "vol_max": 50, "window": 10},
            r"vol_max - vol_min = 50 - 10 = 40 must exceed 4 \* window = 40",
        ),
        ({"correction": "holm"}, "correction"),
        ({"correction": "bonferroni"}, "'bonferroni' is now 'bonferroni_nominal'"),
        ({"strata": {"method": "kmeans", "selection": "bic"}}, "bic needs method: gmm"),
        ({"calibration": {"kind": "uniform"}}, "kind"),
        ({"alpha": 2.0}, "alpha"),
    ],
)
def test_bad_sections_fail_at_load_time(section, message):
    with pytest.raises(ConfigError, match=message) as info:
        load_experiment(tiny_experiment(reduce={"n_components": 4}, fiber=section))
    assert "fiber" in str(info.value)


def test_too_few_points_is_a_data_error_naming_vol_max(tmp_path):
    config = tiny_experiment("f", n_per_domain=4, reduce={"n_components": 4, "mle_k": 5}, fiber={})
    with pytest.raises(StageError, match=r"N = 24 points, but fiber.vol_max = 100 needs at least vol_max \+ 1 = 101"):
        run_inline(config, root=tmp_path)


def test_nan_rows_are_a_data_error(tmp_path):
    points = np.random.default_rng(2).standard_normal((300, 5))
    points[42] = np.nan
    with write_embed_artifact(tmp_path / "embed", points, np.zeros(300, dtype=int)) as source:
        with pytest.raises(DataError, match="rows 42"):
            run_stage(fiber, fiber.Config(input="embed"), {"embed": source}, tmp_path / "fiber")


def test_yaml_section_loads(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(
        "experiment: x\n"
        "embed: {model: {name: 'builtin:tiny-bert'}, data: [{kind: builtin, n_per_domain: 50}]}\n"
        "reduce: {n_components: 16}\n"
        "fiber:\n"
        "  input: reduce\n"
        "  vol_min: 10\n  vol_max: 100\n  window: 10\n  alpha: 1.0e-3\n  max_strata: 2\n  correction: bh_nominal\n"
        "  calibration: {kind: resample, n_repeats: 2}\n"
        "  strata: {method: gmm, k_range: [2, 6], selection: bic}\n"
    )
    section = load_experiment(path).base.fiber
    assert section.calibration.kind == "resample" and section.strata.selection == "bic"
    assert section.correction == "bh_nominal"
