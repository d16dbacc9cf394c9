"""Submission records: which job runs which task, kept beside the artifacts.

Every cluster submission writes ``<root>/<experiment>/.submissions/<id>.json`` (rewritten after
each array is submitted, so a submission cut short still says what went out). ``moespec status``
reads them to ask the scheduler about the right jobs; the newest record of a task wins.

For scripts emitted with ``--emit-sbatch`` the job ids are only known when the user runs
``submit.sh``; it appends ``<array name> <job id>`` lines to ``job_ids.txt`` in the script folder,
which the record points to (paths relative to the record, so that a project copied to a cluster
with its scripts and results keeps them).
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moespec import artifacts
from moespec.launch.arrays import ArrayJob, TaskKey

log = logging.getLogger("moespec.slurm")

#: 2: array indices are positions in the array (version 1 stored ``task index - chunk offset``).
RECORD_VERSION = 2


@dataclass(frozen=True)
class RecordedTask:
    """One task of one submitted (or emitted) array."""

    key: TaskKey
    task_index: int
    array_index: int
    array_name: str
    array_job_id: str | None
    log_pattern: str
    submission: str
    executor: str
    single: bool = False

    @property
    def job_id(self) -> str | None:
        """``<array id>_<index>`` (the job id of a single job), None while emitted scripts wait to be submitted."""
        if not self.array_job_id:
            return None
        return self.array_job_id if self.single else f"{self.array_job_id}_{self.array_index}"

    @property
    def log_path(self) -> Path | None:
        """The scheduler's stderr file of this task (``%A``, ``%a``, ``%j`` filled in)."""
        if not self.array_job_id or not self.log_pattern:
            return None
        pattern = self.log_pattern.replace("%A", self.array_job_id).replace("%a", str(self.array_index))
        return Path(pattern.replace("%j", self.job_id or ""))


def experiment_dir(root: Path, experiment: str) -> Path:
    return Path(root) / experiment


def records_dir(root: Path, experiment: str) -> Path:
    return experiment_dir(root, experiment) / ".submissions"


def new_submission_id() -> str:
    """Sortable by time, unique enough for two submissions in the same second."""
    return time.strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)


def array_entry(array: ArrayJob, job_id: str | None, log_pattern: str, *, single: bool = False) -> dict[str, Any]:
    """The JSON form of one array of a record (``single``: submitted as a plain job, not an array)."""
    return {
        "name": array.name,
        "stage": array.stage,
        "chunk": array.chunk,
        "job_id": job_id,
        "single": single,
        "array_spec": array.array_spec(),
        "after": list(array.after),
        "after_jobs": list(array.after_jobs),
        "after_corresponding": list(array.after_corresponding),
        "log": log_pattern,
        "tasks": [
            [t.uid, t.shard_index, index, position]
            for position, (t, index) in enumerate(zip(array.tasks, array.task_indices))
        ],
    }


def write_record(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    artifacts.atomic_write_text(path, json.dumps({"version": RECORD_VERSION, **record}, indent=1))


def load_records(root: Path, experiment: str) -> list[dict[str, Any]]:
    """Every readable record of an experiment, oldest first (unreadable ones are logged and skipped)."""
    folder = records_dir(root, experiment)
    records = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            record = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            log.warning("skipping unreadable submission record %s: %s", path, e)
            continue
        record["path"] = str(path)
        records.append(record)
    return records


def _beside(record: dict[str, Any], path: str) -> str:
    """A path of a record, relative to the record's folder (or absolute), as seen from here."""
    return str(Path(record.get("path", ".")).parent / path) if path else ""


def _emitted_job_ids(record: dict[str, Any]) -> dict[str, str]:
    path = record.get("job_ids_file")
    if not path:
        return {}
    try:
        lines = Path(_beside(record, path)).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    found = {}
    for line in lines:
        parts = line.split()
        if len(parts) == 2:
            found[parts[0]] = parts[1]
    return found


def latest_entries(records: list[dict[str, Any]]) -> dict[TaskKey, RecordedTask]:
    """Task key -> its entry in the newest record that has it."""
    latest: dict[TaskKey, RecordedTask] = {}
    for record in records:
        emitted = _emitted_job_ids(record)
        for array in record.get("arrays", []):
            job_id = array.get("job_id") or emitted.get(array["name"])
            for uid, shard, task_index, array_index in array["tasks"]:
                key = (array["stage"], uid, int(shard))
                latest[key] = RecordedTask(
                    key,
                    int(task_index),
                    int(array_index),
                    array["name"],
                    job_id,
                    _beside(record, array.get("log", "")),
                    record.get("id", ""),
                    record.get("executor", ""),
                    bool(array.get("single", False)),
                )
    return latest
