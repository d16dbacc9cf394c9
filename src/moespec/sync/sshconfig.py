"""Resolve a host alias through an OpenSSH client config, the way ``ssh`` would (mostly).

paramiko parses ``ssh_config`` (``Host``, ``Match``, tokens, "first value wins") but ignores
``Include`` (paramiko#1609) and only stores ``ProxyJump`` (it never acts on it). This module
inlines ``Include`` files before handing the text to ``paramiko.SSHConfig`` and turns the result
into a ``HostSpec`` that the paramiko transport connects with; ProxyJump hops are resolved here
and followed in ``transport_paramiko``. What paramiko cannot do at all (ControlMaster, host
certificates, ``Match exec`` without ``invoke``) is what ``transport: openssh`` is for.
"""

from __future__ import annotations

import getpass
import glob
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from moespec.errors import SyncError

DEFAULT_CONFIG = Path("~/.ssh/config")
DEFAULT_USER_KNOWN_HOSTS = ("~/.ssh/known_hosts", "~/.ssh/known_hosts2")
DEFAULT_GLOBAL_KNOWN_HOSTS = ("/etc/ssh/ssh_known_hosts", "/etc/ssh/ssh_known_hosts2")
DEFAULT_IDENTITIES = ("~/.ssh/id_ed25519", "~/.ssh/id_ecdsa", "~/.ssh/id_rsa")
#: OpenSSH refuses deeper Include nesting (READCONF_MAX_DEPTH).
_MAX_INCLUDE_DEPTH = 16
_KEYWORD = re.compile(r"\s*(\w+)(?:\s*=\s*|\s+)(.*)$")


@dataclass(frozen=True)
class Hop:
    """One ProxyJump hop: ``[user@]host[:port]`` or ``ssh://[user@]host[:port]``."""

    host: str
    user: str | None = None
    port: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Hop":
        text = text.strip().removeprefix("ssh://")
        user, _, hostport = text.rpartition("@")
        port = None
        if hostport.startswith("["):  # [v6-address]:port
            host, _, rest = hostport[1:].partition("]")
            port_text = rest.removeprefix(":")
        else:
            host, _, port_text = hostport.partition(":")
        if port_text:
            if not port_text.isdigit():
                raise SyncError(f"ProxyJump hop '{text}': port '{port_text}' is not a number")
            port = int(port_text)
        if not host:
            raise SyncError(f"ProxyJump hop '{text}' names no host")
        return cls(host, user or None, port)


@dataclass(frozen=True)
class HostSpec:
    """Everything needed to open one SSH connection, resolved from the config.

    Attributes
    ----------
    alias : str
        The name the user gave (a ``Host`` alias or a host name).
    proxy_jump : tuple of Hop
        Hops to go through, first hop first (empty: connect directly).
    known_hosts_files : tuple of str
        UserKnownHostsFile then GlobalKnownHostsFile entries, expanded.
    """

    alias: str
    hostname: str
    port: int = 22
    user: str = ""
    identity_files: tuple[str, ...] = ()
    identities_only: bool = False
    use_agent: bool = True
    proxy_jump: tuple[Hop, ...] = ()
    proxy_command: str | None = None
    known_hosts_files: tuple[str, ...] = ()
    host_key_alias: str | None = None
    connect_timeout: float | None = None
    server_alive_interval: int = 0
    batch_mode: bool = False
    host_key_algorithms: str | None = None

    @property
    def known_hosts_name(self) -> str:
        """The name OpenSSH looks up in known_hosts: HostKeyAlias, else host or ``[host]:port``."""
        if self.host_key_alias:
            return self.host_key_alias
        return self.hostname if self.port == 22 else f"[{self.hostname}]:{self.port}"

    def describe(self) -> str:
        via = f" via {','.join(h.host for h in self.proxy_jump)}" if self.proxy_jump else ""
        return f"{self.user}@{self.hostname}:{self.port}{via}"


# --------------------------------------------------------------------------------------------------
# Include


def expand_includes(path: Path, _depth: int = 0) -> str:
    """The text of an ssh_config with every ``Include`` replaced by the files it names.

    Relative Include paths are taken from ``~/.ssh`` as OpenSSH does for user configs. After an
    included text, the enclosing ``Host``/``Match`` line is repeated so that the lines after the
    Include stay in the enclosing block (paramiko has no notion of nested files).
    """
    if _depth > _MAX_INCLUDE_DEPTH:
        raise SyncError(f"{path}: Include nested more than {_MAX_INCLUDE_DEPTH} deep")
    out: list[str] = []
    header = None
    for raw in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        match = _KEYWORD.match(raw)
        keyword = match.group(1).lower() if match and not raw.lstrip().startswith("#") else ""
        if keyword in ("host", "match"):
            header = raw.strip()
        if keyword != "include":
            out.append(raw)
            continue
        for pattern in shlex.split(match.group(2)):
            pattern = os.path.expanduser(pattern)
            if not os.path.isabs(pattern):
                pattern = os.path.join(os.path.expanduser("~/.ssh"), pattern)
            for included in sorted(glob.glob(pattern)):
                if os.path.isfile(included):
                    out.append(expand_includes(Path(included), _depth + 1))
        out.append(header or "Host *")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------
# lookup


def _expand_path(value: str, spec_user: str, hostname: str) -> str:
    value = value.replace("%d", os.path.expanduser("~")).replace("%u", getpass.getuser())
    value = value.replace("%h", hostname).replace("%r", spec_user).replace("%%", "%")
    return os.path.expanduser(value)


def _yes(options, key: str, default: bool = False) -> bool:
    value = options.get(key)
    return default if value is None else str(value).lower() in ("yes", "true")


def load_config(config_path: Path | None):
    """A ``paramiko.SSHConfig`` for ``config_path`` (default ``~/.ssh/config``; empty if absent)."""
    import paramiko

    path = Path(os.path.expanduser(str(config_path or DEFAULT_CONFIG)))
    if not path.exists():
        if config_path is not None:
            raise SyncError(f"ssh config {path} does not exist")
        return paramiko.SSHConfig()
    try:
        return paramiko.SSHConfig.from_text(expand_includes(path))
    except Exception as e:  # paramiko raises ConfigParseError, ImportError (Match exec needs invoke), ...
        raise SyncError(f"{path}: cannot be read by paramiko ({e}); use `transport: openssh`") from e


def resolve_host(
    alias: str, config_path: Path | None = None, known_hosts: list[Path] | None = None, hop: Hop | None = None
) -> HostSpec:
    """Resolve ``alias`` (or a ProxyJump hop) into a ``HostSpec``.

    Parameters
    ----------
    alias : str
        Host alias or name to look up.
    config_path : Path or None
        The ssh config (default ``~/.ssh/config``).
    known_hosts : list of Path or None
        Replace the config's UserKnownHostsFile (tests and ``--known-hosts`` use this).
    hop : Hop or None
        When resolving a ProxyJump hop: its explicit user and port win over the config.
    """
    options = load_config(config_path).lookup(alias)
    hostname = options.get("hostname", alias)
    user = (hop.user if hop and hop.user else None) or options.get("user") or getpass.getuser()
    port = (hop.port if hop and hop.port else None) or int(options.get("port", 22))
    jump = options.get("proxyjump")
    hops = () if not jump or jump.lower() == "none" else tuple(Hop.parse(h) for h in jump.split(","))
    identity = tuple(_expand_path(p, user, hostname) for p in options.get("identityfile", []))
    if known_hosts is not None:
        user_files = tuple(str(p) for p in known_hosts)
    else:
        user_files = tuple(
            _expand_path(p, user, hostname)
            for p in options.get("userknownhostsfile", " ".join(DEFAULT_USER_KNOWN_HOSTS)).split()
        )
    global_files = tuple(
        _expand_path(p, user, hostname)
        for p in options.get("globalknownhostsfile", " ".join(DEFAULT_GLOBAL_KNOWN_HOSTS)).split()
    )
    timeout = options.get("connecttimeout")
    agent = options.get("identityagent")
    return HostSpec(
        alias=alias,
        hostname=hostname,
        port=port,
        user=user,
        identity_files=identity,
        identities_only=_yes(options, "identitiesonly"),
        use_agent=not (agent and agent.lower() == "none"),
        proxy_jump=hops,
        proxy_command=options.get("proxycommand") or None,
        known_hosts_files=user_files + global_files,
        host_key_alias=options.get("hostkeyalias"),
        connect_timeout=float(timeout) if timeout else None,
        server_alive_interval=int(options.get("serveraliveinterval", 0) or 0),
        batch_mode=_yes(options, "batchmode"),
        host_key_algorithms=options.get("hostkeyalgorithms"),
    )


def default_identity_files() -> tuple[str, ...]:
    """The keys ``ssh`` tries when the config names none."""
    return tuple(os.path.expanduser(p) for p in DEFAULT_IDENTITIES)
