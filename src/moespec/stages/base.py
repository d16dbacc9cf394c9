"""What every stage shares: the config base class and the registry of stage modules.

A stage is a module in ``moespec.stages`` exposing ``NAME``, ``SCHEMA_VERSION``, ``Config``,
``inputs(cfg)``, ``schema(cfg)``, optionally ``num_shards(cfg)``, and ``run(cfg, inputs, out)``.
The registry imports stage modules lazily so that loading a config never imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from pydantic import BaseModel, ConfigDict

#: Stage names in pipeline order. A stage's upstream stages always come earlier in this list.
STAGE_ORDER: tuple[str, ...] = ("embed", "reduce", "fiber", "train", "lm", "ablate")


class StageConfig(BaseModel):
    """Base of every stage config: unknown keys are errors and configs are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def check_stage_names(value: dict) -> dict:
    """Validator body for a mapping keyed by stage name: unknown names are an error listing the stages."""
    unknown = sorted(set(value) - set(STAGE_ORDER))
    if unknown:
        raise ValueError(f"unknown stage(s) {', '.join(unknown)}; stages are {', '.join(STAGE_ORDER)}")
    return value


def available_stages() -> list[str]:
    """Stage names whose module exists in this installation, in pipeline order."""
    return [name for name in STAGE_ORDER if importlib.util.find_spec(f"moespec.stages.{name}")]


def stage_module(name: str) -> ModuleType:
    """Import and return the module of stage ``name``."""
    if name not in STAGE_ORDER:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_ORDER)}")
    return importlib.import_module(f"moespec.stages.{name}")


def num_shards(name: str, cfg: StageConfig) -> int:
    """Number of shard tasks of a stage (1 unless the module says otherwise)."""
    module = stage_module(name)
    return int(module.num_shards(cfg)) if hasattr(module, "num_shards") else 1
