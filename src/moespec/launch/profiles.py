"""Cluster profiles: the facts of one cluster, kept apart from the science (``hpc/clusters/*.yaml``).

A project keeps its clusters' profiles in ``hpc/clusters/``; ``localhost`` and ``example`` ship
with the package (``moespec/launch/clusters/``), so they are found without a checkout.

A profile names the cluster's partition, account, QOS and constraint, what a node offers (the
limits a job is checked against before anything is submitted), the scratch root, the setup lines
every job runs first, and the resources each stage asks for by default. Resource keys use
submitit's own names (``timeout_min``, ``cpus_per_task``, ``gpus_per_node``, ``mem_gb``, then
``slurm_*`` extras), the same as ``infra.resources`` in an experiment file.

A stage's resources are layered: :class:`~moespec.config.Resources` defaults, the profile's
``defaults``, the profile's ``stages.<stage>``, then the experiment's ``infra.resources.<stage>``;
each layer overrides only the keys it sets.
"""

from __future__ import annotations

import importlib.resources
import math
import os
import re
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moespec.config import Experiment, Resources, format_validation_error, read_yaml
from moespec.errors import ConfigError
from moespec.stages.base import check_stage_names

#: Slurm's default MaxArraySize (indices 0..1000); used when neither the scheduler nor the profile says.
DEFAULT_MAX_ARRAY_SIZE = 1001
#: submitit's default ``slurm_signal_delay_s`` (the emitted scripts use it too).
DEFAULT_SIGNAL_DELAY_S = 90
#: The least work a job must get before its checkpoint signal (USR2): Slurm checks time limits on
#: a 30-60 s cadence, so the signal can come up to a minute early, and a job that never gets to
#: work is requeued until it runs out of requeues ("timed-out too many times").
MIN_WORK_BEFORE_SIGNAL_S = 60
_PROFILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class ClusterProfile(BaseModel):
    """One cluster, as read from ``hpc/clusters/<name>.yaml``.

    The top-level keys are the cluster's facts; ``defaults`` and ``stages`` are what jobs ask for.
    ``gpus_per_node``, ``cpus_per_node``, ``mem_gb_per_node`` and ``max_timeout_min`` are limits:
    a stage asking for more is refused before anything is submitted.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = ""
    partition: Optional[str] = None
    account: Optional[str] = None
    qos: Optional[str] = None
    constraint: Optional[str] = None
    gpus_per_node: int = Field(0, ge=0)
    cpus_per_node: Optional[int] = Field(None, ge=1)
    mem_gb_per_node: Optional[float] = Field(None, gt=0)
    max_timeout_min: Optional[int] = Field(None, ge=1)
    #: Used when the scheduler cannot be asked (``scontrol show config``); the smaller of the two wins.
    max_array_size: int = Field(DEFAULT_MAX_ARRAY_SIZE, ge=1)
    array_parallelism: int = Field(64, ge=1)
    #: Relative experiment roots are placed under it (``$VAR`` and ``~`` are expanded at submission).
    scratch_root: Optional[str] = None
    #: Shell lines every job runs first: module loads, activating the cluster's virtualenv, exports.
    setup: list[str] = Field(default_factory=list)
    #: The Python that runs jobs on the cluster (a path relative to the project folder, where jobs
    #: start, or a command found after ``setup``). Emitted sbatch scripts need it; submitit jobs
    #: default to the interpreter that submits.
    python: Optional[str] = None
    defaults: Resources = Resources()
    stages: dict[str, Resources] = Field(default_factory=dict)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, value: dict[str, Resources]) -> dict[str, Resources]:
        return check_stage_names(value)


class Cluster:
    """A loaded profile and where it came from (error messages name the file)."""

    def __init__(self, name: str, path: Path, profile: ClusterProfile):
        self.name = name
        self.path = path
        self.profile = profile

    def __repr__(self) -> str:
        return f"Cluster({self.name!r}, {str(self.path)!r})"


# --------------------------------------------------------------------------------------------------
# finding and loading


def builtin_profiles_dir() -> Path:
    """The profiles shipped with the package (``localhost``, ``example``)."""
    return Path(str(importlib.resources.files("moespec.launch") / "clusters"))


def profile_dirs() -> list[Path]:
    """Where profiles are looked up by name, in order.

    ``$MOESPEC_CLUSTERS`` (``os.pathsep``-separated folders), the project's ``./hpc/clusters``,
    then the profiles shipped with the package (``moespec/launch/clusters/``).
    """
    dirs = [Path(p).expanduser() for p in os.environ.get("MOESPEC_CLUSTERS", "").split(os.pathsep) if p]
    dirs.append(Path.cwd() / "hpc" / "clusters")
    dirs.append(builtin_profiles_dir())
    unique: list[Path] = []
    for folder in dirs:
        if folder.resolve() not in [u.resolve() for u in unique]:
            unique.append(folder)
    return unique


def available_profiles() -> list[str]:
    """Names of every profile found in :func:`profile_dirs`."""
    names = {p.stem for folder in profile_dirs() if folder.is_dir() for p in folder.glob("*.yaml")}
    return sorted(names)


def find_profile(name_or_path: str, what: str = "infra.cluster") -> Path:
    """The YAML file of a profile given by name (``jean-zay``) or path (``hpc/clusters/x.yaml``).

    Raises
    ------
    ConfigError
        No such profile (``what`` says where the name came from); the message lists the folders
        searched and the profiles found.
    """
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if candidate.is_file():
            return candidate.resolve()
        raise ConfigError(f"{what}: no cluster profile file {name_or_path!r}")
    if _PROFILE_NAME.match(name_or_path):
        for folder in profile_dirs():
            path = folder / f"{name_or_path}.yaml"
            if path.is_file():
                return path.resolve()
    searched = ", ".join(str(d) for d in profile_dirs())
    known = ", ".join(available_profiles()) or "none"
    raise ConfigError(
        f"{what}: unknown cluster profile {name_or_path!r} (profiles: {known}; "
        f"searched {searched}; set $MOESPEC_CLUSTERS or give a path to a YAML file)"
    )


def load_profile(name_or_path: str, what: str = "infra.cluster") -> Cluster:
    """Find, read and validate a cluster profile; every problem is reported at once."""
    path = find_profile(name_or_path, what)
    raw = read_yaml(path)
    try:
        profile = ClusterProfile.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, raw, str(path), ClusterProfile)) from None
    return Cluster(path.stem, path, profile)


# --------------------------------------------------------------------------------------------------
# resources


def _overrides(resources: Resources | None) -> dict[str, Any]:
    """Only the keys a layer sets explicitly (so that a layer never resets another's values)."""
    if resources is None:
        return {}
    return {key: getattr(resources, key) for key in resources.model_fields_set}


def stage_resources(cluster: Cluster | None, experiment: Experiment, stage: str) -> Resources:
    """The resources of one stage's jobs: defaults < profile defaults < profile stage < experiment."""
    values: dict[str, Any] = {}
    if cluster is not None:
        profile = cluster.profile
        for key, value in (
            ("slurm_partition", profile.partition),
            ("slurm_account", profile.account),
            ("slurm_qos", profile.qos),
            ("slurm_constraint", profile.constraint),
            ("slurm_array_parallelism", profile.array_parallelism),
        ):
            if value is not None:
                values[key] = value
        values.update(_overrides(profile.defaults))
        values.update(_overrides(profile.stages.get(stage)))
    values.update(_overrides(experiment.infra.resources.get(stage)))
    return Resources(**values)


def limit_problems(cluster: Cluster, stage: str, resources: Resources) -> list[str]:
    """Every way a stage's resources exceed what the cluster's nodes offer (empty when they fit)."""
    profile = cluster.profile
    where = f"profile {cluster.name!r} ({cluster.path})"
    checks = [
        ("gpus_per_node", resources.gpus_per_node, profile.gpus_per_node, "gpus_per_node"),
        ("cpus_per_task", resources.cpus_per_task, profile.cpus_per_node, "cpus_per_node"),
        ("mem_gb", resources.mem_gb, profile.mem_gb_per_node, "mem_gb_per_node"),
        ("timeout_min", resources.timeout_min, profile.max_timeout_min, "max_timeout_min"),
    ]
    problems = []
    for key, asked, limit, limit_key in checks:
        if limit is not None and asked > limit:
            problems.append(
                f"infra.resources.{stage}.{key}: asks for {asked:g} but {where} allows at most {limit_key}: {limit:g}"
            )
    return problems + signal_problems(stage, resources)


def signal_problems(stage: str, resources: Resources) -> list[str]:
    """A time limit that leaves less than a minute of work before the checkpoint signal (empty when fine)."""
    delay = resources.slurm_signal_delay_s or DEFAULT_SIGNAL_DELAY_S
    limit_s = resources.timeout_min * 60
    if limit_s >= delay + MIN_WORK_BEFORE_SIGNAL_S:
        return []
    fixes = [f"timeout_min >= {math.ceil((delay + MIN_WORK_BEFORE_SIGNAL_S) / 60)}"]
    if limit_s - MIN_WORK_BEFORE_SIGNAL_S >= 1:
        fixes.append(f"slurm_signal_delay_s <= {limit_s - MIN_WORK_BEFORE_SIGNAL_S}")
    return [
        f"infra.resources.{stage}.timeout_min: {resources.timeout_min} min leaves {max(0, limit_s - delay)} s "
        f"of work before the checkpoint signal (sent slurm_signal_delay_s={delay} s before the limit; at least "
        f"{MIN_WORK_BEFORE_SIGNAL_S} s needed), so each attempt would be requeued before it gets anywhere; "
        f"set {' or '.join(fixes)}"
    ]


def check_resources(cluster: Cluster, experiment: Experiment, stages: list[str]) -> dict[str, Resources]:
    """Resolve every stage's resources and check them against the profile's limits, all at once.

    Also refused: a time limit at or below the checkpoint signal delay plus a minute of work.

    Raises
    ------
    ConfigError
        A stage asks for more than the cluster's nodes offer, or for a time limit that leaves no
        time to work before the checkpoint signal; one line per problem.
    """
    resolved = {stage: stage_resources(cluster, experiment, stage) for stage in stages}
    problems = [p for stage in stages for p in limit_problems(cluster, stage, resolved[stage])]
    if problems:
        raise ConfigError([f"{experiment.source}: {p}" for p in problems])
    return resolved


# --------------------------------------------------------------------------------------------------
# where things go


def expand_path(text: str, what: str) -> Path:
    """Expand ``~`` and ``$VARS``; an unset variable is an error, not a literal ``$SCRATCH`` folder."""
    expanded = os.path.expandvars(os.path.expanduser(text))
    unset = re.findall(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)", expanded)
    if unset:
        raise ConfigError(f"{what}: {text!r} uses ${unset[0]}, which is not set in this environment")
    return Path(expanded)


def apply_scratch_root(
    experiment: Experiment, cluster: Cluster | None, explicit_root: str | None, *, unset_ok: bool = False
) -> str:
    """Place a relative experiment root under the profile's ``scratch_root`` (in place).

    Nothing changes when ``--root`` was given, the file's ``root`` is absolute, or the profile
    has no ``scratch_root``. Jobs and ``moespec status`` then agree on where artifacts live.

    Returns
    -------
    str
        '' normally. With ``unset_ok`` (``moespec plan`` on a machine that is not the cluster),
        a scratch root using an unset variable is kept as written (``$SCRATCH/moespec/results``)
        and the returned note says so; the artifacts cannot be looked at from here.

    Raises
    ------
    ConfigError
        ``scratch_root`` uses an unset variable (and not ``unset_ok``).
    """
    if explicit_root or cluster is None or not cluster.profile.scratch_root:
        return ""
    if Path(experiment.base.root).expanduser().is_absolute():
        return ""
    what = f"{cluster.path}: scratch_root"
    try:
        scratch = expand_path(cluster.profile.scratch_root, what)
    except ConfigError as e:
        if not unset_ok:
            raise
        experiment.root = Path(cluster.profile.scratch_root) / experiment.base.root
        return f"{e.problems[0]}: artifacts are on the cluster, under {experiment.root}; their states are not checked"
    experiment.root = (scratch / experiment.base.root).resolve()
    return ""
