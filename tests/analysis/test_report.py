"""`moespec report` on a real (tiny) pipeline run: it renders, its figures exist, its numbers are the artifacts'."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

from moespec.analysis.report import write_report
from moespec.analysis.results import discover
from moespec.artifacts import open_artifact
from moespec.cli import main
from tests.builders import parse, built_sweep


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    return built_sweep(tmp_path_factory)


@pytest.fixture(scope="module")
def report(experiment):
    return write_report(experiment)


def test_runs_are_the_sweep_points_linked_through_input_uids(experiment):
    found = discover(experiment)
    assert len(found.runs) == 4
    for run in found.runs:
        assert list(run.tasks) == ["embed", "reduce", "fiber", "train", "ablate"]
        assert all(t.status == "done" for t in run.tasks.values())
        assert run.tasks["ablate"].input_uids["train"] == run.tasks["train"].uid
        assert len(run.points) == 1
    assert sorted(r.points[0] for r in found.runs) == [0, 1, 2, 3]
    assert len({r.tasks["reduce"].uid for r in found.runs}) == 1  # shared upstream artifact


def test_report_renders_with_every_figure_and_summary(report, experiment):
    assert report.index == experiment / "report" / "index.html"
    page = parse(report.index)
    assert len(page.images) >= 4 * 10
    for src in page.images:
        path = report.index.parent / src
        assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", src
    assert not page.missing
    summary = json.loads((experiment / "report" / "summary.json").read_text())
    assert len(summary["runs"]) == 4
    assert {"train.epochs", "train.model.kind"} <= set(summary["varied_parameters"])
    for run in summary["runs"]:
        per_run = json.loads((experiment / "report" / "runs" / run["run"] / "summary.json").read_text())
        assert per_run == json.loads(json.dumps(run))
        assert per_run["stages"]["ablate"]["status"] == "done"
    assert "variance_retained" in report.table and "train.val_accuracy" in report.table


def test_numbers_in_the_html_are_the_artifacts(report, experiment):
    page = parse(report.index)
    assert len(page.cells) > 200
    datasets = {attrs["data-dataset"] for attrs, _ in page.cells}
    for expected in (
        "variance_retained",
        "id/global/twonn",
        "id/per_domain/mle_levina_bickel",
        "rates/overall/rejection_rate",
        "null/rejection_rate",
        "rates/per_stratum/fiber_rejection_rate",
        "strata/domain_table",
        "best_val_loss",
        "experts/load",
        "ablation/mask/delta_accuracy_low",
        "specialisation/class/nmi",
    ):
        assert expected in datasets, expected
    files = {
        (s, p.name): open_artifact(p)
        for s in ("reduce", "fiber", "train", "ablate")
        for p in (experiment / s).iterdir()
    }
    try:
        for attrs, text in page.cells:
            reader = files[(attrs["data-stage"], attrs["data-uid"])]
            value = reader.read(attrs["data-dataset"])
            index = tuple(int(i) for i in attrs["data-index"].split(",") if i)
            value = value[index] if index else value
            if isinstance(value, (bool, np.bool_)):
                assert text == str(bool(value))
            elif isinstance(value, (float, np.floating)) and math.isnan(value):
                assert text == "n/a"
            else:
                # the full value rides along in data-value; the text shows 3 significant digits
                assert float(attrs["data-value"]) == pytest.approx(float(value), rel=1e-12, abs=1e-300), attrs
                assert float(text.replace(",", "")) == pytest.approx(float(value), rel=5e-3, abs=1e-12), attrs
                if isinstance(value, (int, np.integer)):
                    assert text.replace(",", "") == str(int(value))  # counts print whole
    finally:
        for reader in files.values():
            reader.close()


def test_overview_metrics_are_the_stage_summaries(report, experiment):
    text = report.index.read_text(encoding="utf-8")
    for run in discover(experiment).runs:
        accuracy = json.loads((run.tasks["train"].dir / "summary.json").read_text())["val_accuracy"]
        assert (
            f'data-summary="train.val_accuracy" data-uid="{run.tasks["train"].uid}" '
            f'data-value="{float(accuracy)!r}">{accuracy:.3g}<'
        ) in text


def test_missing_and_failed_stages_are_shown_not_filled(experiment, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(experiment, copy)  # with the report: figures of unchanged artifacts are kept
    runs = discover(copy).runs
    failed = runs[0].tasks["ablate"]
    (failed.dir / "ablate.h5").unlink()
    (failed.dir / "FAILED.txt").write_text(f"ablate {failed.uid} failed at now\nRuntimeError: out of memory\n")
    shutil.rmtree(copy / "fiber")
    result = write_report(copy)
    page = parse(result.index)
    assert any(note.startswith("FAILED") and "out of memory" in note for note in page.missing)
    assert any(note.startswith("MISSING") for note in page.missing)
    assert not any(a["data-stage"] in ("fiber",) or a["data-uid"] == failed.uid for a, _ in page.cells)
    summary = json.loads((copy / "report" / "summary.json").read_text())
    statuses = {r["run"]: r["stages"] for r in summary["runs"]}
    assert any(s.get("ablate", {}).get("status") == "failed" for s in statuses.values())
    assert "failed" in result.table and "missing" in result.table
    for src in page.images:
        assert (result.index.parent / src).is_file()


def test_cli_report_prints_the_table_and_the_index_path(experiment, report, capsys):
    figure = next((experiment / "report" / "figures").glob("ablate-*/utilisation.png"))
    drawn = figure.stat().st_mtime_ns
    assert main(["report", str(experiment)]) == 0
    out = capsys.readouterr().out
    assert f"report: {report.index.resolve()}" in out
    assert "run1-" in out and "variance_retained" in out
    assert figure.stat().st_mtime_ns == drawn  # same artifact, same plotting code: not drawn again


def test_analysis_cli_does_not_import_torch():
    import subprocess
    import sys

    code = (
        "import sys, moespec.cli; moespec.cli.build_parser(); import moespec.analysis.report, "
        "moespec.analysis.compare; assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_a_folder_without_artifacts_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 1
    assert "no artifacts" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 1
    assert "no such experiment folder" in capsys.readouterr().err


def test_a_failed_train_and_its_skipped_ablate_stay_in_their_sweep_point(experiment, tmp_path):
    copy = tmp_path / "sweep"
    shutil.copytree(experiment, copy)
    run = discover(copy).runs[1]
    train, ablate = run.tasks["train"], run.tasks["ablate"]
    (train.dir / "train.h5").unlink()
    (train.dir / "FAILED.txt").write_text(f"train {train.uid} failed at now\nValueError: loss is NaN\n")
    shutil.rmtree(ablate.dir)
    listed = json.loads((copy / "summary.json").read_text())
    for task in listed["tasks"]:
        if task["uid"] == train.uid:
            task.update(status="failed", error="ValueError: loss is NaN")
        if task["uid"] == ablate.uid:
            task.update(status="skipped", error="skipped: its input failed")
    (copy / "summary.json").write_text(json.dumps(listed))
    runs = discover(copy).runs
    assert len(runs) == 4
    broken = next(r for r in runs if r.points == run.points)
    assert broken.status("train") == "failed" and broken.status("ablate") == "missing"
    assert broken.status("reduce") == "done"
    result = write_report(copy)
    assert any("loss is NaN" in note for note in parse(result.index).missing)
    summary = json.loads((copy / "report" / "summary.json").read_text())
    broken_summary = next(r for r in summary["runs"] if r["points"] == list(run.points))
    assert not any(m.startswith(("train.", "ablate.")) for m in broken_summary["metrics"])


def test_cli_report_says_what_it_reads_and_draws_as_it_goes(experiment, report, capsys):
    assert main(["report", str(experiment), "--redraw"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].endswith("reading artifacts and drawing figures (all of them again)")
    drawing = [line for line in out if line.endswith(": reading and drawing")]
    assert {line.split()[0] for line in drawing} >= {"embed", "reduce", "train", "ablate"}
    assert out.index(drawing[-1]) < next(i for i, line in enumerate(out) if line.startswith("report: "))


def test_train_figures_follow_what_the_artifact_holds(experiment, tmp_path):
    """Per-step curves are drawn when the train stage wrote them; validation accuracy has its chance level."""
    import h5py

    from moespec.analysis.loaders import load_section

    copy = tmp_path / "sweep"
    shutil.copytree(experiment, copy, ignore=shutil.ignore_patterns("report"))
    task = next(r.tasks["train"] for r in discover(copy).runs if r.tasks["train"].config["model"]["kind"] == "topk")
    section = load_section(task)
    names = {f.name for f in section.figures}
    assert {"curves_loss", "val_accuracy", "expert_load_curve", "curves_step"} <= names
    loss = next(f for f in section.figures if f.name == "curves_loss").data
    assert any(k.endswith("training") for k in loss["series"]) and any(k.endswith("validation") for k in loss["series"])
    with h5py.File(task.h5_path, "r") as h5:
        target = h5["heldout/target"][()]
        epochs = h5["curves/epoch"][()]
    chance = next(f for f in section.figures if f.name == "val_accuracy").data["reference"]
    assert list(chance.values()) == [pytest.approx(np.bincount(target).max() / len(target))]
    with h5py.File(task.h5_path, "r") as h5:
        n_steps, step_epoch = len(h5["curves/step/index"]), h5["curves/step/epoch"][()]
    steps_per_epoch = int((step_epoch == 1).sum())
    step = next(f for f in section.figures if f.name == "curves_step").data
    assert len(step["series"]["total, training (per step)"]) == n_steps
    assert list(step["xs"]["total, validation (per epoch)"]) == list(steps_per_epoch * epochs)


def test_no_text_of_any_figure_is_cut_off(experiment):
    """Every title, label, tick label, legend and colour-bar label lies inside its saved figure."""
    import matplotlib

    from moespec.analysis.loaders import load_section
    from moespec.analysis.plots import MIN_FONT, clipped_texts, new_figure

    found = discover(experiment)
    tasks = {(t.stage, t.uid): t for r in found.runs for t in r.tasks.values() if t.stage != "embed"}
    checked = 0
    for task in tasks.values():
        for figure in load_section(task).figures:
            with matplotlib.rc_context():
                fig, ax = new_figure(*figure.size)
                figure.plot(figure.data, ax)
                assert clipped_texts(fig) == [], (task.stage, figure.name)
                sizes = [t.get_fontsize() for t in fig.findobj(matplotlib.text.Text) if t.get_text().strip()]
                assert min(sizes) >= MIN_FONT - 1, (task.stage, figure.name)  # cell values: 8 pt, the rest >= 9
            checked += 1
    assert checked >= 40
