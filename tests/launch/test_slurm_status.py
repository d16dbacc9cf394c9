"""Task states from artifacts, submission records and sacct output (no scheduler needed)."""

from __future__ import annotations

import pytest

from moespec.config import load_experiment
from moespec.errors import ClusterError
from moespec.launch import scheduler
from moespec.launch.plan import make_plan
from moespec.launch.records import RecordedTask, latest_entries, load_records, write_record
from moespec.launch.runner import execute_task
from moespec.launch.scheduler import JobState, expand_job_ids, merge_states, parse_sacct, parse_squeue
from moespec.launch.status import classify, collect_status, failure_report
from tests.builders import sweep_config

SACCT = """\
41_0|COMPLETED|0:0|None
41_1|FAILED|1:0|NonZeroExitCode
42_[2-4%2]|PENDING|0:0|Dependency
42_0|RUNNING|0:0|None
42_1|CANCELLED by 0|0:0|None
43|TIMEOUT|0:15|TimeLimit
43.batch|CANCELLED|0:15|
"""


def entry(job: str | None = "42", index: int = 0, single: bool = False) -> RecordedTask:
    return RecordedTask(("embed", "u", 0), index, index, "embed.0", job, "/logs/%A_%a.err", "s1", "slurm", single)


def test_parse_sacct_expands_array_ranges_and_drops_steps():
    states = parse_sacct(SACCT)
    assert states["42_3"].state == "PENDING" and states["42_3"].reason == "Dependency"
    assert states["42_1"].state == "CANCELLED"
    assert states["43"].state == "TIMEOUT" and "43.batch" not in states
    assert expand_job_ids("7_[1-2,5]") == ["7_1", "7_2", "7_5"] and expand_job_ids("7_3") == ["7_3"]
    assert [states[j].phase for j in ("41_0", "42_0", "42_2", "41_1")] == ["finished", "running", "pending", "finished"]


@pytest.mark.parametrize(
    "done, recorded, job, reachable, marker, expected",
    [
        (True, None, None, True, False, "done"),
        (False, None, None, True, False, "not submitted"),
        (False, None, None, True, True, "failed"),
        (False, "none", None, True, False, "not submitted"),
        (False, "42", None, False, False, "unknown"),
        (False, "42", None, True, False, "unknown"),
        (False, "42", "array known", True, False, "failed"),
        (False, "42", JobState("42_0", "RUNNING"), True, False, "running"),
        (False, "42", JobState("42_0", "REQUEUED"), True, True, "pending"),
        (False, "42", JobState("42_0", "PENDING", reason="Dependency"), True, False, "pending"),
        (False, "42", JobState("42_0", "CANCELLED"), True, False, "failed"),
        (False, "42", JobState("42_0", "OUT_OF_MEMORY"), True, False, "failed"),
        (False, "42", JobState("42_0", "COMPLETED"), True, False, "failed"),
        (False, "42", JobState("42_0", "COMPLETING", ending="CANCELLED"), True, False, "cancelling"),
        (False, "42", JobState("42_0", "COMPLETING"), True, False, "running"),
    ],
)
def test_classify(done, recorded, job, reachable, marker, expected):
    recorded_entry = None if recorded is None else entry(None if recorded == "none" else recorded)
    array_known = job == "array known"
    job = None if array_known else job
    state, detail = classify(
        done, recorded_entry, job, scheduler_reachable=reachable, failed_marker=marker, array_known=array_known
    )
    assert state == expected
    if job is not None and job.state == "COMPLETED":
        assert "artifact is missing" in detail


def test_live_states_correct_sacct_lag_and_cancelling():
    accounted = parse_sacct(
        "9_0|CANCELLED by 0|0:0|None\n9_1|PENDING|0:0|None\n9_2|PENDING|0:0|None\n9_3|FAILED|1:0|None\n"
    )
    live = parse_squeue("9_0|COMPLETING|None\n9_2|PENDING|Dependency\n9_3|FAILED|NonZeroExitCode\n")
    merged = merge_states(accounted, live)
    assert (merged["9_0"].state, merged["9_0"].ending) == ("COMPLETING", "CANCELLED")  # processes still ending
    assert (merged["9_1"].state, merged["9_1"].reason) == ("CANCELLED", "no longer queued")  # sacct lags
    assert merged["9_2"].reason == "Dependency" and merged["9_3"].exit_code == "1:0"
    assert merge_states(accounted, None) == accounted  # squeue no longer knows these jobs
    assert merge_states({}, parse_squeue("9_0|PENDING|None\n"))["9_0"].phase == "pending"  # not in accounting yet
    assert classify(False, entry("9", 1), merged["9_1"], scheduler_reachable=True, failed_marker=False)[0] == "failed"


def test_recorded_task_ids_and_logs():
    assert entry("42", 3).job_id == "42_3" and str(entry("42", 3).log_path) == "/logs/42_3.err"
    assert entry("42", 0, single=True).job_id == "42"
    assert entry(None).job_id is None and entry(None).log_path is None


def _record(plan, job_id, stage="embed"):
    tasks = plan.tasks_for(stage)
    return {
        "id": "x",
        "executor": "slurm",
        "arrays": [
            {
                "name": f"{stage}.0",
                "stage": stage,
                "chunk": 0,
                "job_id": job_id,
                "single": False,
                "log": "",
                "tasks": [[t.uid, t.shard_index, i, i] for i, t in enumerate(tasks)],
            }
        ],
    }


def test_collect_status_asks_sacct_once_and_newest_record_wins(tmp_path, monkeypatch):
    plan = make_plan(load_experiment(sweep_config(tmp_path)))
    exp_dir = tmp_path / "sw" / ".submissions"
    write_record(exp_dir / "20200101-000000-aaaaaa.json", _record(plan, "41"))
    write_record(exp_dir / "20200101-000001-bbbbbb.json", _record(plan, "42"))
    (exp_dir / "20200101-000002-cccccc.json").write_text("{ not json")
    assert [r["id"] for r in load_records(tmp_path, "sw")] == ["x", "x"]
    assert latest_entries(load_records(tmp_path, "sw"))[("embed", plan.tasks_for("embed")[0].uid, 0)].job_id == "42_0"
    execute_task(plan.tasks_for("embed")[1])
    calls = []

    def fake_slurm(args, **kwargs):
        calls.append(args)
        return SACCT if args[0] == "sacct" else "42_0|RUNNING|None\n42_1|CANCELLED|None\n"

    monkeypatch.setattr(scheduler, "run_slurm", fake_slurm)
    statuses = collect_status(plan)
    # one sacct and one squeue call, about the jobs of tasks that are not done only
    assert [(c[0], c[-1]) for c in calls] == [("sacct", "42"), ("squeue", "42")]
    by_stage = {(s.task.stage, s.index): s for s in statuses}
    assert by_stage[("embed", 0)].state == "running" and by_stage[("embed", 0)].job_id == "42_0"
    assert by_stage[("embed", 1)].state == "done"  # the artifact wins over CANCELLED
    assert all(by_stage[("reduce", i)].state == "not submitted" for i in range(6))


def test_scheduler_unreachable_gives_unknown_not_an_error(tmp_path, monkeypatch):
    plan = make_plan(load_experiment(sweep_config(tmp_path)))
    write_record(tmp_path / "sw" / ".submissions" / "r.json", _record(plan, "42"))

    def down(args, **kwargs):
        raise ClusterError("sacct: error: slurmdbd: Connection refused")

    monkeypatch.setattr(scheduler, "run_slurm", down)
    statuses = collect_status(plan)
    assert {s.state for s in statuses if s.task.stage == "embed"} == {"unknown"}


def test_failure_report_shows_logs_and_last_error_lines(tmp_path):
    plan = make_plan(load_experiment(sweep_config(tmp_path)))
    task = plan.tasks_for("embed")[0]
    task.dir.mkdir(parents=True)
    err = tmp_path / "job.err"
    err.write_text("\n".join(f"line {i}" for i in range(20)) + "\nValueError: boom\n")
    from moespec.launch.status import TaskStatus

    report = failure_report(TaskStatus(task, 0, "failed", "FAILED, exit 1:0", "42_0", err))
    assert report[0].startswith(f"FAILED {task.label} (task 0, job 42_0): FAILED, exit 1:0")
    assert f"log: {task.log_path}" in report[1] and f"scheduler log: {err}" in report[2]
    assert report[-1] == "  | ValueError: boom" and len(report) == 3 + 5
    task.failed_path.write_text("embed failed\nDataError: no texts\n")
    assert failure_report(TaskStatus(task, 0, "failed", "", "", err))[-1] == "  | DataError: no texts"


def test_run_slurm_retries_then_raises(monkeypatch):
    import subprocess

    attempts = []

    class Done:
        returncode, stdout, stderr = 1, "", "slurm_load_jobs error: Socket timed out"

    def fake_run(args, **kwargs):
        attempts.append(args)
        return Done()

    monkeypatch.setattr(scheduler.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(subprocess, "run", fake_run)
    monkeypatch.setattr(scheduler, "RETRY_DELAYS_S", (0.0, 0.0))
    monkeypatch.setattr(scheduler.time, "sleep", lambda s: None)
    with pytest.raises(ClusterError, match="Socket timed out"):
        scheduler.run_slurm(["squeue"], retries=2)
    assert len(attempts) == 3
