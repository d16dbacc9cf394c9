"""Submitting a plan to Slurm through submitit: one job array per stage (chunked), chained by ``afterok``.

The flow of ``moespec submit FILE --executor slurm``:

1. :func:`prepare` (pure apart from reading artifacts and one sacct call): the tasks to run are
   those neither done nor already pending/running; they become :class:`~moespec.launch.arrays.ArrayJob`
   chunks no larger than MaxArraySize, each stage after its upstream stages; resources are
   checked against the cluster profile and the partition against the scheduler.
2. :func:`submit`: snapshot the moespec package into the submission folder (jobs put it first on
   ``PYTHONPATH``, so editing the checkout after submitting changes nothing that runs), then one
   ``SlurmExecutor.map_array`` per array, recording job ids as it goes. If sbatch refuses an
   array, the arrays this submission already queued are cancelled and the error names the array.

Each array task runs :class:`TaskJob`, a ``submitit.helpers.Checkpointable``: on a time limit or a
preemption submitit requeues the same task, which runs again; completed stages are skipped by
the artifact cache and the training stage resumes from the checkpoints in its ``out.work_dir``.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import submitit

from moespec import artifacts
from moespec.config import Resources, load_experiment
from moespec.errors import ClusterError, ConfigError
from moespec.launch import donecheck, scheduler
from moespec.launch.arrays import ArrayJob, TaskKey, plan_arrays, task_key
from moespec.launch.plan import Plan, make_plan
from moespec.launch.profiles import (
    DEFAULT_MAX_ARRAY_SIZE,
    Cluster,
    ClusterProfile,
    apply_scratch_root,
    check_resources,
    load_profile,
    stage_resources,
)
from moespec.launch.records import (
    array_entry,
    latest_entries,
    load_records,
    new_submission_id,
    records_dir,
    write_record,
)
from moespec.launch.runner import Mode, run_task_job, thread_counts
from moespec.launch.status import TaskStatus, collect_status

log = logging.getLogger("moespec.slurm")

#: Thread-count variables of BLAS / OpenMP / numba, set from ``SLURM_CPUS_PER_TASK`` before Python
#: starts: OpenBLAS and MKL read them once, when numpy or torch is first imported, so setting them
#: from Python inside the job is too late (and a 2-thread BLAS changes float sums at ~1e-14).
THREAD_VARIABLES = (
    "OMP_NUM_THREADS MKL_NUM_THREADS OPENBLAS_NUM_THREADS NUMEXPR_NUM_THREADS VECLIB_MAXIMUM_THREADS NUMBA_NUM_THREADS"
)

#: sbatch messages that mean "try again" rather than "this job is wrong".
_TRANSIENT = ("temporarily", "timed out", "Socket", "try again", "Unable to contact slurm controller")


class TaskJob(submitit.helpers.Checkpointable):
    """What a Slurm array task runs: one planned task (pickled as planned), requeued when interrupted.

    ``checkpoint`` is submitit's default (resubmit ``self`` with the same arguments): on USR2
    (time limit or preemption) submitit pickles it, runs ``scontrol requeue`` and exits; the
    requeued attempt calls ``execute_task`` again, which skips a finished artifact and lets a
    resumable stage continue from ``out.work_dir``, which failed attempts leave in place.
    """

    def __call__(self, task, mode: Mode = "cached", threads: int | None = None) -> dict[str, Any]:
        import moespec

        # Says which code runs (the submission's snapshot) and which attempt this is.
        attempt = int(os.environ.get("SLURM_RESTART_COUNT") or 0) + 1
        print(
            f"moespec {moespec.__version__} from {Path(moespec.__file__).parent}: {task.label}, attempt {attempt}",
            file=sys.stderr,
            flush=True,
        )
        # numpy is loaded by now (unpickling the task): its BLAS pool shows what the job started with.
        print(f"threads at start: {json.dumps(thread_counts(), sort_keys=True)}", file=sys.stderr, flush=True)
        result = run_task_job(task, mode, threads)
        donecheck.write_stamp(task)  # just committed and checked: planning need not open it again
        return result


# --------------------------------------------------------------------------------------------------
# loading a plan for a cluster


DEFAULT_CLUSTER = Cluster("default", Path("(no profile: the scheduler's defaults)"), ClusterProfile())


def load_plan(
    file: str,
    *,
    root: str | None = None,
    cluster: str | None = None,
    executor: str | None = None,
    away_ok: bool = False,
) -> tuple[Plan, Cluster | None]:
    """Load an experiment with its cluster profile and plan it.

    The profile is ``--cluster`` if given, else ``infra.cluster`` when the executor is Slurm
    (``--executor`` or ``infra.executor``); a Slurm run without a profile uses the scheduler's
    defaults. A relative experiment root is placed under the profile's ``scratch_root``; with
    ``away_ok`` (planning on a laptop) a scratch root that cannot be resolved here is kept as
    written and ``plan.root_unavailable`` says why.
    """
    experiment = load_experiment(file, root=root)
    executor = executor or experiment.infra.executor
    selected: Cluster | None = None
    if cluster:
        selected = load_profile(cluster, "--cluster")
    elif executor == "slurm" and experiment.infra.cluster:
        selected = load_profile(experiment.infra.cluster, f"{experiment.source}: infra.cluster")
    elif executor == "slurm":
        selected = DEFAULT_CLUSTER
    note = apply_scratch_root(experiment, selected, root, unset_ok=away_ok)
    plan = make_plan(experiment)
    plan.root_unavailable = note
    return plan, selected


# --------------------------------------------------------------------------------------------------
# what to submit


@dataclass
class Submission:
    """What one submission sends (or would send) to the scheduler."""

    plan: Plan
    cluster: Cluster
    mode: Mode
    arrays: list[ArrayJob]
    statuses: list[TaskStatus]
    max_array_size: int
    skipped_active: int = 0
    id: str = field(default_factory=new_submission_id)
    retry_failed: bool = False
    #: What the user should know about what is left out (printed before the arrays).
    notes: list[str] = field(default_factory=list)

    @property
    def experiment_dir(self) -> Path:
        return self.plan.experiment.root / self.plan.experiment.name

    @property
    def record_path(self) -> Path:
        return records_dir(self.plan.experiment.root, self.plan.experiment.name) / f"{self.id}.json"

    @property
    def snapshot_dir(self) -> Path:
        return records_dir(self.plan.experiment.root, self.plan.experiment.name) / self.id / "code"

    @property
    def submitit_folder(self) -> Path:
        return self.experiment_dir / ".slurm" / "%j"

    @property
    def num_tasks(self) -> int:
        return sum(len(a.tasks) for a in self.arrays)


def effective_max_array_size(cluster: Cluster, ask_scheduler: bool = True) -> int:
    """The smaller of the scheduler's MaxArraySize (when it can be asked) and the profile's."""
    from_scheduler = scheduler.max_array_size() if ask_scheduler else None
    limit = cluster.profile.max_array_size
    return min(limit, from_scheduler) if from_scheduler else limit


def prepare(
    plan: Plan,
    cluster: Cluster,
    *,
    mode: Mode = "cached",
    retry_failed: bool = False,
    stages: list[str] | None = None,
    ask_scheduler: bool = True,
) -> Submission:
    """Decide what to submit: tasks, arrays, dependencies, resources; nothing is submitted.

    Reads the artifacts (writing done stamps, see :mod:`moespec.launch.donecheck`), the
    submission records and, with ``ask_scheduler``, sacct, ``scontrol`` and ``sinfo`` once each.

    Raises
    ------
    ConfigError
        Unknown stage in ``stages``; resources above the profile's limits; read-only mode.
    ClusterError
        The scheduler has no such partition; job states cannot be read although earlier
        submissions exist (submitting again could run a task twice); a task could never start.
    """
    if mode == "read-only":
        raise ConfigError("infra.mode: read-only runs nothing; nothing can be submitted")
    unknown = sorted(set(stages or []) - set(plan.stages()))
    if unknown:
        raise ConfigError(f"--stages: {', '.join(unknown)} not in this experiment (stages: {', '.join(plan.stages())})")
    resources = check_resources(cluster, plan.experiment, plan.stages())
    statuses = collect_status(plan, ask_scheduler=ask_scheduler)
    unknown_states = [s for s in statuses if s.state == "unknown"]
    if unknown_states and ask_scheduler:
        raise ClusterError(
            f"the state of {len(unknown_states)} submitted task(s) is unknown "
            f"({unknown_states[0].task.label}: {unknown_states[0].detail}); refusing to submit them "
            f"again while they may still run. Check `moespec status` once sacct answers."
        )
    cancelling = [s for s in statuses if s.state == "cancelling"]
    if cancelling:
        raise ClusterError(
            f"{len(cancelling)} task(s) are being cancelled and their processes still run "
            f"({cancelling[0].task.label}, job {cancelling[0].job_id}); submit again once "
            f"`moespec status` says they ended"
        )
    active = {s.key: s.job_id for s in statuses if s.state in ("running", "pending")}
    done = {s.key for s in statuses if s.state == "done"} if mode != "force" else set()
    wanted = [s for s in statuses if s.key not in active and (not stages or s.task.stage in stages)]
    notes = retry_notes(plan, wanted) if retry_failed else []
    if retry_failed:
        wanted = [s for s in wanted if s.state == "failed"]
    elif mode != "force":
        wanted = [s for s in wanted if s.state != "done"]
    max_size = effective_max_array_size(cluster, ask_scheduler)
    arrays = plan_arrays(
        plan, [s.task for s in wanted], resources=resources, max_array_size=max_size, done=done, active_jobs=active
    )
    if ask_scheduler and arrays:
        check_partitions(arrays, cluster)
    skipped = sum(1 for s in statuses if s.key in active and (not stages or s.task.stage in stages))
    return Submission(plan, cluster, mode, arrays, statuses, max_size, skipped, retry_failed=retry_failed, notes=notes)


def retry_notes(plan: Plan, statuses: list[TaskStatus]) -> list[str]:
    """What ``--retry-failed`` leaves out: tasks never submitted, often because a fix changed their uids.

    A task's uid hashes its config, so fixing the value that made a task fail gives a new task:
    the failed one is no longer in the plan and the new one was never submitted.
    """
    never = [s for s in statuses if s.state == "not submitted"]
    if not never:
        return []
    experiment = plan.experiment
    current = {s.key for s in statuses} | {task_key(t) for t in plan.tasks}
    gone = [key for key in latest_entries(load_records(experiment.root, experiment.name)) if key not in current]
    stages = sorted({s.task.stage for s in never}, key=plan.stages().index)
    counts = ", ".join(f"{stage} {sum(s.task.stage == stage for s in never)}" for stage in stages)
    note = (
        f"--retry-failed resubmits only tasks whose jobs failed; {len(never)} task(s) were never submitted "
        f"({counts}) and are left out"
    )
    if gone:
        gone_stages = sorted({key[0] for key in gone})
        note += (
            f"; {len(gone)} task(s) of earlier submissions ({', '.join(gone_stages)}) are no longer in the plan: "
            f"their config changed since (a fix changes a task's uid), so they come back as new tasks"
        )
    return [note + f". Submit them with: moespec submit {experiment.source} (without --retry-failed)"]


def check_partitions(arrays: list[ArrayJob], cluster: Cluster) -> None:
    """Refuse partitions the scheduler does not have (skipped when sinfo cannot answer)."""
    known = scheduler.partitions()
    if known is None:
        return
    for array in arrays:
        partition = array.resources.slurm_partition
        if partition and partition not in known:
            raise ClusterError(
                f"the {array.stage} stage asks for partition {partition!r} (profile {cluster.name!r}, "
                f"{cluster.path}), which this scheduler does not have; partitions: {', '.join(known)}"
            )


# --------------------------------------------------------------------------------------------------
# sbatch parameters (submitit's SlurmExecutor names)


def mem_string(mem_gb: float) -> str:
    """Same conversion as submitit's ``_convert_mem``: whole GB as ``4GB``, else MB."""
    return f"{int(mem_gb)}GB" if mem_gb == int(mem_gb) else f"{int(mem_gb * 1024)}MB"


def sbatch_parameters(array: ArrayJob, *, job_name: str, setup: list[str], dependency: str) -> dict[str, Any]:
    """``SlurmExecutor.update_parameters`` arguments of one array."""
    res: Resources = array.resources
    params: dict[str, Any] = {
        "job_name": job_name,
        "time": res.timeout_min,
        "cpus_per_task": res.cpus_per_task,
        "mem": mem_string(res.mem_gb),
        "array_parallelism": array.parallelism,
        "setup": list(setup),
        # Without it a dependant of a failed task stays PENDING (DependencyNeverSatisfied) forever
        # unless the cluster sets DependencyParameters=kill_invalid_depend.
        "additional_parameters": {"kill-on-invalid-dep": "yes", **res.slurm_additional_parameters},
    }
    if res.gpus_per_node:  # --gpus-per-node=0 is refused on clusters without GPU GRES
        params["gpus_per_node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint", "signal_delay_s"):
        value = getattr(res, f"slurm_{key}")
        if value is not None:
            params[key] = value
    if dependency:
        params["dependency"] = dependency
    return params


def job_setup(submission: Submission) -> list[str]:
    """Lines every job runs before Python: the profile's, thread counts, the code snapshot first on PYTHONPATH."""
    lines = list(submission.cluster.profile.setup)
    lines.append(f'for variable in {THREAD_VARIABLES}; do export "$variable=${{SLURM_CPUS_PER_TASK:-1}}"; done')
    lines.append(f"export PYTHONPATH={shlex.quote(str(submission.snapshot_dir))}${{PYTHONPATH:+:$PYTHONPATH}}")
    commit = artifacts.git_commit()
    if commit:
        # The snapshot is not a git checkout; keep the commit it was taken from for provenance.
        lines.append(f"export MOESPEC_GIT_COMMIT={shlex.quote(commit)}")
    return lines


def job_name(submission: Submission, array: ArrayJob) -> str:
    return f"moespec-{submission.plan.experiment.name}-{array.stage}"


def python_command(cluster: Cluster) -> str:
    return cluster.profile.python or shlex.quote(sys.executable)


def render_script(submission: Submission, array: ArrayJob, dependency: str) -> str:
    """The sbatch script submitit will write for ``array`` (for ``--dry-run``)."""
    from submitit.slurm.slurm import _make_sbatch_string  # what SlurmExecutor itself renders

    folder = submission.submitit_folder
    params = sbatch_parameters(
        array, job_name=job_name(submission, array), setup=job_setup(submission), dependency=dependency
    )
    command = " ".join([python_command(submission.cluster), "-u -m submitit.core._submit", shlex.quote(str(folder))])
    # submitit submits a single task as a plain job, not as an array of one.
    map_count = len(array.tasks) if len(array.tasks) > 1 else None
    return _make_sbatch_string(command=command, folder=folder, map_count=map_count, **params)


def log_pattern(submission: Submission, array: ArrayJob) -> str:
    """Where submitit's stderr of each task goes (``%A``/``%a`` or ``%j`` left to fill)."""
    stderr = str(submitit.core.utils.JobPaths(submission.submitit_folder).stderr).replace("%t", "0")
    return stderr.replace("%j", "%A_%a") if len(array.tasks) > 1 else stderr


# --------------------------------------------------------------------------------------------------
# describing and submitting


def describe(submission: Submission) -> list[str]:
    """Notes, then one line per array of a submission (or why there is none)."""
    if submission.arrays:
        return submission.notes + describe_arrays(submission.arrays)
    if submission.retry_failed:
        nothing = "nothing to submit: no task's job failed"
    else:
        nothing = "nothing to submit: every task is done"
    queued = f" (or already queued: {submission.skipped_active})" if submission.skipped_active else ""
    return submission.notes + [nothing + queued]


def describe_arrays(arrays: list[ArrayJob]) -> list[str]:
    """One line per array: name, tasks, array spec, dependencies, resources."""
    if not arrays:
        return ["  (none: every task is done)"]
    lines = []
    for array in arrays:
        res = array.resources
        extras = ", ".join(
            f"{k.removeprefix('slurm_')}={v}"
            for k, v in (
                ("slurm_partition", res.slurm_partition),
                ("slurm_account", res.slurm_account),
                ("slurm_qos", res.slurm_qos),
            )
            if v
        )
        lines.append(
            f"  {array.name:<10} {len(array.tasks):>5} task(s)  --array={array.array_spec():<12} "
            f"after: {array.waits_for(arrays):<22} time={res.timeout_min}m cpus={res.cpus_per_task} "
            f"mem={mem_string(res.mem_gb)} gpus={res.gpus_per_node}" + (f" {extras}" if extras else "")
        )
    return lines


def print_dry_run(submission: Submission, echo: Callable[[str], None] = print) -> None:
    """Print what would be submitted, with each array's rendered sbatch script. Writes nothing."""
    echo(
        f"dry run: {submission.num_tasks} task(s) in {len(submission.arrays)} array(s) on cluster "
        f"{submission.cluster.name} (MaxArraySize {submission.max_array_size}); nothing is submitted"
    )
    for line in describe(submission):
        echo(line)
    placeholders = [f"<job id of {a.name}>" for a in submission.arrays]
    for array in submission.arrays:
        echo(
            f"\n# ---- sbatch script of array {array.name} ({len(array.tasks)} task(s): indices "
            f"{','.join(map(str, array.task_indices[:20]))}{',...' if len(array.task_indices) > 20 else ''})"
        )
        echo(render_script(submission, array, array.dependency(placeholders)))


def snapshot_package(destination: Path) -> Path:
    """Copy the moespec package the submitter runs into ``destination/moespec`` (like RsyncSnapshot).

    Only the package is copied (kilobytes), not the checkout: jobs import moespec from here, and
    everything else (torch, h5py...) from the cluster's environment.
    """
    import moespec

    source = Path(moespec.__file__).resolve().parent
    target = destination / "moespec"
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"), dirs_exist_ok=True)
    return destination


def submit(submission: Submission, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Submit every array in order, each after its upstream arrays; record job ids as they come.

    Returns
    -------
    dict
        The submission record (also written to ``submission.record_path``).

    Raises
    ------
    ClusterError
        sbatch refused an array (the message names it and quotes sbatch); the arrays already
        submitted by this submission were cancelled and the record says so.
    """
    experiment = submission.plan.experiment
    record: dict[str, Any] = {
        "id": submission.id,
        "created": artifacts.now_iso(),
        "executor": "slurm",
        "cluster": submission.cluster.name,
        "profile": str(submission.cluster.path),
        "mode": submission.mode,
        "experiment": experiment.name,
        "source": experiment.source,
        "snapshot": str(submission.snapshot_dir),
        "state": "submitting",
        "arrays": [],
    }
    if not submission.arrays:
        return record
    snapshot_package(submission.snapshot_dir)
    write_record(submission.record_path, record)
    job_ids: list[str] = []
    for array in submission.arrays:
        dependency = array.dependency(job_ids)
        try:
            master = _submit_array(submission, array, dependency)
        except BaseException as e:  # refused, or interrupted (Ctrl-C): leave nothing half-submitted
            scheduler.cancel(job_ids)
            record.update(state="aborted", error=str(e) or type(e).__name__, cancelled=job_ids)
            write_record(submission.record_path, record)
            if not isinstance(e, ClusterError):
                raise
            cancelled = (
                f"; cancelled the {len(job_ids)} array(s) it had already queued ({', '.join(job_ids)})"
                if job_ids
                else "; nothing had been queued"
            )
            raise ClusterError(
                f"submission {submission.id} stopped at array {array.name}: {e}{cancelled}. "
                f"Record: {submission.record_path}"
            ) from e
        job_ids.append(master)
        # submitit submits a single task as a plain job (id "123", not "123_0").
        record["arrays"].append(
            array_entry(array, master, log_pattern(submission, array), single=len(array.tasks) == 1)
        )
        write_record(submission.record_path, record)
        echo(
            f"  submitted {array.name:<10} job {master:<8} {len(array.tasks)} task(s)"
            + (f", {dependency}" if dependency else "")
        )
    record["state"] = "submitted"
    write_record(submission.record_path, record)
    return record


def _submit_array(submission: Submission, array: ArrayJob, dependency: str) -> str:
    """One ``map_array`` call; returns the array's job id (a plain job id for a single task)."""
    params = sbatch_parameters(
        array, job_name=job_name(submission, array), setup=job_setup(submission), dependency=dependency
    )
    max_num_timeout = array.resources.slurm_max_num_timeout
    attempts = 3
    for attempt in range(1, attempts + 1):
        try:
            executor = submitit.SlurmExecutor(
                folder=str(submission.submitit_folder),
                max_num_timeout=3 if max_num_timeout is None else max_num_timeout,
                python=python_command(submission.cluster),
            )
            executor.update_parameters(**params)
            n = len(array.tasks)
            jobs = executor.map_array(
                TaskJob(), list(array.tasks), [submission.mode] * n, [array.resources.cpus_per_task] * n
            )
            return jobs[0].job_id.split("_")[0]
        except submitit.core.utils.FailedJobError as e:
            message = str(e).strip() or repr(e)
            if attempt < attempts and any(word in message for word in _TRANSIENT):
                log.warning("sbatch failed for array %s (%s); retrying in %d s", array.name, message, 2 * attempt)
                time.sleep(2 * attempt)
                continue
            raise ClusterError(f"sbatch refused it: {message}") from e
        except (RuntimeError, ValueError) as e:  # no srun on PATH; bad parameter names
            raise ClusterError(f"cannot submit: {e}") from e
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------------
# what the CLI calls


def planned_arrays(plan: Plan, cluster: Cluster | None) -> tuple[dict[TaskKey, str], list[ArrayJob]]:
    """For ``moespec plan``: why each task is not done ('done' for done ones), and the arrays of the rest.

    Asks no scheduler. Where the artifacts are not on this machine (``plan.root_unavailable``)
    every task counts as to run.
    """
    checks = {task_key(t): (False, "") if plan.root_unavailable else donecheck.check(t) for t in plan.tasks}
    done = {key for key, (is_done, _) in checks.items() if is_done}
    if cluster is not None:
        resources = check_resources(cluster, plan.experiment, plan.stages())
    else:
        resources = {s: stage_resources(None, plan.experiment, s) for s in plan.stages()}
    size = cluster.profile.max_array_size if cluster is not None else DEFAULT_MAX_ARRAY_SIZE
    todo = [t for t in plan.tasks if task_key(t) not in done]
    why = {key: "done" if is_done else reason for key, (is_done, reason) in checks.items()}
    return why, plan_arrays(plan, todo, resources=resources, max_array_size=size, done=done)


def submit_command(
    plan: Plan,
    cluster: Cluster,
    *,
    mode: Mode,
    stages: list[str] | None = None,
    retry_failed: bool = False,
    dry_run: bool = False,
    emit_dir: str | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any] | None:
    """``moespec submit`` for Slurm: prepare, then dry-run, emit plain sbatch scripts, or submit.

    Returns the submission record (None for a dry run or emitted scripts).
    """
    if emit_dir:
        from moespec.launch.sbatch import check_emit_dir

        check_emit_dir(emit_dir)
    if not (emit_dir or dry_run or scheduler.available()):
        raise ClusterError(
            "sbatch/sacct are not on PATH: run this on a Slurm login node, or use --dry-run, "
            "or --emit-sbatch DIR to write scripts to submit there"
        )
    # A dry run or emitted scripts need no scheduler: one try; a submission retries a flaky one.
    retries = 0 if (emit_dir or dry_run) else len(scheduler.RETRY_DELAYS_S)
    ask, problem = scheduler.reachable(retries) if scheduler.available() else (False, "")
    if problem and not (emit_dir or dry_run):
        raise ClusterError(f"the Slurm controller does not answer ({problem}); nothing was submitted")
    if problem:
        echo(
            f"note: the Slurm controller does not answer ({problem}); MaxArraySize is the profile's, and "
            f"partitions and earlier jobs are not checked"
        )
    submission = prepare(plan, cluster, mode=mode, retry_failed=retry_failed, stages=stages, ask_scheduler=ask)
    experiment = plan.experiment
    echo(
        f"experiment {experiment.name}: {len(plan.tasks)} tasks; {submission.num_tasks} to submit"
        + (f", {submission.skipped_active} already pending or running" if submission.skipped_active else "")
        + f"; cluster {cluster.name}; results under {experiment.root / experiment.name}"
    )
    if dry_run:
        print_dry_run(submission, echo)
        return None
    for line in describe(submission):
        echo(line)
    if emit_dir:
        from moespec.launch.sbatch import emit

        emit(submission, Path(emit_dir), echo)
        return None
    record = submit(submission, echo)
    if submission.arrays:
        echo(f"record: {submission.record_path}\nfollow with: moespec status {experiment.source}")
    return record
