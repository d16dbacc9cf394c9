"""From a plan to job arrays: pure, cheap planning of what a cluster submission contains.

Each stage's tasks to run become one job array, split into chunks when the stage has more tasks
than the scheduler's MaxArraySize allows. Array task ``i`` of an array runs ``array.tasks[i]``:
indices are positions ``0..n-1`` in every array, whatever the tasks' indices in
``plan.tasks_for(stage)`` (``array.task_indices``). That is what submitit's ``map_array`` does
(it always numbers ``0..n-1``), and the emitted sbatch scripts look the task index up in a list
(``tasks=(1 3 5)``), so both paths and the submission records agree on which array task runs
which task, and every index stays below MaxArraySize as Slurm requires (submitit does not chunk
for you: https://github.com/facebookincubator/submitit/issues/1624).

Dependencies are per upstream array. Where a stage's tasks correspond one to one to the tasks of
an upstream array (each reads exactly one task of it, and every task of it is read by exactly
one), the downstream array lists its tasks in the upstream array's order and waits with
``aftercorr``: array task ``i`` starts when upstream array task ``i`` has succeeded, so one failed
training task cancels only the ablation that reads it. Any other upstream array is waited for
with ``afterok`` (every task of it must succeed), and so are the jobs of earlier submissions still
pending or running for the tasks read.
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
        The tasks, in array order: array task ``i`` runs ``tasks[i]``.
    task_indices : tuple of int
        Each task's index in ``plan.tasks_for(stage)`` (what ``moespec run --task`` takes).
    resources : Resources
        What each array task asks the scheduler for.
    after : tuple of int
        Positions (in the submission's array list) of the arrays every task of this one waits
        for (``afterok``).
    after_corresponding : tuple of int
        Positions of arrays whose task ``i`` only task ``i`` of this one waits for (``aftercorr``).
    after_jobs : tuple of str
        Job ids from earlier submissions this one waits for (``<array id>_<index>``, ``afterok``).
    """

    stage: str
    chunk: int
    tasks: tuple[Task, ...]
    task_indices: tuple[int, ...]
    resources: Resources
    after: tuple[int, ...] = ()
    after_corresponding: tuple[int, ...] = ()
    after_jobs: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"{self.stage}.{self.chunk}"

    @property
    def array_indices(self) -> tuple[int, ...]:
        return tuple(range(len(self.tasks)))

    @property
    def parallelism(self) -> int:
        wanted = self.resources.slurm_array_parallelism or 256  # submitit's default
        return max(1, min(wanted, len(self.tasks)))

    def array_spec(self) -> str:
        """sbatch's ``--array`` value, throttled: ``0-3%2``."""
        return f"{compress_indices(self.array_indices)}%{self.parallelism}"

    def dependency(self, job_ids: list[str]) -> str:
        """sbatch's ``--dependency`` value, given the job ids of the submission's arrays ('' if none).

        Comma-separated conditions must all hold (``aftercorr:12,afterok:10:11``).
        """
        parts = []
        if self.after_corresponding:
            parts.append("aftercorr:" + ":".join(job_ids[i] for i in self.after_corresponding))
        ok = [job_ids[i] for i in self.after] + list(self.after_jobs)
        if ok:
            parts.append("afterok:" + ":".join(ok))
        return ",".join(parts)

    def waits_for(self, arrays: list["ArrayJob"]) -> str:
        """What the array waits for, for people: ``aftercorr train.0, afterok embed.0 123_4``."""
        parts = []
        if self.after_corresponding:
            parts.append("aftercorr " + " ".join(arrays[i].name for i in self.after_corresponding))
        ok = [arrays[i].name for i in self.after] + list(self.after_jobs)
        if ok:
            parts.append("afterok " + " ".join(ok))
        return ", ".join(parts) or "-"


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


def plan_arrays(
    plan: Plan,
    to_submit: Iterable[Task],
    *,
    resources: Mapping[str, Resources],
    max_array_size: int,
    done: Collection[TaskKey] = frozenset(),
    active_jobs: Mapping[TaskKey, str] | None = None,
) -> list[ArrayJob]:
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
    index_of: dict[TaskKey, int] = {}
    by_stage: dict[str, list[Task]] = {}
    shards_of: dict[tuple[str, str], list[Task]] = {}
    for stage in plan.stages():
        for index, task in enumerate(plan.tasks_for(stage)):
            index_of[task_key(task)] = index
            shards_of.setdefault((task.stage, task.uid), []).append(task)
            if task_key(task) in wanted:
                by_stage.setdefault(stage, []).append(task)
    arrays: list[ArrayJob] = []
    array_of: dict[TaskKey, int] = {}  # task -> position of its array in `arrays`
    unreachable: dict[str, list[str]] = {}  # upstream task -> tasks that read it
    for stage in plan.stages():
        members = by_stage.get(stage, [])
        groups = _corresponding_groups(members, plan.stages(), arrays, array_of, shards_of) or [
            (members[start : start + max_array_size], None) for start in range(0, len(members), max_array_size)
        ]
        for chunk, (group, corresponding) in enumerate(groups):
            after: set[int] = set()
            after_jobs: set[str] = set()
            for task in group:
                for upstream in _upstream_tasks(task, shards_of):
                    key = task_key(upstream)
                    if key in array_of:
                        if array_of[key] != corresponding:
                            after.add(array_of[key])
                    elif key in active_jobs:
                        after_jobs.add(active_jobs[key])
                    elif key not in done:
                        unreachable.setdefault(upstream.label, []).append(task.label)
            array = ArrayJob(
                stage,
                chunk,
                tuple(group),
                tuple(index_of[task_key(t)] for t in group),
                resources[stage],
                tuple(sorted(after)),
                () if corresponding is None else (corresponding,),
                tuple(sorted(after_jobs)),
            )
            for task in group:
                array_of[task_key(task)] = len(arrays)
            arrays.append(array)
    if unreachable:
        lines = [
            f"{upstream} is not done and not submitted; {len(readers)} task(s) read it ({', '.join(readers[:3])}"
            f"{', ...' if len(readers) > 3 else ''})"
            for upstream, readers in unreachable.items()
        ]
        shown = lines[:10] + ([f"... and {len(lines) - 10} more"] if len(lines) > 10 else [])
        raise ClusterError("some tasks could never start (submit their upstream stages too):\n  " + "\n  ".join(shown))
    return arrays


def _corresponding_groups(
    members: list[Task],
    stages: list[str],
    arrays: list[ArrayJob],
    array_of: Mapping[TaskKey, int],
    shards_of: Mapping[tuple[str, str], list[Task]],
) -> list[tuple[list[Task], int]] | None:
    """``members`` split and ordered like the upstream arrays they correspond to one to one, or None.

    An upstream stage qualifies when every member reads exactly one of its tasks, submitted now,
    no two members read the same one, and each upstream array touched (of two tasks or more:
    submitit submits one task as a plain job) is read in full. The nearest such stage wins.
    """
    for upstream_stage in reversed(stages):
        readers: dict[TaskKey, Task] = {}
        for task in members:
            read = [u for u in _upstream_tasks(task, shards_of) if u.stage == upstream_stage]
            if len(read) != 1 or task_key(read[0]) not in array_of or task_key(read[0]) in readers:
                break
            readers[task_key(read[0])] = task
        else:
            if not readers:
                continue
            groups = []
            for position in sorted({array_of[key] for key in readers}):
                upstream_keys = [task_key(u) for u in arrays[position].tasks]
                if len(upstream_keys) < 2 or any(key not in readers for key in upstream_keys):
                    break
                groups.append(([readers[key] for key in upstream_keys], position))
            else:
                return groups
    return None


def _upstream_tasks(task: Task, shards_of: Mapping[tuple[str, str], list[Task]]) -> list[Task]:
    """The tasks whose artifacts ``task`` reads (every shard of a sharded input)."""
    found: list[Task] = []
    for upstream in task.inputs.values():
        found += shards_of.get((upstream.stage, upstream.uid), [])
    return found
