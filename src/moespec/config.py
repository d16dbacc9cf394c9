"""Experiment YAML -> typed, validated config; sweep expansion; content-addressed uids.

An experiment file has the keys ``experiment``, ``root``, one section per stage it runs
(``embed``, ``reduce``, ``fiber``, ...), ``sweep`` and ``infra``. Every problem in a file is
reported at once, each line naming the file and the dotted key, what was expected and what was
found (torchtune's ``ConfigError``, OLMo-core's key paths).
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from moespec.errors import ConfigError
from moespec.stages.base import STAGE_ORDER, StageConfig, available_stages, check_stage_names, stage_module

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class Resources(BaseModel):
    """Resources of one stage's jobs, in submitit's own parameter names.

    The generic names apply to every executor; the ``slurm_*`` extras only on Slurm. On a
    cluster a stage gets the profile's ``defaults``, then the profile's ``stages.<stage>``, then
    ``infra.resources.<stage>`` of the experiment: each layer overrides only the keys it sets
    (see ``moespec.launch.profiles``).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_min: int = Field(60, ge=1)
    cpus_per_task: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    mem_gb: float = Field(4.0, gt=0)
    slurm_partition: Optional[str] = None
    slurm_account: Optional[str] = None
    slurm_qos: Optional[str] = None
    slurm_constraint: Optional[str] = None
    #: Array tasks of one stage running at once (``--array=...%N``; submitit's default is 256).
    slurm_array_parallelism: Optional[int] = Field(None, ge=1)
    #: Seconds before the time limit when the checkpoint signal (USR2) is sent (submitit: 90).
    slurm_signal_delay_s: Optional[int] = Field(None, ge=1)
    #: How many times a job that hit its time limit is requeued (submitit: 3; preemptions: always).
    slurm_max_num_timeout: Optional[int] = Field(None, ge=0)
    #: Any other sbatch option, e.g. ``{"mail-type": "FAIL"}``.
    slurm_additional_parameters: dict[str, Union[str, int, float, bool]] = Field(default_factory=dict)


class LocalInfra(BaseModel):
    """Settings of the local executor (real subprocesses on this machine)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Tasks of one stage run at once; each process gets cpu_count // max_parallel threads.
    max_parallel: int = Field(1, ge=1)


class InfraConfig(BaseModel):
    """Where and how to run: kept apart from the science, and not part of any uid."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    executor: Literal["local", "slurm"] = "local"
    #: Cluster profile: a name in ``hpc/clusters/`` (or ``$MOESPEC_CLUSTERS``) or a path to a profile YAML.
    cluster: Optional[str] = None
    mode: Literal["cached", "force", "read-only"] = "cached"
    local: LocalInfra = LocalInfra()
    resources: dict[str, Resources] = Field(default_factory=dict)

    @field_validator("resources")
    @classmethod
    def _known_stages(cls, value: dict[str, Resources]) -> dict[str, Resources]:
        return check_stage_names(value)

    def resources_for(self, stage: str) -> Resources:
        return self.resources.get(stage, Resources())


class SweepConfig(BaseModel):
    """Sweep axes: ``grid`` is a cartesian product, ``zip`` pairs lists of equal length."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    grid: dict[str, list[Any]] = Field(default_factory=dict)
    zip: dict[str, list[Any]] = Field(default_factory=dict)


class ExperimentBase(BaseModel):
    """The fields every experiment has; stage sections are added by :func:`experiment_model`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    experiment: str
    root: str = "results"
    sweep: SweepConfig = SweepConfig()
    infra: InfraConfig = InfraConfig()

    @field_validator("experiment")
    @classmethod
    def _slug(cls, value: str) -> str:
        if not _NAME_RE.match(value):
            raise ValueError("must be a name of letters, digits, '.', '_' or '-' (it becomes a folder name)")
        return value

    def stages(self) -> list[str]:
        """The stages this experiment runs, in pipeline order."""
        return [name for name in STAGE_ORDER if getattr(self, name, None) is not None]

    def stage_config(self, name: str) -> StageConfig:
        return getattr(self, name)


_MODEL_CACHE: dict[tuple[str, ...], type[ExperimentBase]] = {}


def experiment_model() -> type[ExperimentBase]:
    """The pydantic model of an experiment file, with one optional section per installed stage."""
    names = tuple(available_stages())
    if names not in _MODEL_CACHE:
        sections = {name: (Optional[stage_module(name).Config], None) for name in names}
        _MODEL_CACHE[names] = create_model("ExperimentConfig", __base__=ExperimentBase, **sections)
    return _MODEL_CACHE[names]


# --------------------------------------------------------------------------------------------------
# loading


def read_yaml(path: Path) -> dict[str, Any]:
    """Parse a YAML mapping, with syntax errors reported by file, line and column."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: cannot read file: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: {where}invalid YAML: {getattr(e, 'problem', None) or e}") from e
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping with at least 'experiment'")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _short(value: Any) -> str:
    """A value as YAML spells it (``true``, ``null``, ``'16'``), cut to 80 characters."""
    text = {True: "true", False: "false"}.get(value, repr(value)) if isinstance(value, bool) else repr(value)
    text = "null" if value is None else text
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(loc: tuple, raw: Any, missing: bool) -> str:
    """Turn a pydantic error location into the user's dotted key.

    pydantic puts union member tags (``'hf'``, ``'int'``) into locations; they are not keys of the
    user's YAML, so we keep only the parts that exist in the raw input (plus a missing last key).
    """
    parts: list[str] = []
    node = raw
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(node, dict) and part in node:
            parts.append(str(part))
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            parts.append(f"[{part}]")
            node = node[part]
        elif last and missing and isinstance(part, str):
            parts.append(part)
    return ".".join(parts).replace(".[", "[") or "(top level)"


def _allowed_keys(model: type[BaseModel], loc: tuple, raw: Any) -> list[str]:
    """Field names allowed where an unknown key was found (best effort, for the error message)."""
    annotation, node = _annotation_at(model, loc[:-1], raw)
    return sorted(getattr(_pick_model(annotation, node), "model_fields", {}) or [])


def _annotation_at(model: type[BaseModel], loc: tuple, raw: Any) -> tuple[Any, Any]:
    """The annotation and the user's data at ``loc`` (best effort: ``(None, None)`` when lost).

    Walks the annotations along the user's data, so that in a tagged union the member named by
    the raw ``kind`` is followed, and through ``dict[str, Model]`` values (``infra.resources.embed``).
    """
    annotation: Any = model
    node = raw
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            current = _pick_model(annotation, node)
            if current is not None:
                field = current.model_fields.get(part)
                annotation = field.annotation if field is not None else None
            else:
                annotation = _mapping_value_type(annotation)
            if annotation is None:
                return None, None
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            annotation, node = _element_type(annotation), node[part]
    return annotation, node


def _mapping_value_type(annotation: Any) -> Any:
    """The value type of ``dict[K, V]`` (through Optional/Annotated), else None."""
    import typing

    if typing.get_origin(annotation) is dict:
        return typing.get_args(annotation)[1]
    for arg in typing.get_args(annotation):
        found = _mapping_value_type(arg)
        if found is not None:
            return found
    return None


def _union_kinds(model: type[BaseModel], loc: tuple, raw: Any) -> list[str]:
    """The ``kind`` values of the tagged union at ``loc`` (for "kind is missing" messages)."""
    annotation, _ = _annotation_at(model, loc, raw)
    kinds = []
    for member in _models_in(annotation):
        field = member.model_fields.get("kind")
        if field is not None and isinstance(field.default, str):
            kinds.append(field.default)
    return kinds


def _element_type(annotation: Any) -> Any:
    """The item type of ``list[X]`` (through Optional/Annotated), else None."""
    import typing

    if typing.get_origin(annotation) in (list, tuple):
        return (typing.get_args(annotation) or (None,))[0]
    for arg in typing.get_args(annotation):
        found = _element_type(arg)
        if found is not None:
            return found
    return None


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """Every model class in a (possibly Optional / Annotated / Union) annotation, not inside containers."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (list, tuple, dict):
        return []
    return [m for arg in typing.get_args(annotation) for m in _models_in(arg)]


def _pick_model(annotation: Any, raw: Any) -> type[BaseModel] | None:
    models = _models_in(annotation)
    if len(models) <= 1:
        return models[0] if models else None
    kind = raw.get("kind") if isinstance(raw, dict) else None
    for candidate in models:
        field = candidate.model_fields.get("kind")
        if field is not None and kind in (field.default, *getattr(field.annotation, "__args__", ())):
            return candidate
    return None


def format_validation_error(
    error: ValidationError, raw: dict[str, Any], source: str, model: type[BaseModel]
) -> list[str]:
    """One line per problem: ``FILE: dotted.key: what is wrong, got VALUE``; duplicates merged.

    A check of a whole section that finds several problems raises one ``ValueError`` whose lines
    read ``key: problem``; each becomes its own line under ``section.key``.
    """
    merged: dict[str, list[str]] = {}
    for item in error.errors():
        loc = tuple(item["loc"])
        key = _dotted(loc, raw, missing=item["type"] == "missing")
        for subkey, message in _messages(item, loc, raw, model):
            full = f"{key}.{subkey}" if subkey and key != "(top level)" else (subkey or key)
            merged.setdefault(full, [])
            if message not in merged[full]:
                merged[full].append(message)
    return [f"{source}: {key}: {' | '.join(messages)}" for key, messages in merged.items()]


_SUBKEY_RE = re.compile(r"^([A-Za-z_][A-Za-z0-9_.\[\]]*): (.+)$")


def _messages(item: dict[str, Any], loc: tuple, raw: Any, model: type[BaseModel]) -> list[tuple[str, str]]:
    """``(sub-key, message)`` pairs of one pydantic error (the sub-key is "" for the error's own key)."""
    kind = item["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc, raw)
        return [("", "unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else ""))]
    if kind == "missing":
        return [("", "required key is missing")]
    if kind == "union_tag_not_found":
        kinds = _union_kinds(model, loc, raw)
        choices = f" (one of {', '.join(kinds)})" if kinds else ""
        return [("", f"'kind' is missing: set {_dotted(loc, raw, False)}.kind{choices} to say which it is")]
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        allowed = sorted(getattr(_pick_model(_annotation_at(model, loc, raw)[0], None), "model_fields", {}) or [])
        keys = f" (keys: {', '.join(allowed)})" if allowed else ""
        return [("", f"must be a mapping of settings{keys}, got {_short(item.get('input'))}")]
    message = item["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
    lines = [line for line in message.splitlines() if line.strip()]
    if len(lines) > 1 and all(_SUBKEY_RE.match(line) for line in lines):
        return [_SUBKEY_RE.match(line).groups() for line in lines]
    if not isinstance(item.get("input"), dict) and "got " not in message:
        message += f", got {_short(item.get('input'))}"  # the value, unless the message already names it
    if kind in ("int_type", "float_type", "int_parsing", "float_parsing") and isinstance(item.get("input"), str):
        message += " (a quoted string; write the number without quotes)"
    return [("", message)]


# --------------------------------------------------------------------------------------------------
# sweeps


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise KeyError(part)
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def sweep_points(sweep: SweepConfig) -> list[dict[str, Any]]:
    """Every sweep point as ``{dotted key: value}``: the grid's product, each combined with each zip row."""
    grid_keys = list(sweep.grid)
    grid = [dict(zip(grid_keys, values)) for values in itertools.product(*(sweep.grid[k] for k in grid_keys))]
    zip_keys = list(sweep.zip)
    n_zip = len(next(iter(sweep.zip.values()))) if zip_keys else 1
    zipped = [{k: sweep.zip[k][i] for k in zip_keys} for i in range(n_zip)]
    return [{**g, **z} for g in grid for z in zipped]


def _sweep_problems(sweep: SweepConfig, source: str, raw: dict[str, Any]) -> list[str]:
    problems: list[str] = []
    for section, axes in (("grid", sweep.grid), ("zip", sweep.zip)):
        for key, values in axes.items():
            head = key.split(".")[0]
            if head in ("sweep", "infra", "experiment", "root") or head not in STAGE_ORDER:
                problems.append(
                    f"{source}: sweep.{section}.{key}: a sweep key must start with a stage "
                    f"section ({', '.join(STAGE_ORDER)}), got {head!r}"
                )
            elif not isinstance(raw.get(head), dict):
                # Setting the key would add a stage the file does not run.
                problems.append(
                    f"{source}: sweep.{section}.{key}: the experiment has no {head} section; "
                    f"add '{head}:' to the file to run that stage, or remove this sweep key"
                )
            if not values:
                problems.append(f"{source}: sweep.{section}.{key}: must list at least one value, got []")
    both = sorted(set(sweep.grid) & set(sweep.zip))
    for key in both:
        problems.append(f"{source}: sweep: {key!r} is in both grid and zip")
    lengths = {key: len(values) for key, values in sweep.zip.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={n}" for k, n in lengths.items())
        problems.append(f"{source}: sweep.zip: lists must have equal lengths, got {detail}")
    return problems


def format_point_value(value: Any) -> str:
    """A sweep value as the user would write it in YAML (``{kind: topk, target: label}``, not a Python dict)."""
    if isinstance(value, (dict, list)):
        return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**6).strip()
    return str(value)


# --------------------------------------------------------------------------------------------------
# the experiment


class Experiment:
    """A validated experiment: its base config and one fully validated config per sweep point.

    Attributes
    ----------
    source : str
        The file it came from (or ``"<dict>"``).
    base : ExperimentBase
        The config without sweep overrides.
    points : list of dict
        The overrides of each sweep point (``[{}]`` without a sweep).
    configs : list of ExperimentBase
        The validated config of each sweep point.
    root : Path
        Absolute results root.
    """

    def __init__(
        self, source: str, base: ExperimentBase, points: list[dict[str, Any]], configs: list[ExperimentBase], root: Path
    ):
        self.source = source
        self.base = base
        self.points = points
        self.configs = configs
        self.root = root

    @property
    def name(self) -> str:
        return self.base.experiment

    @property
    def infra(self) -> InfraConfig:
        return self.base.infra


def load_experiment(source: Path | str | dict[str, Any], *, root: Path | str | None = None) -> Experiment:
    """Load, validate and expand an experiment; every problem is raised at once as a ConfigError.

    Parameters
    ----------
    source : path or dict
        The YAML file, or its content as a dict.
    root : path, optional
        Overrides the file's ``root``. A relative root is taken relative to the current directory
        at load time and made absolute, so that jobs never depend on their working directory.
        Relative paths inside stage sections (``files`` sources, local model folders) are taken
        relative to the folder of the YAML file (the current directory for a dict).
    """
    if isinstance(source, dict):
        raw, name, config_dir = copy.deepcopy(source), "<dict>", Path.cwd()
    else:
        raw, name, config_dir = read_yaml(Path(source)), str(source), Path(source).absolute().parent
    model = experiment_model()
    problems: list[str] = []
    unknown_stages = [k for k in raw if k in STAGE_ORDER and k not in model.model_fields]
    for key in unknown_stages:
        problems.append(f"{name}: {key}: the {key} stage is not available in this version of moespec")
        raw.pop(key)
    base: ExperimentBase | None = None
    try:
        base = validate_data(model, raw, config_dir)
    except ValidationError as e:
        problems += format_validation_error(e, raw, name, model)
    sweep = base.sweep if base is not None else _sweep_or_none(raw)
    sweep_problems = _sweep_problems(sweep, name, raw) if sweep is not None else []
    if base is not None:
        problems += _dependency_problems(base, name)
    problems += sweep_problems
    configs: list[ExperimentBase] = []
    points = sweep_points(sweep) if sweep is not None and not sweep_problems else [{}]
    if sweep is not None and not sweep_problems and points != [{}]:
        configs, point_problems = _validate_points(raw, points, name, model, config_dir, set(problems))
        problems += point_problems
    if problems or base is None:
        raise ConfigError(problems)
    resolved_root = Path(root if root is not None else base.root).expanduser().resolve()
    return Experiment(name, base, points, configs or [base], resolved_root)


def validate_data(model: type[ExperimentBase], data: dict[str, Any], config_dir: Path) -> ExperimentBase:
    """Validate an experiment's data as pydantic's strict mode reads JSON.

    YAML gives JSON's types, and strict mode refuses the coercions that hide a mistake (``true``
    for an integer, ``"16"`` for a number) while keeping those JSON needs (a list for a tuple, an
    integer for a float). Relative paths are first made absolute against ``config_dir``.
    """
    text = json.dumps(resolve_relative_paths(data, config_dir), default=str)
    return model.model_validate_json(text, strict=True)


def resolve_relative_paths(data: Any, config_dir: Path) -> Any:
    """A copy of an experiment's data with its relative paths taken from ``config_dir`` (the file's folder).

    The paths of a ``files`` source, and a ``name`` written ``./x`` or ``../x`` (a local model or
    dataset folder; hub names never start with a dot), wherever they are: in stage sections and in
    sweep values. Paths starting with ``~`` or ``$`` are left for the machine that reads the files.
    A job's working directory differs between the laptop that validates and the node that runs,
    the file's folder does not; and a copy of the file elsewhere (``--emit-sbatch``) keeps its meaning.
    """
    if isinstance(data, list):
        return [resolve_relative_paths(item, config_dir) for item in data]
    if not isinstance(data, dict):
        return data
    resolved = {key: resolve_relative_paths(value, config_dir) for key, value in data.items()}
    if data.get("kind") == "files" and isinstance(data.get("paths"), (str, list)):
        paths = resolved["paths"]
        resolved["paths"] = (
            [_absolute(p, config_dir) for p in paths] if isinstance(paths, list) else _absolute(paths, config_dir)
        )
    if isinstance(data.get("name"), str) and data["name"].startswith(("./", "../")):
        resolved["name"] = _absolute(data["name"], config_dir)
    return resolved


def _absolute(path: Any, config_dir: Path) -> Any:
    if not isinstance(path, str) or path.startswith(("~", "$")) or Path(path).is_absolute():
        return path
    return str(Path(os.path.normpath(Path(config_dir) / path)))


def _sweep_or_none(raw: dict[str, Any]) -> SweepConfig | None:
    """The sweep section on its own, when the rest of the file is invalid (its problems are reported already)."""
    try:
        return SweepConfig.model_validate_json(json.dumps(raw.get("sweep") or {}, default=str), strict=True)
    except ValidationError:
        return None


def _validate_points(
    raw: dict[str, Any],
    points: list[dict[str, Any]],
    name: str,
    model: type[ExperimentBase],
    config_dir: Path,
    known: set[str],
) -> tuple[list[ExperimentBase], list[str]]:
    """Each sweep point's config, and the problems only some points have (``known`` ones are not repeated)."""
    configs: list[ExperimentBase] = []
    failures: dict[str, list[int]] = {}
    for index, point in enumerate(points):
        data = {k: v for k, v in copy.deepcopy(raw).items() if k != "sweep"}
        try:
            for key, value in point.items():
                _set_dotted(data, key, value)
            config = validate_data(model, data, config_dir)
            configs.append(config)
            for problem in _dependency_problems(config, name):
                failures.setdefault(problem, []).append(index)
        except KeyError as e:
            failures.setdefault(f"{name}: sweep key {key!r}: {e.args[0]!r} is not a section", []).append(index)
        except ValidationError as e:
            for problem in format_validation_error(e, data, name, model):
                failures.setdefault(problem, []).append(index)
    lines = []
    for problem, indices in failures.items():
        if problem in known:
            continue
        shown = ", ".join(map(str, indices[:8])) + (", ..." if len(indices) > 8 else "")
        example = ", ".join(f"{k}={format_point_value(v)}" for k, v in points[indices[0]].items())
        lines.append(f"{problem} (sweep point{'s' if len(indices) > 1 else ''} {shown}; e.g. {example})")
    return configs, lines


def _dependency_problems(config: ExperimentBase, name: str) -> list[str]:
    present = set(config.stages())
    if not present:
        return [f"{name}: the experiment has no stage section; add at least one of {', '.join(STAGE_ORDER)}"]
    problems = []
    for stage in config.stages():
        module = stage_module(stage)
        for input_name, upstream in module.inputs(config.stage_config(stage)).items():
            if upstream not in present:
                problems.append(
                    f"{name}: {stage}: reads the {upstream} stage ({input_name}) but the "
                    f"experiment has no {upstream} section"
                )
        if not problems and hasattr(module, "experiment_problems"):  # checks across sections (route vs lora)
            problems += [f"{name}: {problem}" for problem in module.experiment_problems(config)]
    return problems


# --------------------------------------------------------------------------------------------------
# uids


def config_dict(cfg: BaseModel) -> dict[str, Any]:
    """A stage config as plain JSON-able data (every default resolved)."""
    return cfg.model_dump(mode="json")


def config_yaml(cfg: BaseModel) -> str:
    return yaml.safe_dump(config_dict(cfg), sort_keys=True)


def compute_uid(stage: str, cfg: BaseModel, input_uids: dict[str, str], schema_version: int) -> str:
    """Short content hash of a stage task: its resolved config, its inputs' uids, its schema version.

    Two sweep points with the same upstream configuration get the same upstream uid, so they
    share its artifact; infra (resources, executor) is not hashed, so moving a run between
    machines does not invalidate its results.
    """
    payload = json.dumps(
        {
            "stage": stage,
            "schema_version": schema_version,
            "config": config_dict(cfg),
            "inputs": dict(sorted(input_uids.items())),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]
