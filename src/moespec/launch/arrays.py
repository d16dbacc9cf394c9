"""From a plan to job arrays: pure, cheap planning of what a cluster submission contains.

Each stage's tasks to run become one job array, split into chunks when the stage has more tasks
than the scheduler's MaxArraySize allows. A chunk covers a fixed window of a stage's task list
(``plan.tasks_for(stage)``): chunk ``k`` holds task indices ``[k*M, (k+1)*M)`` and its array
indices are ``task index - k*M``, so ``moespec run STAGE --task $((SLURM_ARRAY_TASK_ID + OFFSET))``
finds the same task, and every index stays below MaxArraySize as Slurm requires (submitit does
not chunk for you: https://github.com/facebookincubator/submitit/issues/1624).

A chunk depends (``afterok``) on exactly the chunks of this submission holding its tasks'
upstream tasks, and on the jobs of earlier submissions still pending or running for them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Iterable, Mapping

from moespec.config import Resources
from moespec.errors import ClusterError
from moespec.launch.plan import Plan, Task

#: (stage, uid, shard index): identifies a task across plans and submission records.
TaskKey = tuple[str, str, int]


def task_key(task: Task) -> TaskKey:
    return (task.stage, task.uid, task.shard_index)


@dataclass(frozen=True)
class ArrayJob:
    """One job array of a submission: a chunk of one stage's tasks and what it waits for.

    Attributes
    ----------
    stage, chunk : str, int
        The stage and the chunk number within it (0 unless the stage is split).
    tasks : tuple of Task
        The tasks, in array order.
    task_indices : tuple of int
        Each task's index in ``plan.tasks_for(stage)`` (what ``moespec run --task`` takes).
    offset : int
        ``task index - array index`` (the chunk's first possible task index).
    resources : Resources
        What each array task asks the scheduler for.
    after : tuple of int
        Positions (in the submission's array list) of the arrays this one waits for.
    after_jobs : tuple of str
        Job ids from earlier submissions this one waits for (``<array id>_<index>``).
    """

    stage: str
    chunk: int
    tasks: tuple[Task, ...]
    task_indices: tuple[int, ...]
    offset: int
    resources: Resources
    after: tuple[int, ...] = ()
    after_jobs: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.stage}.{self.chunk}"

    @property
    def array_indices(self) -> tuple[int, ...]:
        return tuple(i - self.offset for i in self.task_indices)

    @property
    def parallelism(self) -> int:
        wanted = self.resources.slurm_array_parallelism or 256  # submitit's default
        return max(1, min(wanted, len(self.tasks)))

    def array_spec(self) -> str:
        """sbatch's ``--array`` value for these indices, throttled: ``0-3,7,9-10%4``."""
        return f"{compress_indices(self.array_indices)}%{self.parallelism}"


def compress_indices(indices: Iterable[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2,5,7-8"`` (sorted, duplicates dropped)."""
    values = sorted(set(indices))
    parts: list[str] = []
    start = previous = None
    for value in values:
        if previous is not None and value == previous + 1:
            previous = value
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = value
    if start is not None:
        parts.append(str(start) if start == previous else f"{start}-{previous}")
    return ",".join(parts)


def plan_arrays(plan: Plan, to_submit: Iterable[Task], *, resources: Mapping[str, Resources],
                max_array_size: int, done: Collection[TaskKey] = frozenset(),
                active_jobs: Mapping[TaskKey, str] | None = None) -> list[ArrayJob]:
    """Group the tasks to submit into job arrays, chunked and chained by their dependencies.

    Parameters
    ----------
    plan : Plan
        The full plan (task indices refer to ``plan.tasks_for(stage)``).
    to_submit : iterable of Task
        The tasks to run (typically the ones neither done nor pending/running).
    resources : mapping
        Stage -> resources of its jobs.
    max_array_size : int
        The scheduler's MaxArraySize: array indices must be below it.
    done : collection of TaskKey
        Tasks whose artifacts are complete (their dependants need not wait).
    active_jobs : mapping, optional
        Task key -> job id of tasks already pending or running (from earlier submissions);
        dependants submitted now wait for those jobs.

    Returns
    -------
    list of ArrayJob
        In submission order (pipeline order, then chunk order).

    Raises
    ------
    ClusterError
        A task to submit reads an upstream task that is neither done, nor submitted now, nor
        pending or running: it could never start.
    """
    active_jobs = active_jobs or {}
    wanted = {task_key(t) for t in to_submit}
    position_of: dict[TaskKey, int] = {}
    by_stage: dict[str, list[tuple[int, Task]]] = {}
    shards_of: dict[tuple[str, str], list[Task]] = {}
    for stage in plan.stages():
        for index, task in enumerate(plan.tasks_for(stage)):
            shards_of.setdefault((task.stage, task.uid), []).append(task)
            if task_key(task) in wanted:
                by_stage.setdefault(stage, []).append((index, task))
    arrays: list[ArrayJob] = []
    unreachable: dict[str, list[str]] = {}  # upstream task -> tasks that read it
    for stage in plan.stages():
        chunks: dict[int, list[tuple[int, Task]]] = {}
        for index, task in by_stage.get(stage, []):
            chunks.setdefault(index // max_array_size, []).append((index, task))
        for chunk, members in sorted(chunks.items()):
            after: set[int] = set()
            after_jobs: set[str] = set()
            for _, task in members:
                for upstream in _upstream_tasks(task, shards_of):
                    key = task_key(upstream)
                    if key in position_of:
                        after.add(position_of[key])
                    elif key in active_jobs:
                        after_jobs.add(active_jobs[key])
                    elif key not in done:
                        unreachable.setdefault(upstream.label, []).append(task.label)
            array = ArrayJob(stage, chunk, tuple(t for _, t in members), tuple(i for i, _ in members),
                             chunk * max_array_size, resources[stage], tuple(sorted(after)), tuple(sorted(after_jobs)))
            for _, task in members:
                position_of[task_key(task)] = len(arrays)
            arrays.append(array)
    if unreachable:
        lines = [f"{upstream} is not done and not submitted; {len(readers)} task(s) read it ({', '.join(readers[:3])}"
                 f"{', ...' if len(readers) > 3 else ''})" for upstream, readers in unreachable.items()]
        shown = lines[:10] + ([f"... and {len(lines) - 10} more"] if len(lines) > 10 else [])
        raise ClusterError("some tasks could never start (submit their upstream stages too):\n  " + "\n  ".join(shown))
    return arrays


def _upstream_tasks(task: Task, shards_of: Mapping[tuple[str, str], list[Task]]) -> list[Task]:
    """The tasks whose artifacts ``task`` reads (every shard of a sharded input)."""
    found: list[Task] = []
    for upstream in task.inputs.values():
        found += shards_of.get((upstream.stage, upstream.uid), [])
    return found
