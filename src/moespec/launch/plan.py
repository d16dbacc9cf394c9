"""Planning: an experiment's sweep points -> unique, content-addressed stage tasks, and their state.

Pure apart from reading the artifact store to tell done tasks from missing ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from moespec import artifacts
from moespec.config import Experiment, compute_uid, config_yaml, format_point_value
from moespec.launch.codeversion import stage_code_version, task_code_version
from moespec.stages.base import STAGE_ORDER, StageConfig, num_shards, stage_module


@dataclass(frozen=True)
class TaskInput:
    """One upstream artifact a task reads."""

    stage: str
    uid: str
    config: StageConfig
    code_version: str = ""


@dataclass(frozen=True)
class Task:
    """One unit of work: a stage on one config (one shard of it when the stage is sharded).

    Tasks are pickled into jobs as they were planned, so a job runs exactly what was planned
    even if the experiment file changes after submission. ``code_version`` names the code that
    would make its artifact (:mod:`moespec.launch.codeversion`); an artifact made by other code
    is stale.
    """

    experiment: str
    root: Path
    stage: str
    uid: str
    config: StageConfig
    inputs: dict[str, TaskInput]
    shard_index: int = 0
    num_shards: int = 1
    points: tuple[int, ...] = ()
    code_version: str = ""
    stage_code: str = ""

    @property
    def dir(self) -> Path:
        return artifacts.artifact_dir(self.root, self.experiment, self.stage, self.uid)

    @property
    def h5_path(self) -> Path:
        return self.dir / artifacts.h5_name(self.stage, self.shard_index, self.num_shards)

    @property
    def log_path(self) -> Path:
        suffix = f".shard-{self.shard_index:05d}" if self.num_shards > 1 else ""
        return self.dir / f"log{suffix}.txt"

    @property
    def failed_path(self) -> Path:
        suffix = f".shard-{self.shard_index:05d}" if self.num_shards > 1 else ""
        return self.dir / f"FAILED{suffix}.txt"

    @property
    def label(self) -> str:
        shard = f" shard {self.shard_index + 1}/{self.num_shards}" if self.num_shards > 1 else ""
        return f"{self.stage} {self.uid}{shard}"

    def schema(self) -> artifacts.Schema:
        return stage_module(self.stage).schema(self.config)

    def check(self) -> tuple[bool, str]:
        """Whether this task is done, and if not, why (one line; '' when there is no artifact).

        Done means: the artifact exists, is complete, matches the stage schema and was made by
        this task's code version.
        """
        if not self.h5_path.exists():
            return False, ""
        try:
            made_by = self.made_by()
        except artifacts.ArtifactError as e:
            return False, f"unreadable artifact: {e}"
        reason = stale_reason(self, *made_by)
        return not reason, reason

    def made_by(self) -> tuple[str, str]:
        """The code version and stage code recorded in the artifact, after checking it in full.

        Raises
        ------
        ArtifactError
            Missing, truncated, corrupt, incomplete or not matching the stage schema.
        """
        with artifacts.open_artifact(self.h5_path, self.schema()) as reader:
            return str(reader.attrs.get("code_version", "")), str(reader.attrs.get("stage_code", ""))

    def is_done(self) -> bool:
        """Whether this task's artifact is complete, valid and current (see :meth:`check`)."""
        return self.check()[0]

    def state(self) -> str:
        if self.is_done():
            return "done"
        return "failed" if self.failed_path.exists() else "to run"

    def config_yaml(self) -> str:
        return config_yaml(self.config)


@dataclass
class Plan:
    """Every unique task of an experiment, in pipeline order, and the sweep points that use each."""

    experiment: Experiment
    tasks: list[Task] = field(default_factory=list)
    #: Set when the artifacts cannot be looked at from this machine (the reason).
    root_unavailable: str = ""

    def stages(self) -> list[str]:
        present = {t.stage for t in self.tasks}
        return [s for s in STAGE_ORDER if s in present]

    def tasks_for(self, stage: str) -> list[Task]:
        """The tasks of one stage; ``moespec run STAGE --task N`` indexes this list."""
        return [t for t in self.tasks if t.stage == stage]

    def upstream_of(self, task: Task) -> list[Task]:
        """The tasks whose artifacts ``task`` reads (every shard of a sharded input)."""
        keys = {(i.stage, i.uid) for i in task.inputs.values()}
        return [t for t in self.tasks if (t.stage, t.uid) in keys]


def stale_reason(task: Task, code_version: str, stage_code: str) -> str:
    """Why an artifact recorded as made by ``code_version`` does not stand for ``task`` ('' if it does)."""
    if not task.code_version or code_version == task.code_version:
        return ""
    if not code_version:
        return "stale: made by code that recorded no code version (before moespec recorded them)"
    if stage_code != task.stage_code:
        return f"stale: the {task.stage} code changed since it was made (code {stage_code or '?'} -> {task.stage_code})"
    return "stale: an input was made by changed code since"


def make_plan(experiment: Experiment) -> Plan:
    """Expand every sweep point into stage tasks; tasks with equal uids are planned once."""
    by_key: dict[tuple[str, str, int], Task] = {}
    points_of: dict[tuple[str, str, int], list[int]] = {}
    for point_index, config in enumerate(experiment.configs):
        uids: dict[str, TaskInput] = {}
        for stage in config.stages():
            module = stage_module(stage)
            stage_cfg = config.stage_config(stage)
            inputs = {name: uids[upstream] for name, upstream in module.inputs(stage_cfg).items()}
            uid = compute_uid(stage, stage_cfg, {n: i.uid for n, i in inputs.items()}, module.SCHEMA_VERSION)
            stage_code = stage_code_version(stage)
            code = task_code_version(stage_code, {n: i.code_version for n, i in inputs.items()})
            uids[stage] = TaskInput(stage, uid, stage_cfg, code)
            shards = num_shards(stage, stage_cfg)
            for shard in range(shards):
                key = (stage, uid, shard)
                points_of.setdefault(key, []).append(point_index)
                if key not in by_key:
                    by_key[key] = Task(
                        experiment.name,
                        experiment.root,
                        stage,
                        uid,
                        stage_cfg,
                        inputs,
                        shard,
                        shards,
                        code_version=code,
                        stage_code=stage_code,
                    )
    order = {stage: i for i, stage in enumerate(STAGE_ORDER)}
    keys = sorted(by_key, key=lambda k: order[k[0]])  # stable: first appearance within a stage
    tasks = [_with_points(by_key[k], points_of[k]) for k in keys]
    return Plan(experiment, tasks)


def _with_points(task: Task, points: Iterable[int]) -> Task:
    from dataclasses import replace

    return replace(task, points=tuple(points))


def describe_point(experiment: Experiment, indices: tuple[int, ...]) -> str:
    """A short text naming the sweep points of a task (``-`` without a sweep)."""
    if experiment.points == [{}]:
        return "-"
    if len(indices) == 1:
        point = experiment.points[indices[0]]
        return f"#{indices[0]} " + ", ".join(f"{k.split('.', 1)[-1]}={format_point_value(v)}" for k, v in point.items())
    shown = ",".join(map(str, indices[:6])) + ("..." if len(indices) > 6 else "")
    return f"#{shown} (shared by {len(indices)} points)"
