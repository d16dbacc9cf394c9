"""Task states from the artifacts, the submission records and the scheduler (``moespec status``).

A task is ``done`` when its artifact is complete and current (made by the code that would run it
now), whatever the scheduler says. Otherwise its newest submission record names its job, and the
scheduler says whether that job is ``running``, ``cancelling`` (cancelled, but its processes are
still ending), ``pending`` (queued, held by a dependency, requeued after preemption) or ended
without an artifact (``failed``: failed, cancelled, timed out, out of memory...). sacct is read
for the history and squeue for the controller's live view, which has no accounting lag. A task
no record mentions is ``not submitted`` (or ``failed`` if a local run left a ``FAILED.txt``);
either way ``detail`` says why it is not done when an artifact is there (stale, unreadable).
When the scheduler cannot be reached the state of a submitted task is ``unknown``; that is
logged, not fatal.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

from moespec.launch import donecheck, scheduler
from moespec.launch.arrays import TaskKey, task_key
from moespec.launch.plan import Plan, Task
from moespec.launch.records import RecordedTask, latest_entries, load_records
from moespec.launch.scheduler import JobState

STATES = ("done", "running", "cancelling", "pending", "failed", "not submitted", "unknown")


@dataclass(frozen=True)
class TaskStatus:
    """The state of one task and where to look when it failed."""

    task: Task
    index: int
    state: str
    detail: str = ""
    job_id: str = ""
    scheduler_log: Path | None = None

    @property
    def key(self) -> TaskKey:
        return task_key(self.task)


def classify(
    done: bool,
    entry: RecordedTask | None,
    job: JobState | None,
    *,
    scheduler_reachable: bool,
    failed_marker: bool,
    array_known: bool = False,
) -> tuple[str, str]:
    """The state of one task and a short detail, from what is known about it (pure).

    Parameters
    ----------
    done : bool
        The artifact is complete.
    entry : RecordedTask or None
        The task's newest submission record entry.
    job : JobState or None
        What sacct says about its job (None: not known to sacct).
    scheduler_reachable : bool
        Whether sacct answered at all.
    failed_marker : bool
        The task's ``FAILED.txt`` exists.
    array_known : bool
        sacct lists other tasks of the same array. A pending array task cancelled on its own
        leaves no accounting record at all (Slurm 22.05 drops it from the array's meta record).
    """
    if done:
        return "done", ""
    if entry is None:
        return ("failed", "failed in a local run") if failed_marker else ("not submitted", "")
    if entry.job_id is None:
        return "not submitted", f"scripts emitted (submission {entry.submission}) but submit.sh has not run"
    if not scheduler_reachable:
        return "unknown", f"job {entry.job_id}: the scheduler cannot be asked"
    if job is None:
        if failed_marker:
            return "failed", f"job {entry.job_id} (no longer in accounting)"
        if array_known:
            return "failed", f"job {entry.job_id} is gone from its array (cancelled while pending?)"
        return "unknown", f"job {entry.job_id} is not known to sacct"
    if job.state == "COMPLETING" and job.ending == "CANCELLED":
        return "cancelling", "CANCELLED, its processes still ending (COMPLETING)"
    if job.phase == "running":
        return "running", job.state
    if job.phase == "pending":
        return "pending", job.state + (f" ({job.reason})" if job.reason and job.reason != "None" else "")
    if job.state == "CANCELLED" and job.reason == "no longer queued":
        return "failed", "CANCELLED while pending (no longer queued)"
    if job.state == "COMPLETED":
        return "failed", "job COMPLETED but the artifact is missing or invalid"
    exit_code = f", exit {job.exit_code}" if job.exit_code and job.exit_code != "0:0" else ""
    return "failed", f"{job.state}{exit_code}"


def collect_status(plan: Plan, *, ask_scheduler: bool = True) -> list[TaskStatus]:
    """The state of every task of ``plan``, in ``plan.tasks_for`` order (one sacct call in all)."""
    experiment = plan.experiment
    entries = latest_entries(load_records(experiment.root, experiment.name))
    tasks = [(index, task) for stage in plan.stages() for index, task in enumerate(plan.tasks_for(stage))]
    checks = {task_key(task): donecheck.check(task) for _, task in tasks}
    done = {key: check[0] for key, check in checks.items()}
    waiting = [entries[task_key(t)] for _, t in tasks if not done[task_key(t)] and task_key(t) in entries]
    array_ids = sorted({e.array_job_id for e in waiting if e.array_job_id})
    states = scheduler.job_states(array_ids) if (ask_scheduler and array_ids) else {}
    reachable = states is not None
    if states is not None and array_ids and ask_scheduler:  # new jobs may not be in accounting yet
        states = scheduler.merge_states(states, scheduler.live_states(array_ids))
    known_arrays = {job_id.split("_")[0] for job_id in states or {}}
    statuses = []
    for index, task in tasks:
        key = task_key(task)
        entry = entries.get(key)
        job = (states or {}).get(entry.job_id) if entry and entry.job_id else None
        state, detail = classify(
            done[key],
            entry,
            job,
            scheduler_reachable=reachable and ask_scheduler,
            failed_marker=not done[key] and task.failed_path.exists(),
            array_known=bool(entry and entry.array_job_id in known_arrays),
        )
        why_not_done = checks[key][1]
        if why_not_done and state in ("not submitted", "failed", "unknown"):
            detail = f"{detail}; {why_not_done}" if detail else why_not_done
        statuses.append(
            TaskStatus(
                task, index, state, detail, (entry.job_id or "") if entry else "", entry.log_path if entry else None
            )
        )
    return statuses


def tail(path: Path | None, lines: int = 5) -> list[str]:
    """The last non-empty lines of a text file ([] when it cannot be read)."""
    if path is None:
        return []
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            last = deque((line.rstrip() for line in handle if line.strip()), maxlen=lines)
    except OSError:
        return []
    return list(last)


def failure_report(status: TaskStatus, lines: int = 5) -> list[str]:
    """What to show for a failed task: where its logs are and the last lines of the error."""
    task = status.task
    report = [
        f"FAILED {task.label} (task {status.index}{', job ' + status.job_id if status.job_id else ''}): "
        f"{status.detail}",
        f"  log: {task.log_path}",
    ]
    if status.scheduler_log is not None:
        report.append(f"  scheduler log: {status.scheduler_log}")
    error = tail(task.failed_path, lines) or tail(status.scheduler_log, lines)
    report += [f"  | {line}" for line in error]
    return report
