"""``sync/remotes.yaml``: the named remotes that ``moespec sync`` talks to.

The committed ``sync/remotes.example.yaml`` documents every key; the real ``sync/remotes.yaml`` is
git-ignored because it names the user's hosts and folders. Unknown keys, wrong types and bad values
are reported all at once, each naming the file and the dotted key
(``sync/remotes.yaml: remotes.hpc.root: required key is missing``).

The file is checked by the small schema below rather than by pydantic models, unlike the
experiment configs: ``moespec sync`` reads it on every run, and importing pydantic and building
the models cost about 0.1 s, a quarter of a whole no-change pull (``docs/sync.md``, "Start-up").
The rules are the same: unknown keys are errors (``extra="forbid"``), strings are not coerced,
and the objects are immutable.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from moespec.errors import ConfigError

#: Where ``moespec sync`` looks for its remotes, relative to the project folder.
DEFAULT_REMOTES_FILE = Path("sync") / "remotes.yaml"

#: What ``--to-hpc`` pushes when neither the command line nor remotes.yaml says otherwise: the
#: experiments, the cluster profiles and job scripts, and what ``pip install -e .`` needs on a
#: cluster without access to the repository (setup.cfg reads README.md).
DEFAULT_PUSH_PATHS = ("configs", "hpc", "jobs", "src", "setup.cfg", "pyproject.toml", "README.md", "Makefile")
DEFAULT_PUSH_EXCLUDE = ("__pycache__/", "*.pyc", "*.egg-info/")
TRANSPORTS = ("paramiko", "openssh")


def remote_path(value: str) -> str:
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


def host_alias(value: str) -> str:
    """An ssh host alias: not empty, no white space, not starting with ``-`` (ssh would read an option)."""
    if not value.strip() or any(c.isspace() for c in value) or value.startswith("-"):
        raise ValueError(f"'{value}' is not a host alias")
    return value


@dataclass(frozen=True)
class FilterSet:
    """Default filters of one direction, applied after those given on the command line.

    A file is selected when the first pattern it matches is an ``include``, or when it matches no
    pattern at all; ``include`` patterns are tried before ``exclude`` patterns.
    """

    include: list[str] = field(default_factory=list)
    exclude: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PushSettings(FilterSet):
    """What ``--to-hpc`` pushes: project paths (relative to the current folder) into ``root``."""

    root: str | None = None
    exclude: list[str] = field(default_factory=lambda: list(DEFAULT_PUSH_EXCLUDE))
    paths: list[str] = field(default_factory=lambda: list(DEFAULT_PUSH_PATHS))


@dataclass(frozen=True)
class Remote:
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
    root: str
    transfer_host: str | None = None
    transport: str = "paramiko"
    channels: int = 4
    ssh_config: str | None = None
    known_hosts: list[str] | None = None
    connect_timeout: float = 20.0
    stall_timeout: float = 120.0
    retries: int = 2
    max_delete: float = 0.5
    pull: FilterSet = field(default_factory=FilterSet)
    push: PushSettings = field(default_factory=PushSettings)

    @property
    def sync_host(self) -> str:
        """The host that transfers go through."""
        return self.transfer_host or self.host


@dataclass(frozen=True)
class RemotesFile:
    """The whole ``sync/remotes.yaml``."""

    remotes: dict[str, Remote]
    default: str | None = None

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


# --------------------------------------------------------------------------------------------------
# the schema: key -> check (raises ValueError with the reason); a key without default is required


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _optional(check: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return lambda value: None if value is None else check(value)


def _strings(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError(f"expected a list of strings, got {value!r}")
    return list(value)


def _patterns(value: Any) -> list[str]:
    from moespec.sync.filters import compile_pattern

    for pattern in _strings(value):
        compile_pattern(pattern)  # raises ValueError with the reason
    return list(value)


def _push_paths(value: Any) -> list[str]:
    from moespec.sync.paths import check_relpath

    paths = [path.rstrip("/") for path in _strings(value)]
    for path in paths:
        check_relpath(path)  # UnsafePath is a ValueError
    return paths


def _number(kind: type, low: float, high: float | None = None, low_inclusive: bool = True) -> Callable[[Any], Any]:
    """An int (``kind=int``) or a number in [low, high] (``(low, high]`` when not ``low_inclusive``)."""
    accepted = (int,) if kind is int else (int, float)

    def check(value: Any):
        if isinstance(value, bool) or not isinstance(value, accepted):
            raise ValueError(f"expected {'an integer' if kind is int else 'a number'}, got {value!r}")
        if value < low or (value == low and not low_inclusive):
            raise ValueError(f"must be {'>=' if low_inclusive else '>'} {low}, got {value}")
        if high is not None and value > high:
            raise ValueError(f"must be <= {high}, got {value}")
        return kind(value)

    return check


def _transport(value: Any) -> str:
    if value not in TRANSPORTS:
        raise ValueError(f"expected one of {', '.join(TRANSPORTS)}, got {value!r}")
    return value


@dataclass(frozen=True)
class _Section:
    """A nested mapping checked against its own schema and built into ``build``."""

    schema: dict
    build: type


_REQUIRED = object()  # the default of a key that must be given
_FILTERS = {"include": (_patterns, list), "exclude": (_patterns, list)}
_PUSH = {
    "root": (_optional(lambda v: remote_path(_string(v))), lambda: None),
    "include": (_patterns, list),
    "exclude": (_patterns, lambda: list(DEFAULT_PUSH_EXCLUDE)),
    "paths": (_push_paths, lambda: list(DEFAULT_PUSH_PATHS)),
}
_REMOTE = {
    "host": (lambda v: host_alias(_string(v)), _REQUIRED),
    "transfer_host": (_optional(lambda v: host_alias(_string(v))), lambda: None),
    "root": (lambda v: remote_path(_string(v)), _REQUIRED),
    "transport": (_transport, lambda: "paramiko"),
    "channels": (_number(int, 1, 32), lambda: 4),
    "ssh_config": (_optional(_string), lambda: None),
    "known_hosts": (_optional(_strings), lambda: None),
    "connect_timeout": (_number(float, 0, low_inclusive=False), lambda: 20.0),
    "stall_timeout": (_number(float, 0, low_inclusive=False), lambda: 120.0),
    "retries": (_number(int, 0, 20), lambda: 2),
    "max_delete": (_number(float, 0, 1), lambda: 0.5),
    "pull": (_Section(_FILTERS, FilterSet), FilterSet),
    "push": (_Section(_PUSH, PushSettings), PushSettings),
}


def _build(section: _Section, data: Any, loc: str, problems: list[str]) -> Any:
    """``section.build(**checked values)``, or None after adding one line per problem to ``problems``."""
    if not isinstance(data, dict):
        problems.append(f"{loc}: expected a mapping, got {data!r}")
        return None
    values, count = {}, len(problems)
    problems += [f"{loc}.{key}: unknown key" for key in data if key not in section.schema]
    for key, (check, default) in section.schema.items():
        if key not in data:
            if default is _REQUIRED:
                problems.append(f"{loc}.{key}: required key is missing")
            continue
        if isinstance(check, _Section):
            values[key] = _build(check, data[key], f"{loc}.{key}", problems)
            continue
        try:
            values[key] = check(data[key])
        except ValueError as e:
            problems.append(f"{loc}.{key}: {e}")
    return section.build(**values) if len(problems) == count else None


def check_remotes(data: Any) -> tuple[RemotesFile | None, list[str]]:
    """Check a parsed remotes file: (the remotes, []) or (None, one line per problem, dotted keys)."""
    if not isinstance(data, dict):
        return None, [f"expected a mapping with a `remotes:` key, got {type(data).__name__}"]
    problems = [f"{key}: unknown key" for key in data if key not in ("default", "remotes")]
    default, entries = data.get("default"), data.get("remotes")
    if default is not None and not isinstance(default, str):
        problems.append(f"default: expected a string, got {default!r}")
    if entries is None:
        problems.append("remotes: required key is missing")
    elif not isinstance(entries, dict) or not entries:
        problems.append(f"remotes: expected a mapping of at least one remote, got {entries!r}")
    else:
        if isinstance(default, str) and default not in entries:
            problems.append(f"default: '{default}' is not one of the remotes ({', '.join(map(str, entries))})")
        remote = _Section(_REMOTE, Remote)
        remotes = {str(name): _build(remote, entry, f"remotes.{name}", problems) for name, entry in entries.items()}
    return (None, problems) if problems else (RemotesFile(remotes, default), [])


def default_remote(host: str, root: str) -> Remote:
    """The remote of ``--host`` with ``--remote-root`` when there is no remotes file.

    Raises
    ------
    ValueError
        ``host`` is not an alias or ``root`` is not a remote folder.
    """
    return Remote(host=host_alias(host), root=remote_path(root))


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
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    remotes, problems = check_remotes(data)
    if problems:
        raise ConfigError([f"{path}: {problem}" for problem in problems])
    return remotes
