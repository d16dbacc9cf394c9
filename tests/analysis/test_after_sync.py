"""Re-analysis of what a default `moespec sync --from-hpc` brings back.

A full results tree (the cluster's copy) is filtered with the pull rules shipped in
sync/remotes.example.yaml, exactly as the sync planner applies them; the report and the comparison of
the filtered copy must show every number and figure of the full one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from moespec.analysis.compare import compare
from moespec.analysis.report import write_report
from moespec.analysis.results import discover
from moespec.sync.filters import Filters
from moespec.sync.remotes import load_remotes
from tests.builders import parse, built_sweep

REPO = Path(__file__).resolve().parents[2]


def default_pull_filters(remote: str | None = None) -> Filters:
    settings = load_remotes(REPO / "sync" / "remotes.example.yaml").get(remote).pull
    return Filters.build(default_include=settings.include, default_exclude=settings.exclude)


def pulled_copy(experiment: Path, root: Path, filters: Filters) -> tuple[Path, list[str]]:
    """Copy what the filters select (paths relative to the results root, as sync matches them)."""
    left = []
    for path in sorted(p for p in experiment.rglob("*") if p.is_file()):
        relative = path.relative_to(experiment.parent).as_posix()
        if relative.split("/")[1] == "report":
            continue  # the cluster's own report is not what is compared
        if not filters.selects(relative):
            left.append(relative)
            continue
        target = root / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    return root / experiment.name, left


def _numbers(index: Path) -> set[tuple]:
    return {
        (a["data-stage"], a["data-uid"], a["data-dataset"], a["data-index"], a["data-value"], text)
        for a, text in parse(index).cells
    }


def _summary_metrics(index: Path) -> dict:
    summary = json.loads((index.parent / "summary.json").read_text())
    return {r["run"]: (r["metrics"], r["parameters"], r["points"]) for r in summary["runs"]}


@pytest.fixture(scope="module")
def experiment(tmp_path_factory) -> Path:
    return built_sweep(tmp_path_factory)


@pytest.mark.parametrize("remote", ["mycluster", "other"])
def test_default_sync_keeps_every_number_and_figure_of_the_report(experiment, tmp_path, remote):
    copy, left = pulled_copy(experiment, tmp_path / "local", default_pull_filters(remote))
    assert any(p.endswith("embed.h5") for p in left) and any(p.endswith(".pt") for p in left)  # large stay
    full = write_report(experiment, tmp_path / "full-report")
    pulled = write_report(copy, tmp_path / "pulled-report")
    assert _numbers(pulled.index) == _numbers(full.index) and len(_numbers(full.index)) > 200
    assert parse(pulled.index).images == parse(full.index).images
    assert _summary_metrics(pulled.index) == _summary_metrics(full.index)
    assert parse(pulled.index).missing == []
    runs = discover(copy).runs
    assert len(runs) == 4 and all(r.status("embed") == "not pulled" for r in runs)
    assert all(r.status(s) == "done" for r in runs for s in ("reduce", "fiber", "train", "ablate"))
    assert "done (arrays not pulled)" in pulled.index.read_text(encoding="utf-8")
    for metric in ("train.val_accuracy", "ablate.nmi_class[0]", "fiber.rejection_rate"):
        assert compare([copy], sort_by=metric).rows == [
            {**row, "status.embed": "not pulled"} for row in compare([experiment], sort_by=metric).rows
        ]


def test_a_summary_without_its_arrays_is_shown_as_not_pulled(experiment, tmp_path):
    copy, _ = pulled_copy(experiment, tmp_path / "local", default_pull_filters())
    fiber = next((copy / "fiber").iterdir())
    (fiber / "fiber.h5").unlink()  # as if pulled with --exclude 'fiber/**/*.h5'
    result = write_report(copy)
    notes = parse(result.index).missing
    assert any(n.startswith("NOT PULLED") and f"--include 'fiber/{fiber.name}/**'" in n for n in notes)
    summary = json.loads((copy / "report" / "summary.json").read_text())
    # its summary's numbers still count, in the overview and in compare
    assert all(
        r["metrics"]["fiber.rejection_rate"] == json.loads((fiber / "summary.json").read_text())["rejection_rate"]
        for r in summary["runs"]
    )
    assert len(discover(copy).runs) == 4


def test_a_run_whose_inputs_are_not_here_is_never_joined_to_another(experiment, tmp_path):
    copy, _ = pulled_copy(experiment, tmp_path / "local", default_pull_filters())
    reduce = next((copy / "reduce").iterdir())
    (reduce / "reduce.h5").unlink()  # reduce recorded its input (the embed uid) only in its HDF5 file
    listed = json.loads((copy / "summary.json").read_text())
    # with the experiment's summary.json (sweep points of every task) the chains are whole again
    assert all(r.status("embed") == "not pulled" for r in discover(copy).runs)
    (copy / "summary.json").unlink()
    runs = discover(copy).runs
    closed = [r for r in runs if not r.unlinked]
    assert len(closed) == 4 and all(r.status("embed") == "unknown" and "embed" not in r.tasks for r in closed)
    apart = [r for r in runs if r.unlinked]
    assert [list(r.tasks) for r in apart] == [["embed"]] and apart[0].name.startswith("unlinked-embed-")
    assert apart[0].status("train") == "unknown"
    assert len(listed["tasks"]) > 0
