"""The inputs an experiment names, checked where it will run, before anything is computed.

``moespec validate`` (and ``moespec submit`` with the local executors) look at every text source
and model of every sweep point: local files exist, are readable, non-empty UTF-8 text with the named
fields (:meth:`moespec.data.sources.FilesSource.check`); hub datasets and models are in the offline
cache or on a hub that answers within a few seconds (:mod:`moespec.hub`); local model folders hold
a ``config.json``. Nothing is loaded or downloaded. Each distinct input is checked once.
"""

from __future__ import annotations

from typing import Iterator

from pydantic import BaseModel

from moespec.config import Experiment


def input_problems(experiment: Experiment) -> list[str]:
    """One line per problem, ``FILE: dotted.key: what is wrong and what to do``; empty when all is usable."""
    lines: list[str] = []
    checked: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for config in experiment.configs:
        for stage in config.stages():
            for key, section in _sections(config.stage_config(stage), stage):
                identity = (type(section).__qualname__, section.model_dump_json())
                if identity not in checked:
                    checked[identity] = _check(section)
                for subkey, message in checked[identity]:
                    line = f"{experiment.source}: {key}.{subkey}: {message}"
                    if line not in lines:
                        lines.append(line)
    return lines


def _sections(section: BaseModel, key: str) -> Iterator[tuple[str, BaseModel]]:
    """Every sub-config of ``section`` with its dotted key, ``section`` first."""
    yield key, section
    for name in type(section).model_fields:
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            yield from _sections(value, f"{key}.{name}")
        elif isinstance(value, (list, tuple)):
            for index, item in enumerate(value):
                if isinstance(item, BaseModel):
                    yield from _sections(item, f"{key}.{name}[{index}]")


def _check(section: BaseModel) -> list[tuple[str, str]]:
    """``(sub-key, problem)`` pairs of one sub-config that names an input."""
    from moespec.data.sources import FilesSource, HFSource
    from moespec.embedding.loading import model_problem

    if isinstance(section, (FilesSource, HFSource)):
        return section.check()
    # a model reference: the embed stage's `model`, the ablate stage's pretrained `model`
    if {"name", "revision", "trust_remote_code"} <= set(type(section).model_fields):
        problem = model_problem(section.name, section.revision)
        return [("name", problem)] if problem else []
    return []
