"""Planning cost of a 1,000-point sweep of the full pipeline, before anything ran and when all is done.

The sweep: embed (2 poolings) x reduce (5 sizes) x 100 zipped (fiber.seed, train.seed) = 1,000
points -> 2 embed + 10 reduce + 1,000 fiber + 1,000 train = 2,012 unique tasks (the stages that
exist in this installation; absent ones are left out). Each measurement is what ``moespec plan``
does: load and validate every point, expand them into content-addressed tasks, check which are
done, and group the rest into chunked job arrays with their dependencies.

1. First plan: no artifact exists. Goal: < 5 s.
2. Re-plan: every task has a complete artifact (tiny HDF5 files written from each stage's schema)
   and the done stamp its Slurm job writes on success (``moespec.launch.donecheck``). Goal: < 2 s.
3. Baselines measured in the same run: the full done check (``Task.is_done()``: open the HDF5
   file, completeness flag, schema, first and last rows; what a re-plan costs where no stamp
   exists yet) on a sample of tasks, extrapolated to all of them; and the planner's dependency
   lookup (``Plan.upstream_of`` scans every task, O(tasks^2)) against the index the arrays use.

Each plan prints a breakdown (load+validate, expand, done check, arrays), so a slow step names
itself. Run::

    python bench/plan.py              # 1,000 points
    python bench/plan.py --points 200 # smaller
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np

from moespec.config import load_experiment
from moespec.launch import donecheck
from moespec.launch.arrays import task_key
from moespec.launch.plan import make_plan
from moespec.launch.slurm import planned_arrays
from moespec.stages.base import available_stages

GOAL_FIRST_S, GOAL_REPLAN_S = 5.0, 2.0


def sweep_config(root: Path, points: int) -> dict:
    stages = available_stages()
    repeats = max(1, points // 10)
    config: dict = {
        "experiment": "bench",
        "root": str(root),
        "embed": {"model": {"name": "builtin:tiny-bert"}, "data": [{"kind": "builtin", "n_per_domain": 50}]},
        "sweep": {"grid": {"embed.pooling": ["mean", "cls"]}, "zip": {}},
    }
    if "reduce" in stages:
        config["reduce"] = {"n_components": 4}
        config["sweep"]["grid"]["reduce.n_components"] = [2, 4, 8, 16, 32]
    for stage in ("fiber", "train"):
        if stage in stages:
            config[stage] = {}
            config["sweep"]["zip"][f"{stage}.seed"] = list(range(repeats))
    if not config["sweep"]["zip"]:
        del config["sweep"]["zip"]
    return config


def fake_done_artifact(task) -> None:
    """A complete artifact that satisfies the task's schema (two rows of zeros per dataset).

    Written with h5py directly, without the writer's fsyncs: the re-plan reads these files, it
    does not care how carefully they were written.
    """
    task.dir.mkdir(parents=True, exist_ok=True)
    with h5py.File(task.h5_path, "w") as h5:
        for name, spec in task.schema().items():
            if not spec.required:
                continue
            shape = tuple(2 if isinstance(dim, str) else dim for dim in spec.shape)
            if spec.dtype == "str":
                h5.create_dataset(name, data=np.full(shape, "x", dtype=object), dtype=h5py.string_dtype())
            else:
                h5.create_dataset(
                    name, data=np.zeros(shape, dtype={"float": "f4", "int": "i8", "bool": "?"}[spec.dtype])
                )
        h5.attrs.update(
            {
                "stage": task.stage,
                "uid": task.uid,
                "complete": True,
                "code_version": task.code_version,
                "stage_code": task.stage_code,
            }
        )


def plan_once(config: dict) -> dict[str, float]:
    """One ``moespec plan``: times of each step, and the numbers planned."""
    times: dict[str, float] = {}
    torch_before = "torch" in sys.modules
    start = time.perf_counter()
    experiment = load_experiment(config)
    times["load+validate"] = time.perf_counter() - start
    times["imported torch"] = float("torch" in sys.modules and not torch_before)
    mark = time.perf_counter()
    plan = make_plan(experiment)
    times["expand"] = time.perf_counter() - mark
    mark = time.perf_counter()
    done = {task_key(t) for t in plan.tasks if donecheck.is_done(t)}
    times["done check"] = time.perf_counter() - mark
    mark = time.perf_counter()
    _, arrays = planned_arrays(plan, None)
    times["arrays (incl. done check)"] = time.perf_counter() - mark
    times["total"] = time.perf_counter() - start - times["done check"]  # planned_arrays checks again
    times["tasks"] = len(plan.tasks)
    times["done"] = len(done)
    times["arrays"] = len(arrays)
    times["points"] = len(experiment.points)
    return times


def dependency_baseline(config: dict) -> tuple[float, float]:
    """Seconds to find every task's upstream tasks: Plan.upstream_of (scan) vs a (stage, uid) index."""
    plan = make_plan(load_experiment(config))
    start = time.perf_counter()
    for task in plan.tasks:
        plan.upstream_of(task)
    scan = time.perf_counter() - start
    start = time.perf_counter()
    index: dict[tuple[str, str], list] = {}
    for task in plan.tasks:
        index.setdefault((task.stage, task.uid), []).append(task)
    for task in plan.tasks:
        [t for i in task.inputs.values() for t in index.get((i.stage, i.uid), [])]
    return scan, time.perf_counter() - start


def report(title: str, times: dict[str, float], goal: float) -> None:
    print(
        f"{title}: {times['total']:.2f} s for {int(times['points'])} points -> {int(times['tasks'])} tasks "
        f"({int(times['done'])} done, {int(times['arrays'])} arrays to submit); goal < {goal:.0f} s: "
        f"{'met' if times['total'] < goal else 'NOT met'}"
    )
    for step in ("load+validate", "expand", "done check", "arrays (incl. done check)"):
        note = ""
        if step == "load+validate" and times["imported torch"]:
            note = (
                f"  (includes `import torch`, {torch_import_s():.1f} s alone: a stage config validator "
                f"imports it; validating configs should not)"
            )
        print(f"    {step:<26} {times[step]:.3f} s{note}")


def torch_import_s() -> float:
    """Seconds a fresh interpreter needs to import torch (to tell it apart from planning)."""
    code = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    return float(result.stdout.strip() or "nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--points", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = sweep_config(Path(tmp), args.points)
        print(f"stages: {', '.join(s for s in available_stages() if s in config)}")
        first = plan_once(config)
        report("first plan", first, GOAL_FIRST_S)
        started = time.perf_counter()
        tasks = make_plan(load_experiment(config)).tasks
        for task in tasks:
            fake_done_artifact(task)
            donecheck.write_stamp(task)  # as TaskJob does when its task succeeds
        print(f"(wrote {len(tasks)} complete artifacts and their done stamps in {time.perf_counter() - started:.1f} s)")
        replan = plan_once(config)
        report("re-plan, all done", replan, GOAL_REPLAN_S)
        sample = tasks[:: max(1, len(tasks) // 100)]
        started = time.perf_counter()
        assert all(task.is_done() for task in sample)
        per_task = (time.perf_counter() - started) / len(sample)
        print(
            f"full done check (Task.is_done, no stamp): {per_task * 1e3:.1f} ms per task on {len(sample)} tasks "
            f"-> {per_task * len(tasks):.1f} s for all {len(tasks)} ({per_task * len(tasks) / replan['total']:.0f}x "
            f"the stamped re-plan)"
        )
        scan, indexed = dependency_baseline(config)
        print(
            f"dependency lookup: Plan.upstream_of scan {scan:.3f} s, indexed {indexed:.4f} s "
            f"({scan / max(indexed, 1e-9):.0f}x)"
        )


if __name__ == "__main__":
    main()
