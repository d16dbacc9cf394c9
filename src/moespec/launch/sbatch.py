"""Plain sbatch: render the arrays of a submission as job scripts and one ``submit.sh`` (``--emit-sbatch``).

For users who prefer ``sbatch`` alone. Each array task runs
``moespec run STAGE --config DIR/experiment.yaml --task <index>``, the index looked up by
``SLURM_ARRAY_TASK_ID`` in the task list written into the script; ``experiment.yaml`` is the
experiment file with its root as the jobs see it, so the task list of ``plan.tasks_for(stage)``
is the same in every job as it was here (checked when emitting). Jobs call the cluster profile's
``python`` and run in the project folder (``submit.sh`` starts them there): the scripts hold no
path of the machine that wrote them. Templates ship with the package
(``moespec/launch/templates/``, ``{{name}}`` placeholders, every one required; ``$MOESPEC_JOBS``
points at another folder of them); rendering is pure.
"""

from __future__ import annotations

import importlib.resources
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from moespec import artifacts
from moespec.config import load_experiment, read_yaml, resolve_relative_paths
from moespec.errors import ConfigError
from moespec.launch.arrays import ArrayJob
from moespec.launch.plan import make_plan
from moespec.launch.records import array_entry, write_record
from moespec.launch.profiles import DEFAULT_SIGNAL_DELAY_S, Cluster
from moespec.launch.slurm import THREAD_VARIABLES, Submission, mem_string

_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
#: Requeues allowed after a time limit or preemption (submitit's ``max_num_timeout`` default).
DEFAULT_MAX_REQUEUES = 3


def template_dirs() -> list[Path]:
    """Where ``array.sbatch`` and ``submit.sh`` are looked up: ``$MOESPEC_JOBS``, then the package's own."""
    dirs = [Path(os.environ["MOESPEC_JOBS"]).expanduser()] if os.environ.get("MOESPEC_JOBS") else []
    return dirs + [Path(str(importlib.resources.files("moespec.launch") / "templates"))]


def read_template(name: str) -> str:
    for folder in template_dirs():
        if (folder / name).is_file():
            return (folder / name).read_text(encoding="utf-8")
    raise ConfigError(f"template {name!r} not found in {', '.join(map(str, template_dirs()))} (set $MOESPEC_JOBS)")


def render(template: str, values: Mapping[str, Any]) -> str:
    """Fill ``{{name}}`` placeholders; a line holding only an empty placeholder is dropped.

    Raises
    ------
    ConfigError
        The template uses a name that has no value (a typo in a template must not pass silently).
    """
    missing = sorted({m.group(1) for m in _PLACEHOLDER.finditer(template)} - set(values))
    if missing:
        raise ConfigError(f"sbatch template: no value for {', '.join('{{' + m + '}}' for m in missing)}")
    lines = []
    for line in template.splitlines():
        only = _PLACEHOLDER.fullmatch(line.strip())
        if only and str(values[only.group(1)]) == "":
            continue
        lines.append(_PLACEHOLDER.sub(lambda m: str(values[m.group(1)]), line))
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class ScriptContext:
    """Everything about the place the scripts run in (paths are parameters, so rendering is pure).

    ``config`` and ``script_dir`` are relative to the project folder (where ``moespec submit``
    ran), which is where ``submit.sh`` starts the jobs: the scripts hold no path of the machine
    that wrote them, so the project can be copied to a cluster and submitted there.
    """

    experiment: str
    cluster: str
    config: Path
    script_dir: Path
    moespec: str
    setup: tuple[str, ...]
    mode: str

    @property
    def log_dir(self) -> Path:
        return self.script_dir / "logs"

    @property
    def project_dir(self) -> str:
        """The project folder, relative to the scripts' folder (``../..`` for ``jobs/X``)."""
        return os.path.relpath(".", self.script_dir)


def sbatch_options(array: ArrayJob) -> list[str]:
    """``#SBATCH`` lines for the optional resources of an array (GPUs, partition, extras)."""
    res = array.resources
    options: dict[str, Any] = {}
    if res.gpus_per_node:
        options["gpus-per-node"] = res.gpus_per_node
    for key in ("partition", "account", "qos", "constraint"):
        value = getattr(res, f"slurm_{key}")
        if value is not None:
            options[key] = value
    options.update(res.slurm_additional_parameters)
    lines = []
    for key, value in options.items():
        key = key.replace("_", "-")
        lines.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={shlex.quote(str(value))}")
    return lines


def render_array(array: ArrayJob, context: ScriptContext, template: str | None = None) -> str:
    """The job script of one array."""
    res = array.resources
    values = {
        "experiment": context.experiment,
        "stage": array.stage,
        "chunk": array.chunk,
        "name": array.name,
        "num_tasks": len(array.tasks),
        "task_indices": " ".join(map(str, array.task_indices)),
        "job_name": f"moespec-{context.experiment}-{array.stage}",
        "array": array.array_spec(),
        "time": res.timeout_min,
        "cpus_per_task": res.cpus_per_task,
        "mem": mem_string(res.mem_gb),
        "sbatch_options": "\n".join(sbatch_options(array)),
        "log_dir": shlex.quote(str(context.log_dir)),
        "thread_variables": THREAD_VARIABLES,
        "signal_delay_s": res.slurm_signal_delay_s or DEFAULT_SIGNAL_DELAY_S,
        "cluster": context.cluster,
        "setup": "\n".join(context.setup) if context.setup else "# (none)",
        "max_requeues": DEFAULT_MAX_REQUEUES if res.slurm_max_num_timeout is None else res.slurm_max_num_timeout,
        "moespec": context.moespec,
        "config": shlex.quote(str(context.config)),
        "mode": context.mode,
    }
    return render(template if template is not None else read_template("array.sbatch"), values)


def script_name(array: ArrayJob) -> str:
    return f"{array.name}.sbatch"


def render_submit(arrays: list[ArrayJob], context: ScriptContext, template: str | None = None) -> str:
    """``submit.sh``: one ``submit`` line per array, in order, with its ``afterok`` dependencies."""
    variables = [f"${{job_{a.name.replace('.', '_')}}}" for a in arrays]
    lines = []
    for array in arrays:
        after = array.dependency(variables)
        dependency = f' --dependency="{after}"' if after else ""
        lines.append(f'submit {array.name}{dependency} "$here/{script_name(array)}"')
    values = {
        "experiment": context.experiment,
        "project_dir": shlex.quote(context.project_dir),
        "submit_lines": "\n".join(lines) or "echo 'nothing to submit'",
    }
    return render(template if template is not None else read_template("submit.sh"), values)


def moespec_command(cluster: Cluster) -> str:
    """How jobs call moespec: the cluster profile's ``python`` (never the interpreter that emits).

    Raises
    ------
    ConfigError
        The profile does not say which Python runs jobs on the cluster.
    """
    python = cluster.profile.python
    if not python:
        raise ConfigError(
            f"{cluster.path}: python: not set; --emit-sbatch needs the cluster's Python (the "
            f"interpreter of its virtualenv, e.g. `python: $WORK/venvs/moespec/bin/python`, or "
            f"`python: python` after a `source .../activate` line in setup), since the scripts "
            f"run on the cluster, not here"
        )
    return f"{python} -m moespec.cli"


def portable_path(path: Path, project: Path) -> str:
    """``path`` relative to the project folder when it lies inside it, else absolute."""
    path, project = Path(path).resolve(), Path(project).resolve()
    return str(path.relative_to(project)) if path.is_relative_to(project) else str(path)


def resolved_config(source: str, root: str) -> dict[str, Any]:
    """The experiment file's content with ``root`` as jobs must see it (relative to the project folder) and
    relative data paths made absolute (the copy lives in another folder than the file it copies)."""
    raw = resolve_relative_paths(read_yaml(Path(source)), Path(source).absolute().parent)
    raw["root"] = root
    return raw


def emit(submission: Submission, directory: Path, echo: Callable[[str], None] = print) -> list[Path]:
    """Write the array scripts, ``submit.sh`` and ``experiment.yaml`` into ``directory``; record them.

    Raises
    ------
    ConfigError
        The experiment does not come from a file, or re-planning the written config does not give
        the same task lists (then array indices would point at the wrong tasks).
    """
    experiment = submission.plan.experiment
    if experiment.source == "<dict>":
        raise ConfigError("--emit-sbatch needs an experiment file (jobs read it)")
    command = moespec_command(submission.cluster)
    project = Path.cwd()
    directory = Path(directory).resolve()
    check_emit_dir(directory)
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    config_path = directory / "experiment.yaml"
    root = portable_path(experiment.root, project)
    header = (
        f"# {experiment.source} as submitted by `moespec submit --emit-sbatch` ({artifacts.now_iso()}),\n"
        f"# with its root as the jobs see it (relative to the project folder, where submit.sh starts them).\n"
        f"# The job scripts beside it run tasks of this file.\n"
    )
    artifacts.atomic_write_text(
        config_path, header + yaml.safe_dump(resolved_config(experiment.source, root), sort_keys=False)
    )
    _check_same_tasks(submission, config_path)
    script_dir = Path(portable_path(directory, project))
    context = ScriptContext(
        experiment.name,
        submission.cluster.name,
        script_dir / "experiment.yaml",
        script_dir,
        command,
        tuple(submission.cluster.profile.setup),
        submission.mode,
    )
    written = [config_path]
    for array in submission.arrays:
        path = directory / script_name(array)
        artifacts.atomic_write_text(path, render_array(array, context))
        written.append(path)
    submit_path = directory / "submit.sh"
    artifacts.atomic_write_text(submit_path, render_submit(submission.arrays, context))
    submit_path.chmod(0o755)
    written.append(submit_path)

    def beside(path: Path) -> str:  # relative to the record, so that the project can move with it
        return os.path.relpath(path, submission.record_path.parent)

    record = {
        "id": submission.id,
        "created": artifacts.now_iso(),
        "executor": "sbatch",
        "cluster": submission.cluster.name,
        "profile": str(submission.cluster.path),
        "mode": submission.mode,
        "experiment": experiment.name,
        "source": experiment.source,
        "script_dir": beside(directory),
        "job_ids_file": beside(directory / "job_ids.txt"),
        "state": "emitted",
        "arrays": [array_entry(a, None, beside(directory / "logs" / f"{a.name}-%A_%a.err")) for a in submission.arrays],
    }
    if submission.arrays:
        write_record(submission.record_path, record)
    for line in [
        f"wrote {len(submission.arrays)} array script(s) to {directory}",
        f"submit them with: bash {submit_path}",
    ]:
        echo(line)
    return written


def check_emit_dir(directory: Path | str) -> None:
    """Refuse to overwrite scripts that were submitted (their ``submit.sh`` wrote ``job_ids.txt``)."""
    if (Path(directory) / "job_ids.txt").exists():
        raise ConfigError(
            f"--emit-sbatch: {Path(directory).resolve()} holds scripts that were already submitted "
            f"(job_ids.txt); emit into a new folder"
        )


def _check_same_tasks(submission: Submission, config_path: Path) -> None:
    replanned = make_plan(load_experiment(config_path))  # the root resolves against the cwd, as in jobs
    for stage in submission.plan.stages():
        before = [(t.uid, t.shard_index) for t in submission.plan.tasks_for(stage)]
        after = [(t.uid, t.shard_index) for t in replanned.tasks_for(stage)]
        if before != after:
            raise ConfigError(
                f"{config_path}: re-planning the written config changes the {stage} task list; "
                f"array indices would not match (please report this)"
            )
