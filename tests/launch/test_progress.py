"""What the terminal shows while local jobs run: each task's log records, progress bar count and a heartbeat."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np

from moespec import artifacts
from moespec.config import load_experiment
from moespec.launch import runner
from moespec.launch.plan import make_plan
from tests.builders import tiny_experiment


def _task(tmp_path):
    return SimpleNamespace(
        label="train 0123456789ab", dir=tmp_path, log_path=tmp_path / "log.txt", num_shards=1, shard_index=0
    )


def test_a_watch_shows_new_log_records_progress_and_a_heartbeat(tmp_path):
    task = _task(tmp_path)
    task.log_path.write_text("2026-01-01 00:00:00 INFO an earlier attempt\n")
    watch = runner.TaskWatch(task)
    start = watch.started
    with open(task.log_path, "a") as log:
        log.write(
            "2026-01-01 00:00:01 INFO start train 0123456789ab (experiment t, config below)\nepochs: 3\n"
            "2026-01-01 00:00:02 INFO epoch 1: train loss 0.9 | val accuracy 0.41\n"
            "2026-01-01 00:00:03 WARNING load is uneven\n2026-01-01 00:00:04 INFO epoch 2: tra"
        )
    assert watch.lines(start + 0.5) == [
        "    train 0123456789ab: epoch 1: train loss 0.9 | val accuracy 0.41",
        "    train 0123456789ab: WARNING load is uneven",
    ]
    (tmp_path / "progress.json").write_text(json.dumps({"desc": "train batches", "n": 30, "total": 120}))
    assert watch.lines(start + 1.0) == []  # a progress line waits PROGRESS_S after the last line
    assert watch.lines(start + 4.0) == ["    train 0123456789ab: train batches 30/120 (25%), 4 s"]
    assert watch.lines(start + 5.0) == []
    assert watch.lines(start + 9.5) == ["    train 0123456789ab: running, 10 s; train batches 30/120 (25%)"]
    with open(task.log_path, "a") as log:
        log.write("in 0.8\n")  # the record that was being written
    assert watch.lines(start + 10.0) == ["    train 0123456789ab: epoch 2: train 0.8"]  # shown once complete
    long = "x" * 300
    with open(task.log_path, "a") as log:
        log.write(f"2026-01-01 00:00:05 INFO {long}\n")
    (line,) = watch.lines(start + 11.0)
    assert len(line) == 120 and line.endswith("...")


def test_a_progress_bar_records_its_count_while_it_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(artifacts, "PROGRESS_INTERVAL_S", 0.0)
    writer = artifacts.ArtifactWriter(tmp_path, "embed", "u", schema={})
    seen = []
    for item in writer.progress(range(5), total=5, desc="embed batches"):
        if item:
            seen.append(json.loads(writer.progress_path.read_text()))
    assert [(r["desc"], r["n"], r["total"]) for r in seen] == [("embed batches", n, 5) for n in range(1, 5)]
    assert not writer.progress_path.exists()  # removed when the bar ends


def test_the_failure_reason_is_the_traceback_when_the_message_is_empty(tmp_path):
    task = SimpleNamespace(failed_path=tmp_path / "FAILED.txt")
    task.failed_path.write_text(
        "embed u failed at 2026-01-01\n\n\nTraceback (most recent call last):\n"
        '  File "x.py", line 1, in <module>\nStopIteration\n'
    )
    assert runner._failure_reason(task) == "StopIteration"


def test_local_jobs_print_lines_while_they_run(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "HEARTBEAT_S", 0.5)
    plan = make_plan(load_experiment(tiny_experiment(n_per_domain=2), root=tmp_path))
    messages: list[str] = []
    outcomes = runner.run_plan_local(plan, echo=messages.append)
    assert [o.status for o in outcomes] == ["ran"]
    label = plan.tasks[0].label
    during = [m for m in messages if m.startswith(f"    {label}: ")]
    assert any("running, " in m for m in during), messages
    assert any("built-in corpus: 6 domains" in m for m in during), messages
    assert np.all([len(m) <= 120 for m in during])
