"""Code versions: an artifact is current only when the code that would make it now made it.

Changing what a stage computes (its module or any moespec module it imports) makes its artifacts
and their dependants stale; comments, docstrings and layout do not. ``moespec plan`` and
``moespec status`` say why a task is to run: stale, unreadable, failed before or no artifact.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest

from moespec.cli import main
from moespec.config import load_experiment
from moespec.launch import codeversion, donecheck, plan as plan_module
from moespec.launch.plan import make_plan
from moespec.launch.runner import execute_task
from tests.builders import sweep_config, write_config

PACKAGE = Path(codeversion.__file__).resolve().parents[1]


def versions_of(package_parent: Path) -> dict[str, str]:
    """Each stage's code version as a fresh interpreter computes it from the package under ``package_parent``."""
    code = (
        "from moespec.launch.codeversion import stage_code_version as v; "
        "print(' '.join(s + '=' + v(s) for s in ('embed', 'reduce', 'fiber', 'train', 'ablate')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": str(package_parent)},
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(item.split("=") for item in out.split())


def test_code_version_follows_the_code_a_stage_imports_not_its_comments(tmp_path):
    shutil.copytree(PACKAGE, tmp_path / "moespec", ignore=shutil.ignore_patterns("__pycache__"))
    before = versions_of(tmp_path)
    assert before == {stage: codeversion.stage_code_version(stage) for stage in before}
    pca = tmp_path / "moespec" / "geometry" / "pca.py"  # imported by reduce, not by embed
    source = pca.read_text()
    pca.write_text('"""Reworded."""\n# a new comment\n\n' + source.split('"""', 2)[2].lstrip("\n") + "\n\n")
    assert versions_of(tmp_path) == before  # docstring, comments and blank lines only
    pca.write_text(source + "\nSCALE = 2.0\n")
    after = versions_of(tmp_path)
    assert after["reduce"] != before["reduce"] and after["embed"] == before["embed"]
    launch = tmp_path / "moespec" / "launch" / "slurm.py"  # orchestration computes nothing
    launch.write_text(launch.read_text() + "\nX = 1\n")
    assert versions_of(tmp_path) == after


@pytest.fixture
def ran(tmp_path):
    """embed -> reduce (one sweep point each) run in this process; returns the experiment file."""
    config = sweep_config(tmp_path / "results")
    config["sweep"] = {"grid": {"embed.pooling": ["mean"], "reduce.n_components": [2]}}
    path = write_config(tmp_path, config)
    for task in make_plan(load_experiment(path)).tasks:
        execute_task(task)
    return path


def test_changed_stage_code_makes_artifacts_and_dependants_stale(ran, capsys, monkeypatch):
    plan = make_plan(load_experiment(ran))
    embed, reduce = plan.tasks
    with h5py.File(embed.h5_path, "r") as h5:
        assert h5.attrs["code_version"] == embed.code_version and h5.attrs["stage_code"] == embed.stage_code
    assert main(["plan", str(ran)]) == 0 and capsys.readouterr().out.count(" done ") == 2
    changed = {"embed": "0123456789ab"}
    monkeypatch.setattr(
        plan_module, "stage_code_version", lambda stage: changed.get(stage) or codeversion.stage_code_version(stage)
    )
    assert main(["plan", str(ran)]) == 0
    out = capsys.readouterr().out
    assert f"stale: the embed code changed since it was made (code {embed.stage_code} -> 0123456789ab)" in out
    assert f"{reduce.label}: stale: an input was made by changed code since" in out
    assert main(["status", str(ran)]) == 0
    assert "2 not submitted" in capsys.readouterr().out
    # cached mode re-runs a stale task in place; then it is current again
    replanned = make_plan(load_experiment(ran))
    assert execute_task(replanned.tasks[0]).status == "ran" and donecheck.check(replanned.tasks[0]) == (True, "")
    assert execute_task(replanned.tasks[1]).status == "ran" and replanned.tasks[1].is_done()


def test_a_truncated_artifact_is_named_by_plan_status_and_report(ran, capsys):
    pytest.importorskip("matplotlib")
    reduce = make_plan(load_experiment(ran)).tasks_for("reduce")[0]
    data = reduce.h5_path.read_bytes()
    reduce.h5_path.write_bytes(data[: len(data) // 2])
    assert main(["plan", str(ran)]) == 0
    out = capsys.readouterr().out
    assert "unreadable artifact (below)" in out
    assert f"{reduce.label}: unreadable artifact: {reduce.h5_path}: cannot be opened as HDF5 (truncated" in out
    assert main(["status", str(ran)]) == 0
    out = capsys.readouterr().out
    assert f"NOT SUBMITTED {reduce.label}: unreadable artifact: {reduce.h5_path}: cannot be opened" in out
    assert main(["report", str(reduce.root / reduce.experiment)]) == 0
    out = capsys.readouterr().out
    assert f"tasks without a usable artifact:\n  reduce {reduce.uid}: {reduce.h5_path}: cannot be opened" in out
