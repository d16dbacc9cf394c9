"""Running tasks for real: skip-if-done modes, failures, logs beside artifacts, shards, local jobs."""

from __future__ import annotations

import json

import pytest
import yaml

from moespec.artifacts import open_artifact
from moespec.config import load_experiment
from moespec.errors import ArtifactError, StageError
from moespec.launch.plan import make_plan
from moespec.launch.runner import execute_task, run_inline, run_plan_local
from tests.builders import tiny_experiment


def test_run_writes_artifact_config_summary_and_log(tmp_path):
    arts = run_inline(tiny_experiment(), root=tmp_path)
    (((stage, uid), folder),) = arts.items()
    assert stage == "embed" and folder == tmp_path / "t" / "embed" / uid
    assert {p.name for p in folder.iterdir()} >= {"embed.h5", "config.yaml", "summary.json", "log.txt"}
    assert yaml.safe_load((folder / "config.yaml").read_text())["model"]["name"] == "builtin:tiny-bert"
    assert json.loads((folder / "summary.json").read_text())
    assert "done embed" in (folder / "log.txt").read_text()
    with open_artifact(folder) as reader:
        assert reader.attrs["uid"] == uid and reader.attrs["stage"] == "embed"


def test_modes_cached_force_read_only(tmp_path):
    plan = make_plan(load_experiment(tiny_experiment(), root=tmp_path))
    task = plan.tasks[0]
    with pytest.raises(ArtifactError, match="read-only"):
        execute_task(task, "read-only")
    assert execute_task(task).status == "ran"
    mtime = task.h5_path.stat().st_mtime_ns
    assert execute_task(task).status == "cached"
    assert execute_task(task, "read-only").status == "cached"
    assert task.h5_path.stat().st_mtime_ns == mtime
    assert execute_task(task, "force").status == "ran"
    assert task.h5_path.stat().st_mtime_ns != mtime


def test_failure_is_marked_and_leaves_no_artifact(tmp_path):
    bad = tmp_path / "texts.jsonl"
    bad.write_text('{"body": "hello there"}\n{"body": "general kenobi"}\n')
    config = tiny_experiment()
    config["embed"]["data"] = [{"kind": "files", "paths": [str(bad)], "text_field": "text", "domain": "mine"}]
    plan = make_plan(load_experiment(config, root=tmp_path))
    task = plan.tasks[0]
    with pytest.raises(StageError, match="text"):
        execute_task(task)
    assert task.state() == "failed"
    assert not task.h5_path.exists() and not list(task.dir.glob("*.tmp"))
    assert "FAILED" in task.log_path.read_text()
    assert "text" in task.failed_path.read_text()


def test_shards_are_read_as_one_dataset(tmp_path):
    config = tiny_experiment(n_per_domain=3)
    whole = run_inline(config, root=tmp_path / "a")
    config["embed"]["shards"] = 3
    sharded = run_inline(config, root=tmp_path / "b")
    assert len(sharded) == 3
    with open_artifact(next(iter(whole.values()))) as one, open_artifact(next(iter(sharded.values()))) as many:
        assert many["embeddings"].is_virtual
        assert many["embeddings"].shape == one["embeddings"].shape
        assert abs(many["embeddings"][:] - one["embeddings"][:]).max() < 1e-5
        assert list(many.read("text_id")) == list(one.read("text_id"))


def test_local_executor_runs_real_subprocesses(tmp_path):
    plan = make_plan(load_experiment(tiny_experiment(n_per_domain=2), root=tmp_path))
    messages = []
    outcomes = run_plan_local(plan, echo=messages.append)
    assert [o.status for o in outcomes] == ["ran"]
    assert plan.tasks[0].is_done()
    assert list((tmp_path / "t" / ".submitit").iterdir())  # submitit's job folders: a real subprocess ran
    again = run_plan_local(plan, echo=messages.append)
    assert [o.status for o in again] == ["cached"]
