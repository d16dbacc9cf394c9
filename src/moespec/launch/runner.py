"""Running tasks: one task in this process, and every task of a plan through submitit's local executor.

``execute_task`` is what every job runs (a local subprocess, a SLURM array task, ``moespec run``):
skip-if-done, open the inputs, write the artifact atomically, log beside it, mark failures.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moespec import artifacts
from moespec.config import load_experiment
from moespec.errors import ArtifactError, MoespecError, StageError
from moespec.launch.plan import Plan, Task, make_plan
from moespec.stages.base import stage_module

Mode = Literal["cached", "force", "read-only"]
log = logging.getLogger("moespec")


@dataclass
class TaskOutcome:
    """What happened to one task."""

    task: Task
    status: Literal["ran", "cached", "failed", "skipped"]
    seconds: float = 0.0
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    exception: BaseException | None = None


def _device() -> str:
    forced = os.environ.get("MOESPEC_DEVICE")
    if forced:
        return forced
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def _task_logger(task: Task):
    """A logger writing to the task's ``log.txt`` (and to stderr through the parent logger)."""
    task.dir.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger(f"moespec.task.{task.stage}.{task.uid}.{task.shard_index}")
    logger.setLevel(logging.INFO)
    handler = logging.FileHandler(task.log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger.addHandler(handler)
    try:
        yield logger
    finally:
        logger.removeHandler(handler)
        handler.close()


def _open_inputs(task: Task) -> dict[str, artifacts.ArtifactReader]:
    readers: dict[str, artifacts.ArtifactReader] = {}
    try:
        for name, upstream in task.inputs.items():
            path = artifacts.artifact_dir(task.root, task.experiment, upstream.stage, upstream.uid)
            schema = stage_module(upstream.stage).schema(upstream.config)
            readers[name] = artifacts.open_artifact(path / artifacts.h5_name(upstream.stage), schema)
    except ArtifactError:
        for reader in readers.values():
            reader.close()
        raise
    return readers


def execute_task(task: Task, mode: Mode = "cached") -> TaskOutcome:
    """Run one task in this process unless its artifact is already complete.

    Raises
    ------
    StageError
        The task failed; its log and ``FAILED.txt`` say why, no file is left under a final name.
    ArtifactError
        ``mode="read-only"`` and the artifact is missing.
    """
    if mode != "force" and task.is_done():
        _finish_shards(task)
        return TaskOutcome(task, "cached", summary=_read_summary(task))
    if mode == "read-only":
        raise ArtifactError(f"{task.h5_path}: missing, and mode is read-only ({task.label})")
    started = time.perf_counter()
    with _task_logger(task) as logger:
        logger.info("start %s (experiment %s, config below)\n%s", task.label, task.experiment, task.config_yaml())
        with contextlib.suppress(FileNotFoundError):
            task.failed_path.unlink()
        try:
            summary = _run_stage(task, logger)
        except (KeyboardInterrupt, SystemExit) as e:
            # Preemption and time limits reach the stage as SystemExit from submitit's signal
            # handler, which then requeues the job: an interruption, not a failure (no FAILED.txt).
            logger.warning(
                "interrupted %s (%s); a requeued attempt resumes from %s", task.label, type(e).__name__, task.dir
            )
            raise
        except BaseException as e:
            _record_failure(task, logger, e)
            raise StageError(f"{task.label} failed: {e}\n  log: {task.log_path}") from e
        seconds = time.perf_counter() - started
        logger.info("done %s in %.1f s; summary: %s", task.label, seconds, json.dumps(summary, sort_keys=True))
    # Stamp the fresh artifact so that re-planning stats it instead of reopening it (launch/donecheck.py).
    from moespec.launch.donecheck import write_stamp

    write_stamp(task)
    _finish_shards(task)
    return TaskOutcome(task, "ran", seconds, summary)


def _run_stage(task: Task, logger: logging.Logger) -> dict[str, Any]:
    module = stage_module(task.stage)
    writer = artifacts.ArtifactWriter(
        task.dir,
        task.stage,
        task.uid,
        schema=module.schema(task.config),
        shard_index=task.shard_index,
        num_shards=task.num_shards,
        seed=int(getattr(task.config, "seed", 0) or 0),
        device=_device(),
        logger=logger,
        root_attrs={
            "experiment": task.experiment,
            "config": task.config_yaml(),
            "schema_version": module.SCHEMA_VERSION,
            "input_uids": json.dumps({name: i.uid for name, i in task.inputs.items()}, sort_keys=True),
            # what decides that the artifact is current (launch/codeversion.py)
            "code_version": task.code_version,
            "stage_code": task.stage_code,
            "threads": json.dumps(thread_counts(), sort_keys=True),
        },
    )
    inputs = _open_inputs(task)
    try:
        with artifacts.write_artifact(writer):
            module.run(task.config, inputs, writer)
            summary = _jsonable(writer.summary)
            json.dumps(summary)  # fail inside the block (no artifact) if a stage put non-JSON values there
    finally:
        for reader in inputs.values():
            reader.close()
    summary_text = json.dumps(summary, indent=2)  # the stage's key order: a cached run prints what a fresh one did
    if task.num_shards == 1:
        artifacts.atomic_write_text(task.dir / "config.yaml", task.config_yaml())
        artifacts.atomic_write_text(task.dir / "summary.json", summary_text)
    else:
        artifacts.atomic_write_text(task.dir / f"summary.shard-{task.shard_index:05d}.json", summary_text)
    return summary


def _finish_shards(task: Task) -> None:
    """After a shard task: if every shard is complete, build the one-file view consumers read."""
    if task.num_shards == 1 or artifacts.is_complete(task.dir / artifacts.h5_name(task.stage), task.schema()):
        return
    if artifacts.build_shard_view(task.dir, task.stage, task.num_shards, task.schema()):
        artifacts.atomic_write_text(task.dir / "config.yaml", task.config_yaml())
        summaries = [_read_json(task.dir / f"summary.shard-{i:05d}.json") for i in range(task.num_shards)]
        artifacts.atomic_write_text(task.dir / "summary.json", json.dumps({"shards": summaries}, indent=2))


def _record_failure(task: Task, logger: logging.Logger, error: BaseException) -> None:
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    logger.error("FAILED %s: %s\n%s", task.label, error, text)
    with contextlib.suppress(OSError):
        artifacts.atomic_write_text(
            task.failed_path, f"{task.label} failed at {artifacts.now_iso()}\n{error}\n\n{text}"
        )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _read_summary(task: Task) -> dict[str, Any]:
    return _read_json(task.dir / "summary.json")


def _jsonable(value: Any) -> Any:
    import numpy as np

    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------------------------------------
# whole plans


def run_task_job(task: Task, mode: Mode, threads: int | None = None) -> dict[str, Any]:
    """Entry point of a submitted job (pickled by submitit): set threads, run the task."""
    _configure_threads(threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    outcome = execute_task(task, mode)
    return {"status": outcome.status, "seconds": outcome.seconds, "summary": outcome.summary}


def _configure_threads(threads: int | None) -> None:
    """Hold BLAS, OpenMP and torch to ``threads`` in this process.

    Cluster jobs already start with the thread variables set (before numpy loads, which is when
    OpenBLAS reads them); local jobs inherit this machine's, so the pools are limited here too.
    """
    if not threads:
        return
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    with contextlib.suppress(ImportError):
        import threadpoolctl

        threadpoolctl.threadpool_limits(threads)
    with contextlib.suppress(ImportError):
        import torch

        torch.set_num_threads(threads)


def thread_counts() -> dict[str, int]:
    """Threads this process computes with: each BLAS / OpenMP pool loaded so far, and torch's."""
    counts: dict[str, int] = {}
    with contextlib.suppress(ImportError):
        import threadpoolctl

        for pool in threadpoolctl.threadpool_info():
            key = f"{pool.get('user_api')}:{pool.get('internal_api')}"
            counts[key] = max(counts.get(key, 0), int(pool.get("num_threads") or 0))
    if "torch" in sys.modules:
        counts["torch"] = sys.modules["torch"].get_num_threads()
    return counts


def run_plan_inline(plan: Plan, mode: Mode = "cached", stages: list[str] | None = None) -> list[TaskOutcome]:
    """Run every task of ``plan`` in this process, stage by stage; dependants of a failure are skipped."""
    outcomes: list[TaskOutcome] = []
    failed: set[tuple[str, str]] = set()
    for task in plan.tasks:
        if stages and task.stage not in stages:
            continue
        if any((t.stage, t.uid) in failed for t in plan.upstream_of(task)):
            outcomes.append(TaskOutcome(task, "skipped", error="an upstream task failed"))
            failed.add((task.stage, task.uid))
            continue
        try:
            outcomes.append(execute_task(task, mode))
        except StageError as e:
            failed.add((task.stage, task.uid))
            outcomes.append(TaskOutcome(task, "failed", error=str(e), exception=e.__cause__ or e))
    return outcomes


def run_inline(
    config: Path | str | dict[str, Any],
    *,
    root: Path | str | None = None,
    mode: Mode = "cached",
    stages: list[str] | None = None,
) -> dict[tuple, Path]:
    """Plan and run an experiment in this process (for tests and notebooks).

    Returns
    -------
    dict
        ``{(stage, uid): artifact folder}`` for unsharded tasks, ``(stage, uid, shard)`` for shards.

    Raises
    ------
    StageError
        The first failure (after running everything that did not depend on it).
    """
    plan = make_plan(load_experiment(config, root=root))
    outcomes = run_plan_inline(plan, mode, stages)
    failures = [o for o in outcomes if o.status == "failed"]
    if failures:
        # chained to the first failure's own exception, so callers can see what the stage raised
        raise StageError("\n".join(o.error for o in failures)) from failures[0].exception
    result: dict[tuple, Path] = {}
    for outcome in outcomes:
        task = outcome.task
        key = (task.stage, task.uid) if task.num_shards == 1 else (task.stage, task.uid, task.shard_index)
        result[key] = task.dir
    return result


def run_plan_local(plan: Plan, mode: Mode = "cached", stages: list[str] | None = None, echo=print) -> list[TaskOutcome]:
    """Run the missing tasks of ``plan`` as submitit local jobs (real subprocesses), stage by stage.

    Tasks of a stage run in waves of ``infra.local.max_parallel`` processes, each with an equal
    share of this machine's cores; a stage starts when its upstream stage has finished. Dependants
    of a failed task are not run.
    """
    import submitit

    infra = plan.experiment.infra
    folder = plan.experiment.root / plan.experiment.name / ".submitit" / "%j"
    threads = max(1, (os.cpu_count() or 1) // infra.local.max_parallel)
    outcomes: list[TaskOutcome] = []
    failed: set[tuple[str, str]] = set()
    for stage in plan.stages():
        if stages and stage not in stages:
            continue
        todo: list[Task] = []
        for task in plan.tasks_for(stage):
            if any((t.stage, t.uid) in failed for t in plan.upstream_of(task)):
                outcomes.append(TaskOutcome(task, "skipped", error="an upstream task failed"))
                failed.add((task.stage, task.uid))
            elif mode != "force" and task.is_done():
                _finish_shards(task)
                outcomes.append(TaskOutcome(task, "cached", summary=_read_summary(task)))
            elif mode == "read-only":
                raise ArtifactError(f"{task.h5_path}: missing, and mode is read-only ({task.label})")
            else:
                todo.append(task)
        if not todo:
            continue
        echo(
            f"[{stage}] running {len(todo)} task{'s' if len(todo) != 1 else ''} as local jobs "
            f"({infra.local.max_parallel} at a time)"
        )
        resources = infra.resources_for(stage)
        executor = submitit.LocalExecutor(folder=str(folder))
        executor.update_parameters(timeout_min=resources.timeout_min)
        for start in range(0, len(todo), infra.local.max_parallel):
            wave = todo[start : start + infra.local.max_parallel]
            watches = [TaskWatch(task) for task in wave]
            jobs = executor.map_array(run_task_job, wave, [mode] * len(wave), [threads] * len(wave))
            _follow(watches, jobs, echo)
            for task, job in zip(wave, jobs):
                outcomes.append(_collect(task, job, echo))
                if outcomes[-1].status == "failed":
                    failed.add((task.stage, task.uid))
    return outcomes


#: Seconds between two polls of the running local jobs.
POLL_S = 1.0
#: Seconds between two progress-bar lines of one task (its log records are shown as they come).
PROGRESS_S = 3.0
#: A running task gets a line at least this often, even when its log and progress say nothing new.
HEARTBEAT_S = 5.0
_LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d (INFO|WARNING|ERROR|CRITICAL) (.*)$")


class TaskWatch:
    """What the parent shows of one running local job: its new log records, its progress bar, a heartbeat.

    The job writes its log to ``log.txt`` and its progress bar's count to ``progress.json``
    (:meth:`moespec.artifacts.ArtifactWriter.progress`); the parent reads both while it waits.
    """

    def __init__(self, task: Task, width: int = 120):
        self.task = task
        self.width = width
        self.offset = task.log_path.stat().st_size if task.log_path.exists() else 0  # earlier attempts
        self.started = self.last_line = time.monotonic()
        self.last_progress = ""

    def lines(self, now: float, final: bool = False) -> list[str]:
        """The lines to print now (each at most ``width`` columns)."""
        texts = self._new_records()
        progress = self._progress()
        if (
            not final
            and progress
            and progress != self.last_progress
            and not texts
            and now - self.last_line >= PROGRESS_S
        ):
            texts.append(f"{progress}, {now - self.started:.0f} s")
        elif not final and not texts and now - self.last_line >= HEARTBEAT_S:
            texts.append(f"running, {now - self.started:.0f} s" + (f"; {progress}" if progress else ""))
        if texts:
            self.last_progress = progress or self.last_progress
            self.last_line = now
        prefix = f"    {self.task.label}: "
        return [_clip(prefix + text, self.width) for text in texts]

    def _new_records(self) -> list[str]:
        try:
            with open(self.task.log_path, "rb") as stream:
                stream.seek(self.offset)
                chunk = stream.read()
        except OSError:
            return []
        complete = chunk[: chunk.rfind(b"\n") + 1]  # a record still being written waits for the next poll
        self.offset += len(complete)
        records = []
        for line in complete.decode("utf-8", errors="replace").splitlines():
            match = _LOG_RECORD.match(line)  # continuation lines (the config, a traceback) are in log.txt
            if match and not match.group(2).startswith(("start ", "done ")):
                level, message = match.groups()
                records.append(message if level == "INFO" else f"{level} {message}")
        return records

    def _progress(self) -> str:
        path = self.task.dir / (
            "progress.json" if self.task.num_shards == 1 else f"progress.shard-{self.task.shard_index:05d}.json"
        )
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return ""
        total = record.get("total")
        done = f"{record['n']}/{total} ({100 * record['n'] / total:.0f}%)" if total else f"{record['n']}"
        return f"{record.get('desc') or 'progress'} {done}"


def _clip(line: str, width: int) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def _follow(watches: list[TaskWatch], jobs: list[Any], echo) -> None:
    """Print each running job's progress until every job of the wave has ended."""
    finished: set[int] = set()
    while len(finished) < len(jobs):
        time.sleep(POLL_S)
        now = time.monotonic()
        for index, (watch, job) in enumerate(zip(watches, jobs)):
            if index in finished:
                continue
            done = job.done()
            for line in watch.lines(now, final=done):
                echo(line)
            if done:
                finished.add(index)


def _collect(task: Task, job: Any, echo) -> TaskOutcome:
    import submitit

    started = time.perf_counter()
    try:
        result = job.result()
    except (submitit.core.utils.FailedJobError, submitit.core.utils.UncompletedJobError) as e:
        reason = _failure_reason(task) or _job_error(job) or str(e).strip().splitlines()[-1]
        echo(f"  FAILED {task.label}: {reason}\n    log: {task.log_path}")
        return TaskOutcome(task, "failed", time.perf_counter() - started, error=reason)
    echo(f"  done   {task.label} in {result['seconds']:.1f} s")
    return TaskOutcome(task, result["status"], result["seconds"], result["summary"])


def _failure_reason(task: Task) -> str:
    """The error of a failed task from its ``FAILED.txt``: the message, else the traceback's last line."""
    try:
        lines = task.failed_path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return ""
    if len(lines) > 1 and lines[1].strip():
        return lines[1]
    return next((line for line in reversed(lines) if line.strip()), "")


def _job_error(job: Any) -> str:
    """The last error line of a job that failed before the task could write ``FAILED.txt``."""
    try:
        text = job.stderr() or ""
    except OSError:
        return ""
    errors = [line for line in text.splitlines() if re.match(r"^[A-Za-z_.]*(Error|Exception|Interrupt)\b", line)]
    return errors[-1] if errors else ""


def plan_from_file(path: Path | str, root: Path | str | None = None) -> Plan:
    return make_plan(load_experiment(path, root=root))


__all__ = [
    "execute_task",
    "run_inline",
    "run_plan_inline",
    "run_plan_local",
    "run_task_job",
    "TaskOutcome",
    "plan_from_file",
    "MoespecError",
]
