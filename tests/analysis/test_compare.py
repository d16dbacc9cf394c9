"""`moespec compare` on a real sweep: ranking, improvement over a baseline, correlations, CSV and JSON."""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np
import pytest

from moespec.analysis.compare import (
    Comparison,
    compare,
    correlation_figure_reason,
    lower_is_better,
    to_csv,
    to_json,
    write_comparison,
)
from moespec.analysis.results import discover
from moespec.cli import main
from moespec.errors import MoespecError
from tests.builders import built_sweep


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    return built_sweep(tmp_path_factory)


def _accuracies(experiment) -> dict[str, float]:
    return {
        run.name: json.loads((run.tasks["train"].dir / "summary.json").read_text())["val_accuracy"]
        for run in discover(experiment).runs
    }


def test_ranking_follows_the_metric_with_the_swept_parameters(experiment):
    comparison = compare([experiment], sort_by="train.val_accuracy")
    accuracies = _accuracies(experiment)
    assert [r["run"] for r in comparison.rows] == sorted(accuracies, key=lambda n: -accuracies[n])
    assert [r["rank"] for r in comparison.rows] == [1, 2, 3, 4]
    assert {"train.epochs", "train.model.kind"} <= set(comparison.parameters)
    for row in comparison.rows:
        assert row["train.val_accuracy"] == accuracies[row["run"]]
        assert row["train.epochs"] in (2, 3) and row["train.model.kind"] in ("topk", "dictionary")


def test_improvement_is_measured_against_the_chosen_baseline(experiment):
    runs = discover(experiment).runs
    baseline = runs[2].name
    comparison = compare([experiment], sort_by="train.best_val_loss", baseline=baseline)
    assert not comparison.higher_is_better and comparison.baseline == baseline
    losses = {r.name: json.loads((r.tasks["train"].dir / "summary.json").read_text())["best_val_loss"] for r in runs}
    for row in comparison.rows:
        assert row["improvement"] == pytest.approx(losses[baseline] - losses[row["run"]])
    assert [r["train.best_val_loss"] for r in comparison.rows] == sorted(losses.values())
    with pytest.raises(MoespecError, match="not a run"):
        compare([experiment], baseline="nope")
    with pytest.raises(MoespecError, match="no run has metric"):
        compare([experiment], sort_by="train.nope")


def test_correlation_is_pearson_across_runs(experiment):
    comparison = compare([experiment], sort_by="train.val_accuracy")
    # numeric swept parameters: epochs, and the model defaults that differ between the two kinds
    assert "train.epochs" in comparison.numeric_parameters and "train.model.n_experts" in comparison.numeric_parameters
    assert "train.model.kind" not in comparison.numeric_parameters  # categorical: no correlation
    i = comparison.numeric_parameters.index("train.epochs")
    j = comparison.correlation_metrics.index("train.epochs_run")
    assert comparison.correlation[i, j] == pytest.approx(1.0)  # epochs_run follows epochs (no early stop)
    j = comparison.correlation_metrics.index("train.val_accuracy")
    runs = discover(experiment).runs
    epochs = [r.tasks["train"].config["epochs"] for r in runs]
    accuracy = [json.loads((r.tasks["train"].dir / "summary.json").read_text())["val_accuracy"] for r in runs]
    expected = np.corrcoef(epochs, accuracy)[0, 1] if np.ptp(accuracy) else math.nan
    assert comparison.correlation[i, j] == pytest.approx(expected, nan_ok=True)
    assert comparison.correlation_counts[i, j] == 4


def test_csv_and_json_exports_hold_the_same_ranking(experiment, tmp_path):
    comparison = compare([experiment], sort_by="train.val_accuracy")
    written = write_comparison(comparison, tmp_path)
    rows = list(csv.DictReader(io.StringIO(written["csv"].read_text())))
    assert [r["run"] for r in rows] == [r["run"] for r in comparison.rows]
    assert [float(r["train.val_accuracy"]) for r in rows] == [r["train.val_accuracy"] for r in comparison.rows]
    exported = json.loads(written["json"].read_text())
    assert exported == json.loads(json.dumps(to_json(comparison), default=str))
    assert exported["correlation"]["parameters"] == comparison.numeric_parameters
    # 4 runs, 2 values per parameter: no correlation figure, and the JSON says why
    assert "figure" not in written and "4 runs" in exported["correlation"]["figure"]
    # the sweep's runs overlaid, one line per run
    for name in ("overlay_val_accuracy", "overlay_val_loss"):
        assert written[name].read_bytes()[:4] == b"\x89PNG"
    assert len(comparison.curves) == 4
    for curve in comparison.curves.values():
        assert len(curve["epoch"]) == len(curve["val_accuracy"]) in (2, 3)
    assert to_csv(comparison).splitlines()[0].startswith("rank,run,experiment,")


def test_the_correlation_figure_needs_enough_runs_and_values():
    def made(n_runs: int, distinct: int) -> Comparison:
        comparison = Comparison("m", True, "run1", ["train.lr"], ["m"], [{"run": f"r{i}"} for i in range(n_runs)])
        comparison.numeric_parameters, comparison.distinct_values = ["train.lr"], {"train.lr": distinct}
        return comparison

    assert correlation_figure_reason(made(6, 3)) is None
    assert "5 runs" in correlation_figure_reason(made(5, 5))
    assert "fewer than 3 values" in correlation_figure_reason(made(8, 2))


def test_several_experiments_and_the_cli(experiment, tmp_path, capsys):
    comparison = compare([experiment, experiment], sort_by="ablate.baseline.accuracy", higher_is_better=True)
    assert len(comparison.rows) == 8 and all(r["run"].startswith("sweep/") for r in comparison.rows)
    # the dictionary MoEs measure reconstruction, not accuracy: unranked, last, never filled in
    assert [r["rank"] for r in comparison.rows] == [1, 2, 3, 4, None, None, None, None]
    assert all(r["ablate.baseline.accuracy"] is None and r["improvement"] is None for r in comparison.rows[4:])
    assert compare([experiment]).metric == "train.val_accuracy"
    assert main(["compare", str(experiment), "--sort-by", "train.val_accuracy", "--out", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "ranked by train.val_accuracy (higher is better)" in out
    assert (tmp_path / "c" / "compare.csv").is_file() and (tmp_path / "c" / "compare.json").is_file()


def test_direction_defaults():
    assert lower_is_better("train.best_val_loss") and lower_is_better("ablate.dead_experts")
    assert not lower_is_better("train.val_accuracy") and not lower_is_better("ablate.nmi_class[0]")
