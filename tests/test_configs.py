"""Every experiment file under configs/ loads, validates, plans, and opens with a comment header."""

from __future__ import annotations

from pathlib import Path

import pytest

from moespec.config import load_experiment
from moespec.launch.plan import make_plan

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))


def test_there_are_configs():
    assert any(p.parent.name == "experiments" for p in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_config_validates_and_plans(path, tmp_path):
    experiment = load_experiment(path, root=tmp_path)
    plan = make_plan(experiment)
    assert plan.tasks, f"{path} plans no task"
    lines = path.read_text().splitlines()
    assert lines[0].startswith("#"), f"{path} must open with a comment header"
    header = "\n".join(line for line in lines if line.startswith("#"))
    assert "moespec submit" in header, f"{path}: the header must give the command that runs it"
