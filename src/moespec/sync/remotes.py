"""``sync/remotes.yaml``: the named remotes that ``moespec sync`` talks to.

The committed ``sync/remotes.example.yaml`` documents every key; the real ``sync/remotes.yaml`` is
git-ignored because it names the user's hosts and folders. Unknown keys, wrong types and bad values
are reported all at once, each naming the file and the dotted key
(``sync/remotes.yaml: remotes.hpc.root: required key is missing``).
"""

from __future__ import annotations

import posixpath
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moespec.errors import ConfigError

#: Where ``moespec sync`` looks for its remotes, relative to the project folder.
DEFAULT_REMOTES_FILE = Path("sync") / "remotes.yaml"

#: What ``--to-hpc`` pushes when neither the command line nor remotes.yaml says otherwise: the
#: experiments, the cluster profiles and job scripts, and what ``pip install -e .`` needs on a
#: cluster without access to the repository (setup.cfg reads README.md).
DEFAULT_PUSH_PATHS = ("configs", "hpc", "jobs", "src", "setup.cfg", "pyproject.toml", "README.md", "Makefile")
DEFAULT_PUSH_EXCLUDE = ("__pycache__/", "*.pyc", "*.egg-info/")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _remote_path(value: str) -> str:
    """A remote folder: absolute, or relative to the remote home (``~/x`` is read as ``x``)."""
    value = value.strip()
    if not value:
        raise ValueError("must not be empty")
    if value == "~":
        return "."
    if value.startswith("~/"):
        # SFTP does not expand ``~``; paths relative to the login folder mean the same thing
        value = value[2:]
    elif value.startswith("~"):
        raise ValueError(f"'{value}': ~user paths are not supported; give the absolute path")
    return posixpath.normpath(value)


class FilterSet(_Strict):
    """Default filters of one direction, applied after those given on the command line.

    A file is selected when the first pattern it matches is an ``include``, or when it matches no
    pattern at all; ``include`` patterns are tried before ``exclude`` patterns.
    """

    include: list[str] = Field(default_factory=list)
    exclude: list[str] = Field(default_factory=list)

    @field_validator("include", "exclude")
    @classmethod
    def _check_patterns(cls, patterns: list[str]) -> list[str]:
        from moespec.sync.filters import compile_pattern

        for pattern in patterns:
            compile_pattern(pattern)  # raises ValueError with the reason
        return patterns


class PushSettings(FilterSet):
    """What ``--to-hpc`` pushes: project paths (relative to the current folder) into ``root``."""

    root: str | None = None
    exclude: list[str] = Field(default_factory=lambda: list(DEFAULT_PUSH_EXCLUDE))
    paths: list[str] = Field(default_factory=lambda: list(DEFAULT_PUSH_PATHS))

    @field_validator("root")
    @classmethod
    def _check_root(cls, value: str | None) -> str | None:
        return None if value is None else _remote_path(value)

    @field_validator("paths")
    @classmethod
    def _check_paths(cls, paths: list[str]) -> list[str]:
        from moespec.sync.paths import check_relpath

        for path in paths:
            check_relpath(path.rstrip("/"))
        return [path.rstrip("/") for path in paths]


class Remote(_Strict):
    """One cluster: where its results live and how to reach it.

    Attributes
    ----------
    host : str
        Host alias (or name) resolved through the ssh config, usually the login node.
    transfer_host : str or None
        Host used for the transfers instead of ``host``, for sites that want bulk data on a
        data-transfer node.
    root : str
        Remote results root; experiment ``X`` lives in ``<root>/X/``.
    transport : {"paramiko", "openssh"}
        ``openssh`` runs the SFTP sessions over the system ``ssh`` (ControlMaster, Include, host
        certificates, every ssh_config option); ``paramiko`` speaks SSH in-process.
    max_delete : float
        ``--delete`` refuses (without ``--force``) to remove more than this share of an
        experiment's files, and never empties an experiment that the source has nothing of.
    """

    host: str
    transfer_host: str | None = None
    root: str
    transport: Literal["paramiko", "openssh"] = "paramiko"
    channels: int = Field(4, ge=1, le=32)
    ssh_config: str | None = None
    known_hosts: list[str] | None = None
    connect_timeout: float = Field(20.0, gt=0)
    stall_timeout: float = Field(120.0, gt=0)
    retries: int = Field(2, ge=0, le=20)
    max_delete: float = Field(0.5, ge=0, le=1)
    pull: FilterSet = Field(default_factory=FilterSet)
    push: PushSettings = Field(default_factory=PushSettings)

    @field_validator("root")
    @classmethod
    def _check_root(cls, value: str) -> str:
        return _remote_path(value)

    @field_validator("host", "transfer_host")
    @classmethod
    def _check_host(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or any(c.isspace() for c in value) or value.startswith("-")):
            raise ValueError(f"'{value}' is not a host alias")
        return value

    @property
    def sync_host(self) -> str:
        """The host that transfers go through."""
        return self.transfer_host or self.host


class RemotesFile(_Strict):
    """The whole ``sync/remotes.yaml``."""

    default: str | None = None
    remotes: dict[str, Remote] = Field(min_length=1)

    @model_validator(mode="after")
    def _check_default(self) -> "RemotesFile":
        if self.default is not None and self.default not in self.remotes:
            raise ValueError(f"default: '{self.default}' is not one of the remotes ({', '.join(self.remotes)})")
        return self

    def get(self, name: str | None, source: str = str(DEFAULT_REMOTES_FILE)) -> Remote:
        """The remote called ``name``, or the default one (or the only one)."""
        if name is None:
            if self.default is not None:
                return self.remotes[self.default]
            if len(self.remotes) == 1:
                return next(iter(self.remotes.values()))
            raise ConfigError(
                f"{source}: default: several remotes ({', '.join(self.remotes)}) and no default; "
                "set `default:` or pass --remote NAME"
            )
        if name not in self.remotes:
            raise ConfigError(f"{source}: remotes.{name}: no such remote (known: {', '.join(self.remotes)})")
        return self.remotes[name]


def _describe(error: dict) -> str:
    loc = ".".join(str(part) for part in error["loc"])
    kind, msg = error["type"], error["msg"]
    if kind == "missing":
        text = "required key is missing"
    elif kind == "extra_forbidden":
        text = "unknown key"
    elif kind == "value_error":
        text = msg.removeprefix("Value error, ")
    else:
        text = f"{msg}, got {error.get('input')!r}"
    return f"{loc}: {text}" if loc else text


def load_remotes(path: Path | str = DEFAULT_REMOTES_FILE) -> RemotesFile:
    """Read and validate a remotes file.

    Raises
    ------
    ConfigError
        The file is missing, is not YAML, or has invalid entries; one line per problem, each
        naming the file and the dotted key.
    """
    path = Path(path)
    if not path.exists():
        example = path.with_name("remotes.example.yaml")
        hint = f"; copy {example} to {path} and edit it" if example.exists() else ""
        raise ConfigError(f"{path}: not found{hint} (or pass --host and --remote-root)")
    import yaml  # here: `--host` with `--remote-root` reads no file and need not pay for the import

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with a `remotes:` key, got {type(data).__name__}")
    try:
        return RemotesFile.model_validate(data)
    except ValidationError as e:
        raise ConfigError([f"{path}: {_describe(err)}" for err in e.errors()]) from e
