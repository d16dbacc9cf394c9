"""What every stage shares: the stage contract (:class:`Stage`), the config base class, the registry.

A stage is a module (or package) in ``moespec.stages`` that satisfies :class:`Stage`: ``NAME``,
``SCHEMA_VERSION``, ``Config`` (a :class:`StageConfig`), ``inputs(cfg)``, ``schema(cfg)`` and
``run(cfg, inputs, out)``, where ``inputs`` maps each declared input name to an
:class:`~moespec.artifacts.ArtifactReader` and ``out`` is the task's
:class:`~moespec.artifacts.ArtifactWriter`. A stage reads only what it declares and writes only
through ``out``. The registry imports stage modules lazily so that loading a config never imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Mapping, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:  # annotations only: importing h5py here would slow every command's start-up
    from moespec.artifacts import ArtifactReader, ArtifactWriter, Schema

#: Stage names in pipeline order. A stage's upstream stages always come earlier in this list.
STAGE_ORDER: tuple[str, ...] = ("embed", "reduce", "fiber", "train", "lm", "lora", "route", "ablate")


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors and configs are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    def num_shards(self) -> int:
        """Tasks this stage's work is split into, each writing one shard file (1: not sharded)."""
        return 1


@runtime_checkable
class Stage(Protocol):
    """The contract of a stage module (checked by the registry and by ``tests/stages``)."""

    NAME: str
    SCHEMA_VERSION: int
    Config: type[StageConfig]

    def inputs(self, cfg: StageConfig) -> dict[str, str]:
        """Input name -> the upstream stage whose artifact it is (fixed per config)."""

    def schema(self, cfg: StageConfig) -> Schema:
        """The datasets the artifact must hold, with their shapes and dtype kinds."""

    def run(self, cfg: StageConfig, inputs: Mapping[str, ArtifactReader], out: ArtifactWriter) -> None:
        """Compute the artifact of one task from its inputs."""


def check_stage_names(value: dict) -> dict:
    """Validator body for a mapping keyed by stage name: unknown names are an error listing the stages."""
    unknown = sorted(set(value) - set(STAGE_ORDER))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGE_ORDER)}")
    return value


def available_stages() -> list[str]:
    """Stage names whose module exists in this installation, in pipeline order."""
    return [name for name in STAGE_ORDER if importlib.util.find_spec(f"moespec.stages.{name}")]


def stage_module(name: str) -> Stage:
    """Import and return the module of stage ``name`` (a :class:`Stage`)."""
    if name not in STAGE_ORDER:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_ORDER)}")
    module = importlib.import_module(f"moespec.stages.{name}")
    if not isinstance(module, Stage):
        missing = [
            attr
            for attr in ("NAME", "SCHEMA_VERSION", "Config", "inputs", "schema", "run")
            if not hasattr(module, attr)
        ]
        raise TypeError(f"moespec.stages.{name} is not a stage: it lacks {', '.join(missing)}")
    return module


def num_shards(name: str, cfg: StageConfig) -> int:
    """Number of shard tasks of a stage's task (``cfg.num_shards()``)."""
    return cfg.num_shards()
