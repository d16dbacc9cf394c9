"""The lm stage in `moespec report` and `moespec compare`: sections, figures, ranking, overlaid curves."""

from __future__ import annotations

import json

import pytest

from moespec.analysis.compare import compare, lower_is_better, write_comparison
from moespec.analysis.report import write_report
from moespec.launch.runner import run_inline
from tests.builders import one_torch_thread


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm-report")
    config = {
        "experiment": "lm-sweep",
        "lm": {
            "data": [{"kind": "builtin", "n_per_domain": 6, "domains": ["movies", "science"]}],
            "tokenizer": {"kind": "bpe", "vocab_size": 280},
            "model": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_experts": 4, "top_k": 2},
            "seq_len": 32,
            "batch_size": 4,
            "max_steps": 4,
            "eval_every": 2,
            "warmup_steps": 1,
            "validation_fraction": 0.3,
            "specialisation": {"n_shuffles": 2, "min_count": 2},
        },
        "sweep": {"grid": {"lm.model.dense_twin": [None, "active"]}},
    }
    with one_torch_thread():
        run_inline(config, root=root)
    return root / "lm-sweep"


def test_the_report_has_an_lm_section_with_its_figures(experiment):
    result = write_report(experiment)
    page = result.index.read_text()
    assert "Language model (lm, MoE, 4 experts, top-2)" in page
    assert "Language model (lm, dense twin matched on active parameters)" in page
    assert "I(expert; domain | token id)" in page
    figures = {p.name for p in (experiment / "report" / "figures").rglob("*.png")}
    assert {"lm_loss.png", "lm_expert_load.png", "lm_router.png", "lm_coactivation.png"} <= figures


def test_compare_ranks_lm_runs_by_validation_loss_and_overlays_their_curves(experiment, tmp_path):
    assert lower_is_better("lm.val_loss") and lower_is_better("lm.val_bits_per_byte")
    comparison = compare([experiment])
    assert comparison.metric == "lm.val_loss" and not comparison.higher_is_better
    losses = [row["lm.val_loss"] for row in comparison.rows]
    assert losses == sorted(losses) and len(losses) == 2
    assert set(comparison.lm_curves["runs"]) == {row["run"] for row in comparison.rows}
    written = write_comparison(comparison, tmp_path)
    assert written["lm_curves"].stat().st_size > 0
    summaries = {json.loads((p / "summary.json").read_text())["model"] for p in (experiment / "lm").iterdir()}
    assert summaries == {"moe", "dense (active-matched)"}
