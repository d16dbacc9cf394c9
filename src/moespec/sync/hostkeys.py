"""Host-key verification against known_hosts, strict: unknown and changed keys are refused.

paramiko's own ``HostKeys`` is not used: it raises on ``@cert-authority`` lines (paramiko#771),
so one CA line that a centre publishes would break every connection, and it ignores ``@revoked``
and wildcard patterns. This reader keeps every line it understands, matches plain, wildcard,
negated and hashed (``|1|salt|hash``) host patterns, and compares raw key blobs, so it needs no
key parsing at all. Nothing is ever written to known_hosts: the error says how to check the
fingerprint and add the key by hand.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

from moespec.errors import SyncError


class HostKeyError(SyncError):
    """The server's host key is unknown, changed or revoked."""


@dataclass(frozen=True)
class KnownKey:
    """One usable known_hosts line."""

    hosts: str
    key_type: str
    blob: bytes
    source: str
    marker: str = ""


def fingerprint(blob: bytes) -> str:
    """OpenSSH's SHA256 fingerprint of a public key blob."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")


def _wildcard(pattern: str, name: str) -> bool:
    """OpenSSH host patterns: ``*`` and ``?`` only (``[`` is literal, as in ``[host]:port``)."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern.lower())
    return re.fullmatch(regex, name.lower()) is not None


def _pattern_matches(field: str, name: str) -> bool:
    if field.startswith("|1|"):
        try:
            _, _, salt, digest = field.split("|")
            mac = hmac.new(base64.b64decode(salt), name.encode(), hashlib.sha1).digest()
            return hmac.compare_digest(mac, base64.b64decode(digest))
        except (ValueError, binascii.Error):
            return False
    positive = False
    for pattern in field.split(","):
        negated = pattern.startswith("!")
        if _wildcard(pattern.lstrip("!"), name):
            if negated:
                return False
            positive = True
    return positive


class KnownHosts:
    """The keys of one or more known_hosts files."""

    def __init__(self, keys: list[KnownKey], files: list[str]):
        self.keys = keys
        self.files = files

    @classmethod
    def load(cls, files) -> "KnownHosts":
        """Read every existing file; unparsable lines are skipped, as ``ssh`` does."""
        keys, used = [], []
        for name in files:
            path = Path(os.path.expanduser(str(name)))
            if not path.is_file():
                continue
            used.append(str(path))
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                key = _parse_line(line, f"{path}:{number}")
                if key is not None:
                    keys.append(key)
        return cls(keys, used)

    def for_host(self, name: str) -> list[KnownKey]:
        return [k for k in self.keys if _pattern_matches(k.hosts, name)]


def _parse_line(line: str, source: str) -> KnownKey | None:
    fields = line.split()
    if not fields or fields[0].startswith("#"):
        return None
    marker = ""
    if fields[0].startswith("@"):
        marker, fields = fields[0], fields[1:]
    if len(fields) < 3:
        return None
    try:
        blob = base64.b64decode(fields[2], validate=True)
    except (ValueError, binascii.Error):
        return None
    return KnownKey(fields[0], fields[1], blob, source, marker)


def preferred_key_types(keys: list[KnownKey]) -> list[str]:
    """Host-key algorithms to ask for first, so the server shows a key we can check (as ssh does)."""
    out: list[str] = []
    for key in keys:
        if key.marker:
            continue
        algorithms = ["rsa-sha2-512", "rsa-sha2-256", "ssh-rsa"] if key.key_type == "ssh-rsa" else [key.key_type]
        out += [a for a in algorithms if a not in out]
    return out


def _add_hint(name: str, host: str, port: int, key_type: str, files: list[str], alias: str) -> str:
    """How to check a fingerprint and add a key by hand (moespec never does it)."""
    target = files[0] if files else "~/.ssh/known_hosts"
    short_type = key_type.removeprefix("ssh-").split("-")[0]
    scan = f"ssh-keyscan {f'-p {port} ' if port != 22 else ''}-t {short_type} {shlex.quote(host)}"
    scanned_name = host if port == 22 else f"[{host}]:{port}"
    rename = "" if name == scanned_name else f" | sed 's/^[^ ]*/{name}/'"
    return (
        "Check that fingerprint against the one your centre publishes (or ask its support), then add the key:\n"
        f"    {scan}{rename} > /tmp/hostkey && ssh-keygen -lf /tmp/hostkey\n"
        f"    cat /tmp/hostkey >> {target}    # only if the fingerprint printed is the published one\n"
        f"or connect once with `ssh {alias}`, compare the fingerprint it shows and answer yes.\n"
        "moespec never adds host keys by itself."
    )


def verify_host_key(
    server_key_type: str, server_blob: bytes, name: str, known: KnownHosts, *, host: str, port: int, alias: str
) -> None:
    """Accept the server's key only if known_hosts lists exactly it for ``name``.

    Raises
    ------
    HostKeyError
        The key is revoked, no key is known for the host, or a different key is known.
    """
    keys = known.for_host(name)
    offered = f"{server_key_type} {fingerprint(server_blob)}"
    if any(k.marker == "@revoked" and k.blob == server_blob for k in known.keys):
        raise HostKeyError(f"the host key of {alias} ({name}) is marked @revoked in known_hosts: {offered}")
    plain = [k for k in keys if not k.marker]
    if any(k.blob == server_blob for k in plain):
        return
    if plain:
        listed = "\n".join(f"    {k.source}: {k.key_type} {fingerprint(k.blob)}" for k in plain)
        raise HostKeyError(
            f"HOST KEY MISMATCH for {alias} ({name}).\n"
            f"known_hosts has:\n{listed}\nbut the server offered {offered}.\n"
            f"Someone may be intercepting the connection, or the host was reinstalled. Ask your centre. "
            f"If the new key is legitimate, remove the old one with\n"
            f"    ssh-keygen -R {shlex.quote(name)} -f {shlex.quote(plain[0].source.rsplit(':', 1)[0])}\n"
            f"and add the new one as below.\n" + _add_hint(name, host, port, server_key_type, known.files, alias)
        )
    ca_note = ""
    if any(k.marker == "@cert-authority" for k in keys):
        ca_note = (
            "known_hosts trusts a certificate authority for this host, which paramiko cannot check; "
            "use `transport: openssh` (or --transport openssh).\n"
        )
    searched = ", ".join(known.files) or "no known_hosts file exists"
    raise HostKeyError(
        f"the host key of {alias} ({name}) is not known (searched: {searched}).\n"
        f"The server offered {offered}.\n" + ca_note + _add_hint(name, host, port, server_key_type, known.files, alias)
    )
