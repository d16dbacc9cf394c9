"""Plain sbatch: render the arrays of a submission as job scripts and one ``submit.sh`` (``--emit-sbatch``).

For users who prefer ``sbatch`` alone. Each array task runs
``moespec run STAGE --config DIR/experiment.yaml --task $((SLURM_ARRAY_TASK_ID + OFFSET))``;
``experiment.yaml`` is the experiment file with its root made absolute, so the task list of
``plan.tasks_for(stage)`` is the same in every job as it was here (checked when emitting).
Templates live in ``jobs/`` (``{{name}}`` placeholders, every one required); rendering is pure.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
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
from moespec.launch.slurm import Submission, dependency_ids, mem_string

_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")
#: Requeues allowed after a time limit or preemption (submitit's ``max_num_timeout`` default).
DEFAULT_MAX_REQUEUES = 3


def template_dirs() -> list[Path]:
    """Where ``array.sbatch`` and ``submit.sh`` are looked up: ``$MOESPEC_JOBS``, ``./jobs``, the checkout's ``jobs/``."""
    dirs = [Path(os.environ["MOESPEC_JOBS"])] if os.environ.get("MOESPEC_JOBS") else []
    return dirs + [Path.cwd() / "jobs", Path(__file__).resolve().parents[3] / "jobs"]


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
    """Everything about the place the scripts run in (paths are parameters, so rendering is pure)."""

    experiment: str
    cluster: str
    config: Path
    script_dir: Path
    workdir: Path
    moespec: str
    setup: tuple[str, ...]
    mode: str

    @property
    def log_dir(self) -> Path:
        return self.script_dir / "logs"


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
        "experiment": context.experiment, "stage": array.stage, "chunk": array.chunk, "name": array.name,
        "num_tasks": len(array.tasks), "offset": array.offset, "job_name": f"moespec-{context.experiment}-{array.stage}",
        "array": array.array_spec(), "time": res.timeout_min, "cpus_per_task": res.cpus_per_task,
        "mem": mem_string(res.mem_gb), "sbatch_options": "\n".join(sbatch_options(array)),
        "log_dir": shlex.quote(str(context.log_dir)), "workdir": shlex.quote(str(context.workdir)),
        "signal_delay_s": res.slurm_signal_delay_s or 90, "cluster": context.cluster,
        "setup": "\n".join(context.setup) if context.setup else "# (none)",
        "max_requeues": DEFAULT_MAX_REQUEUES if res.slurm_max_num_timeout is None else res.slurm_max_num_timeout,
        "moespec": context.moespec, "config": shlex.quote(str(context.config)), "mode": context.mode,
    }
    return render(template if template is not None else read_template("array.sbatch"), values)


def script_name(array: ArrayJob) -> str:
    return f"{array.name}.sbatch"


def render_submit(arrays: list[ArrayJob], context: ScriptContext, template: str | None = None) -> str:
    """``submit.sh``: one ``submit`` line per array, in order, with its ``afterok`` dependencies."""
    variables = [f"${{job_{a.name.replace('.', '_')}}}" for a in arrays]
    lines = []
    for array in arrays:
        after = dependency_ids(array, variables)
        dependency = f' --dependency="afterok:{":".join(after)}"' if after else ""
        lines.append(f'submit {array.name}{dependency} "$here/{script_name(array)}"')
    values = {"experiment": context.experiment, "submit_lines": "\n".join(lines) or "echo 'nothing to submit'"}
    return render(template if template is not None else read_template("submit.sh"), values)


def moespec_command(python: str | None) -> str:
    """How jobs call moespec: the profile's Python, else the console script beside this interpreter."""
    if python:
        return f"{python} -m moespec.cli"
    script = Path(sys.executable).parent / "moespec"
    return shlex.quote(str(script)) if script.exists() else f"{shlex.quote(sys.executable)} -m moespec.cli"


def resolved_config(source: str, root: Path) -> dict[str, Any]:
    """The experiment file's content with ``root`` and relative paths made absolute (jobs must not depend
    on their cwd, and the copy lives in another folder)."""
    raw = resolve_relative_paths(read_yaml(Path(source)), Path(source).absolute().parent)
    raw["root"] = str(root)
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
    directory = Path(directory).resolve()
    (directory / "logs").mkdir(parents=True, exist_ok=True)
    config_path = directory / "experiment.yaml"
    header = (f"# {experiment.source} as submitted by `moespec submit --emit-sbatch` ({artifacts.now_iso()}),\n"
              f"# with its root made absolute. The job scripts beside it run tasks of this file.\n")
    artifacts.atomic_write_text(config_path, header + yaml.safe_dump(resolved_config(experiment.source, experiment.root),
                                                                     sort_keys=False))
    _check_same_tasks(submission, config_path)
    context = ScriptContext(experiment.name, submission.cluster.name, config_path, directory, Path.cwd(),
                            moespec_command(submission.cluster.profile.python),
                            tuple(submission.cluster.profile.setup), submission.mode)
    written = [config_path]
    for array in submission.arrays:
        path = directory / script_name(array)
        artifacts.atomic_write_text(path, render_array(array, context))
        written.append(path)
    submit_path = directory / "submit.sh"
    artifacts.atomic_write_text(submit_path, render_submit(submission.arrays, context))
    submit_path.chmod(0o755)
    written.append(submit_path)
    record = {
        "id": submission.id, "created": artifacts.now_iso(), "executor": "sbatch", "cluster": submission.cluster.name,
        "profile": str(submission.cluster.path), "mode": submission.mode, "experiment": experiment.name,
        "source": experiment.source, "script_dir": str(directory), "job_ids_file": str(directory / "job_ids.txt"),
        "state": "emitted",
        "arrays": [array_entry(a, None, str(context.log_dir / f"{a.name}-%A_%a.err")) for a in submission.arrays],
    }
    if submission.arrays:
        write_record(submission.record_path, record)
    for line in [f"wrote {len(submission.arrays)} array script(s) to {directory}", f"submit them with: bash {submit_path}"]:
        echo(line)
    return written


def _check_same_tasks(submission: Submission, config_path: Path) -> None:
    replanned = make_plan(load_experiment(config_path))
    for stage in submission.plan.stages():
        before = [(t.uid, t.shard_index) for t in submission.plan.tasks_for(stage)]
        after = [(t.uid, t.shard_index) for t in replanned.tasks_for(stage)]
        if before != after:
            raise ConfigError(f"{config_path}: re-planning the written config changes the {stage} task list; "
                              f"array indices would not match (please report this)")
