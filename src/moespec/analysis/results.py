"""Find the artifacts of an experiment on disk and group them into runs.

A *run* is the chain of artifacts of one sweep point: every train or ablate task (or, when no
model was trained, every fiber or reduce task) closes a chain, and the chain is that task with
all its ancestors, linked through the ``input_uids`` root attribute each artifact carries. Sibling
branches that hang off the chain (a fiber artifact beside a train artifact on the same reduce)
join it, so one run shows everything computed for its sweep point.

Nothing here computes a result: it reads what the stages wrote and says what is missing.
Works on a results tree pulled from a cluster as well as on a local one (same layout).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from moespec.errors import ArtifactError

#: Stage order of the pipeline (upstream first).
STAGES = ("embed", "reduce", "fiber", "train", "lm", "lora", "route", "ablate")
#: Statuses of a task that finished (its summary.json holds its results).
FINISHED = ("done", "not pulled")
#: Stages that close a run when nothing downstream of them exists.
_CLOSING = ("ablate", "route", "lm", "train", "lora", "fiber", "reduce", "embed")


@dataclass
class TaskRecord:
    """One artifact folder and what is known about it.

    Attributes
    ----------
    status : {"done", "not pulled", "failed", "incomplete", "missing"}
        ``done``: ``<stage>.h5`` opens and is complete; ``not pulled``: the task finished (its
        ``summary.json``, written only after the artifact is complete, is here) but its HDF5 file
        is not (left on the cluster by ``moespec sync``'s filters); ``failed``: ``FAILED.txt`` is
        there; ``incomplete``: the folder exists without a complete file (running, or
        interrupted); ``missing``: referenced by another artifact (or the experiment summary) but
        not on disk.
    """

    stage: str
    uid: str
    dir: Path
    status: str
    input_uids: dict[str, str] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    summary: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    points: tuple[int, ...] = ()

    @property
    def h5_path(self) -> Path:
        return self.dir / f"{self.stage}.h5"


@dataclass
class Run:
    """The artifacts of one sweep point, at most one per stage (``None``: that stage is absent)."""

    name: str
    tasks: dict[str, TaskRecord]
    points: tuple[int, ...] = ()
    #: Upstream artifacts whose downstream runs cannot be told here (see :func:`discover`).
    unlinked: bool = False

    def task(self, stage: str) -> Optional[TaskRecord]:
        return self.tasks.get(stage)

    @property
    def linked(self) -> bool:
        """Whether the run's chain is known (some task recorded its inputs or its sweep points)."""
        return any(t.input_uids or t.points for t in self.tasks.values()) or "embed" in self.tasks

    def status(self, stage: str) -> str:
        """``done``, ``not pulled``, ``failed``, ``incomplete``, ``missing``; ``not run`` when the run has
        no such task; ``unknown`` when the run's inputs are not recorded here (a task still running,
        or one whose HDF5 file, which records its inputs, was not pulled)."""
        task = self.tasks.get(stage)
        if task is not None:
            return task.status
        if not self.linked or self.unlinked or self.unlinked_below(stage):
            return "unknown"
        return "not run"

    def unlinked_below(self, stage: str) -> bool:
        """Whether a task of this run downstream of ``stage`` does not record its inputs here."""
        order = STAGES.index(stage) if stage in STAGES else -1
        return any(
            STAGES.index(t.stage) > order and not t.input_uids and not t.points
            for t in self.tasks.values()
            if t.stage in STAGES and t.stage != "embed"
        )

    def done(self, stage: str) -> bool:
        task = self.tasks.get(stage)
        return task is not None and task.status == "done"

    def finished(self, stage: str) -> bool:
        """Done, here or on the cluster (its summary is here even when its arrays were not pulled)."""
        task = self.tasks.get(stage)
        return task is not None and task.status in FINISHED


@dataclass
class Experiment:
    """An experiment folder: every task record and the runs they form."""

    name: str
    dir: Path
    tasks: dict[tuple[str, str], TaskRecord]
    runs: list[Run]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _read_record(stage: str, folder: Path) -> TaskRecord:
    from moespec.artifacts import open_artifact

    record = TaskRecord(stage, folder.name, folder, "incomplete")
    summary = _read_json(folder / "summary.json")
    record.summary = summary if isinstance(summary, dict) else {}
    if (folder / "FAILED.txt").exists():
        record.status = "failed"
        record.error = (folder / "FAILED.txt").read_text(encoding="utf-8", errors="replace").strip()
    elif summary is not None and not (folder / f"{stage}.h5").exists():
        record.status = "not pulled"
    if (folder / f"{stage}.h5").exists():
        try:
            with open_artifact(folder / f"{stage}.h5") as reader:
                record.input_uids = json.loads(reader.attrs.get("input_uids", "{}") or "{}")
                record.config = reader.config
                record.status = "done"
        except (ArtifactError, ValueError) as e:
            record.error = record.error or str(e)
    if not record.config and (folder / "config.yaml").exists():
        import yaml

        try:
            record.config = yaml.safe_load((folder / "config.yaml").read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError):
            pass
    return record


def discover(experiment_dir: Path | str) -> Experiment:
    """Every artifact under ``<experiment_dir>/<stage>/<uid>/``, grouped into runs.

    The experiment's ``summary.json`` (written by ``moespec submit`` with a local executor), when
    present, adds each task's sweep points and the tasks that failed or were skipped before their
    folder held anything.
    """
    experiment_dir = Path(experiment_dir)
    if not experiment_dir.is_dir():
        raise ArtifactError(f"{experiment_dir}: no such experiment folder")
    tasks: dict[tuple[str, str], TaskRecord] = {}
    for stage in STAGES:
        for folder in sorted(p for p in (experiment_dir / stage).glob("*") if p.is_dir()):
            tasks[(stage, folder.name)] = _read_record(stage, folder)
    listed = _read_json(experiment_dir / "summary.json") or {}
    for entry in listed.get("tasks", []) if isinstance(listed, dict) else []:
        key = (entry.get("stage"), entry.get("uid"))
        record = tasks.get(key)
        if record is None:
            record = tasks[key] = TaskRecord(key[0], key[1], experiment_dir / key[0] / key[1], "missing")
        record.points = tuple(entry.get("points") or ())
        if entry.get("status") in ("failed", "skipped") and record.status not in FINISHED:
            record.status = "failed" if entry["status"] == "failed" else "missing"
            record.error = record.error or (entry.get("error") or entry["status"])
    # An input recorded by an artifact but absent from disk (deleted, or not synced) is shown as missing.
    for record in list(tasks.values()):
        for name, uid in record.input_uids.items():
            if name in STAGES and not any(u == uid for (_, u) in tasks):
                tasks[(name, uid)] = TaskRecord(
                    name,
                    uid,
                    experiment_dir / name / uid,
                    "missing",
                    error=f"{name} {uid} is an input of {record.stage} {record.uid} "
                    "but is not under the results folder",
                )
    return Experiment(experiment_dir.name, experiment_dir, tasks, _group_runs(tasks))


def _ancestors(record: TaskRecord, tasks: dict[tuple[str, str], TaskRecord]) -> dict[str, TaskRecord]:
    chain = {record.stage: record}
    parents = [t for uid in record.input_uids.values() for (s, u), t in tasks.items() if u == uid]
    if not record.input_uids and record.points and record.stage in STAGES:
        # inputs not recorded here (HDF5 file not pulled, or failed): a sweep point has one task per
        # stage, so an upstream task sharing a sweep point with this one is its input
        parents = [
            t
            for t in tasks.values()
            if t.stage in STAGES
            and STAGES.index(t.stage) < STAGES.index(record.stage)
            and set(t.points) & set(record.points)
        ]
    for parent in parents:
        for stage, task in _ancestors(parent, tasks).items():
            chain.setdefault(stage, task)
    return chain


def _group_runs(tasks: dict[tuple[str, str], TaskRecord]) -> list[Run]:
    referenced = {uid for t in tasks.values() for uid in t.input_uids.values()}
    leaves = [t for t in tasks.values() if t.uid not in referenced]
    # A failed task has no input_uids on disk; the sweep points of the experiment summary link it.
    chains = []
    for leaf in sorted(leaves, key=lambda t: (_CLOSING.index(t.stage) if t.stage in _CLOSING else 9, t.uid)):
        chain = _ancestors(leaf, tasks)
        if not leaf.input_uids and leaf.points:
            for other in tasks.values():
                if other.stage != leaf.stage and set(leaf.points) & set(other.points):
                    chain.setdefault(other.stage, other)
        chains.append(chain)
    # Sibling branches (fiber beside train) join every chain that holds their inputs.
    for chain in chains:
        uids = {t.uid for t in chain.values()}
        for task in tasks.values():
            if task.stage not in chain and task.input_uids and set(task.input_uids.values()) <= uids:
                chain[task.stage] = task
    runs: list[Run] = []
    seen: list[set[str]] = []
    for chain in chains:
        members = {f"{t.stage}/{t.uid}" for t in chain.values()}
        if any(members <= other for other in seen):
            continue
        seen.append(members)
        ordered = {s: chain[s] for s in STAGES if s in chain}
        common = (
            set.intersection(*(set(t.points) for t in ordered.values() if t.points))
            if any(t.points for t in ordered.values())
            else set()
        )
        runs.append(Run("", ordered, tuple(sorted(common))))
    # drop runs contained in a later, larger run
    runs = [
        r
        for r in runs
        if not any(
            {f"{t.stage}/{t.uid}" for t in r.tasks.values()} < {f"{t.stage}/{t.uid}" for t in o.tasks.values()}
            for o in runs
        )
    ]
    # A chain cut short by a task whose inputs are not recorded here leaves its upstream artifacts
    # without a run: they are listed apart (``unlinked-``), never joined to a run they may not belong to.
    cut = any(r.unlinked_below("embed") for r in runs)
    number = 0
    for run in runs:
        last = list(run.tasks.values())[-1]
        if cut and last.stage in ("embed", "reduce") and len(runs) > 1 and not run.points:
            run.name, run.unlinked = f"unlinked-{last.stage}-{last.uid[:8]}", True
        else:
            number += 1
            run.name = f"run{number}-{last.stage}-{last.uid[:8]}"
    return runs


def flat_config(run: Run) -> dict[str, Any]:
    """Every config value of a run's tasks as ``{"<stage>.<dotted key>": value}``."""
    flat: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, sub in value.items():
                walk(f"{prefix}.{key}", sub)
        else:
            flat[prefix] = json.dumps(value, sort_keys=True) if isinstance(value, list) else value

    for stage, task in run.tasks.items():
        walk(stage, task.config)
    return flat


def varied_parameters(runs: list[Run]) -> list[str]:
    """The config keys whose values differ between ``runs`` (the swept parameters)."""
    configs = [flat_config(r) for r in runs]
    keys = sorted({k for c in configs for k in c})
    # A key absent from a run (stage not run, or failed before writing its config) is no variation.
    return [k for k in keys if len({json.dumps(c[k], sort_keys=True, default=str) for c in configs if k in c}) > 1]
