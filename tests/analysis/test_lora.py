"""Report sections of the lora and route stages, on a real (tiny) run; the plot functions draw what they are given."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moespec.analysis import lora as lora_analysis
from moespec.analysis import plots
from moespec.analysis.report import write_report
from moespec.launch.runner import run_inline
from tests.builders import one_torch_thread, save_tiny_llama


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    folder = tmp_path_factory.mktemp("lora-report")
    base = save_tiny_llama(folder / "base")
    config = {
        "experiment": "lora-report",
        "lora": {
            "base": {"name": str(base)},
            "data": [{"kind": "builtin", "n_per_domain": 10, "domains": ["movies", "medical"]}],
            "adapter": {"rank": 2, "alpha": 4, "target_modules": ["q_proj", "v_proj"]},
            "training": {"max_steps": 4, "batch_size": 4, "lr": 0.01, "eval_every": 2},
            "max_length": 24,
        },
        "route": {
            "routers": [
                {"kind": "oracle"},
                {"kind": "base"},
                {"kind": "learned", "layer": 1},
                {"kind": "keyword", "rules": {"movies": ["film"]}, "default": "medical"},
            ],
            "bootstrap": 50,
        },
    }
    with one_torch_thread():
        run_inline(config, root=folder / "results")
    return folder / "results" / "lora-report"


def test_the_report_has_the_lora_and_route_sections_and_figures(experiment, tmp_path):
    result = write_report(experiment, tmp_path / "report")
    page = result.index.read_text()
    assert "Routers over domain adapters (route)" in page and "Domain LoRA adapters (lora)" in page
    route_figures = sorted(p.name for p in (tmp_path / "report" / "figures").glob("route-*/*.png"))
    assert route_figures == [
        "confusion_2.png",
        "confusion_3.png",
        "loss_matrix.png",
        "router_domain_delta.png",
        "router_domain_gain.png",
    ]
    assert list((tmp_path / "report" / "figures").glob("lora-*/adapter_val_loss.png"))
    summary = json.loads((tmp_path / "report" / "summary.json").read_text())
    metrics = summary["runs"][0]["metrics"]
    assert {"route.gain_recovered.learned", "route.router_accuracy.keyword"} <= set(metrics)


def test_plot_loss_matrix_stars_the_best_model_of_each_domain():
    figure, ax = plots.new_figure()
    delta = np.array([[-0.3, -0.1], [-0.2, -0.4], [0.0, 0.0]])
    lora_analysis.plot_loss_matrix(
        {"delta": delta, "models": ["a", "b", "base"], "domains": ["a", "b"], "n_texts": 10}, ax
    )
    stars = ax.collections[0].get_offsets()
    assert sorted(map(tuple, np.asarray(stars).round(2))) == [(0.32, -0.28), (1.32, 0.72)]  # a cell corner


def test_plot_confusion_shows_counts_and_row_shares():
    figure, ax = plots.new_figure()
    counts = np.array([[3, 1], [0, 4]])
    lora_analysis.plot_confusion({"counts": counts, "domains": ["a", "b"], "router": "learned", "accuracy": 0.875}, ax)
    assert [t.get_text() for t in ax.texts] == ["3", "1", "0", "4"]
    np.testing.assert_allclose(ax.images[0].get_array(), [[0.75, 0.25], [0.0, 1.0]])
    assert "accuracy 0.875 on 8 test texts" in ax.get_title()


def test_plot_router_bars_draws_one_bar_per_router_and_domain_with_intervals():
    figure, ax = plots.new_figure()
    value = np.array([[1.0, 2.0], [1.5, 2.5]])
    lora_analysis.plot_router_bars(
        {
            "domains": ["a", "b"],
            "routers": ["oracle", "keyword"],
            "value": value,
            "low": value - 0.1,
            "high": value + np.array([[0.2, 0.2], [np.nan, 0.2]]),
            "ylabel": "loss",
            "title": "t",
        },
        ax,
    )
    heights = sorted(bar.get_height() for bar in ax.patches)
    assert heights == [1.0, 1.5, 2.0, 2.5]
    assert len(ax.containers) == 4  # two bar containers, two error-bar containers
