"""Listings of a tree: what files, links and folders exist, with size, mtime and mode.

A listing is made for the local side (``list_local``) and for the remote side, either from one
remote ``find`` (``find_command`` + ``parse_find_output``: one round trip for the whole tree) or,
where the server has no usable shell, from an SFTP walk (``walk_sftp``: about four round trips per
folder). Every remote name is checked (``paths.check_relpath``); bad names become refusals, never
entries.
"""

from __future__ import annotations

import errno
import os
import posixpath
import shlex
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Literal

from moespec.sync.paths import UnsafePath, check_relpath

Kind = Literal["file", "dir", "link", "other"]

#: Printed before the listing so that text from the remote shell's start-up files is skipped.
LISTING_MARKER = b"MOESPEC-LISTING-BEGIN\n"
#: Fields of one ``find -printf`` record (NUL-separated, so every file name is representable).
_FIND_FORMAT = r"%H\0%y\0%s\0%T@\0%m\0%P\0%l\0"
_FIND_FIELDS = 7
_FIND_KINDS = {"f": "file", "d": "dir", "l": "link"}


@dataclass(frozen=True)
class Entry:
    """One file, folder or link, named by its path relative to the sync root."""

    path: str
    kind: Kind
    size: int = 0
    mtime: float = 0.0
    mode: int = 0o644
    target: str = ""

    @property
    def mtime_s(self) -> int:
        """Whole-second mtime: SFTP v3 carries whole seconds, so both sides compare these."""
        return int(self.mtime)


@dataclass(frozen=True)
class Refusal:
    """A remote name or link that is not used, and why."""

    path: str
    reason: str


@dataclass
class Listing:
    """All entries under the requested scopes of one side.

    Attributes
    ----------
    entries : dict
        Relative path -> Entry; scope roots themselves are included.
    refused : list of Refusal
        Names that failed the safety checks.
    missing : list of str
        Scopes that do not exist on this side.
    warnings : list of str
        Problems that did not stop the listing (unreadable folders...).
    """

    entries: dict[str, Entry] = field(default_factory=dict)
    refused: list[Refusal] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    method: str = ""

    def add(self, entry: Entry) -> None:
        self.entries[entry.path] = entry


def join_scope(scope: str, rel: str) -> str:
    """Relative path of ``rel`` found under ``scope`` ("" = the root itself)."""
    if not scope:
        return rel
    return f"{scope}/{rel}" if rel else scope


def remote_join(root: str, rel: str) -> str:
    """Remote path of a relative name under ``root``."""
    return posixpath.join(root, rel) if rel else root


# --------------------------------------------------------------------------------------------------
# local


def _entry_from_stat(rel: str, st: os.stat_result, target: str = "") -> Entry:
    if stat.S_ISLNK(st.st_mode):
        kind: Kind = "link"
    elif stat.S_ISDIR(st.st_mode):
        kind = "dir"
    elif stat.S_ISREG(st.st_mode):
        kind = "file"
    else:
        kind = "other"
    return Entry(rel, kind, st.st_size if kind == "file" else 0, st.st_mtime, stat.S_IMODE(st.st_mode), target)


def list_local(root: Path, scopes: Iterable[str] = ("",)) -> Listing:
    """List ``root/scope`` for each scope, without following symlinks below the root.

    The root itself is followed when it is a link (``results -> /data/results``), as ``find -H``
    follows the remote one.
    """
    listing = Listing(method="local")
    root = Path(root)
    for scope in scopes:
        top = root.joinpath(*scope.split("/")) if scope else root
        try:
            st = os.lstat(top) if scope else os.stat(top)
        except FileNotFoundError:
            listing.missing.append(scope)
            continue
        except OSError as e:
            listing.warnings.append(f"cannot read {top}: {e.strerror}")
            continue
        if scope:
            target = os.readlink(top) if stat.S_ISLNK(st.st_mode) else ""
            listing.add(_entry_from_stat(scope, st, target))
        if stat.S_ISDIR(st.st_mode):
            _walk_local(top, scope, listing)
    return listing


def _walk_local(top: Path, scope: str, listing: Listing) -> None:
    stack = [(str(top), scope)]
    while stack:
        folder, rel_folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                children = list(it)
        except OSError as e:
            listing.warnings.append(f"cannot read {folder}: {e.strerror}")
            continue
        for child in children:
            rel = join_scope(rel_folder, child.name)
            try:
                st = child.stat(follow_symlinks=False)
                target = os.readlink(child.path) if child.is_symlink() else ""
            except OSError as e:
                listing.warnings.append(f"cannot read {child.path}: {e.strerror}")
                continue
            entry = _entry_from_stat(rel, st, target)
            listing.add(entry)
            if entry.kind == "dir":
                stack.append((child.path, rel))


# --------------------------------------------------------------------------------------------------
# remote, one round trip


def find_command(root: str, scopes: Iterable[str]) -> str:
    """Shell command that lists every scope under ``root`` in one go (GNU find).

    ``-H`` follows a scope root that is itself a symlink (scratch folders often are), never links
    below it. The ``echo`` marker lets the parser skip whatever the remote shell's start-up files
    print.
    """
    starts = " ".join(shlex.quote(remote_join(root, scope)) for scope in scopes)
    return f"echo {LISTING_MARKER.decode().strip()}; find -H {starts} -printf '{_FIND_FORMAT}'"


#: Where OpenSSH's ``sftp-server`` is installed on Debian/Ubuntu, RHEL/Fedora, Arch and BSD-likes.
SFTP_SERVERS = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
)


#: What the client sends on the listing's session at once. The script reads it just before it starts
#: the SFTP server; a server that forces SFTP on every session (``ForceCommand internal-sftp``, common
#: on data-transfer nodes) reads it as a packet longer than any it accepts and ends the session, so
#: that the client falls back to the SFTP walk at once instead of waiting for a listing.
LISTING_PROBE = b"\xff" * 5  # OpenSSH's sftp-server looks at a packet once it has 5 bytes


def new_token() -> str:
    """A random marker for ``list_then_serve_command`` (``os.urandom``: ``secrets`` costs 5 ms to import)."""
    return os.urandom(8).hex()


def list_then_serve_command(root: str, scopes: Iterable[str], token: str) -> str:
    """Shell command: ``find_command``'s listing, a trailer with find's exit status, then an SFTP
    server on the same session (or a line saying there is none).

    One session instead of two (a listing command, then an SFTP subsystem): each session runs the
    remote login shell, the largest fixed cost of a small pull on a cluster with heavy dotfiles
    (docs/sync.md, "Start-up"); ``rsync`` also needs only one. ``token`` (random per run) makes the
    trailers impossible to forge with a file name. The script runs under ``sh -c`` so that a
    csh or fish login shell does not matter; it reads ``LISTING_PROBE`` before the SFTP server
    starts, and the session ends when the client closes its input.
    """
    servers = " ".join(shlex.quote(server) for server in SFTP_SERVERS)
    script = (
        f"{find_command(root, scopes)}; printf 'MOESPEC-END-{token} %d\\n' $?; "
        f'for s in {servers}; do if [ -x "$s" ] && head -c {len(LISTING_PROBE)} >/dev/null; then '
        f'echo MOESPEC-SFTP-{token}; exec "$s"; fi; done; '
        f"echo MOESPEC-NO-SFTP-{token}"
    )
    return "sh -c " + shlex.quote(script)


def list_then_serve_endings(token: str) -> tuple[bytes, bytes]:
    """The last line of ``list_then_serve_command``'s output before the SFTP stream, or when there is none."""
    return f"\nMOESPEC-SFTP-{token}\n".encode(), f"\nMOESPEC-NO-SFTP-{token}\n".encode()


def parse_list_then_serve(data: bytes, root: str, scopes: Iterable[str], token: str) -> tuple[Listing, int, bool]:
    """(listing, find's exit status, whether an SFTP server follows) from ``list_then_serve_command``'s output.

    Raises
    ------
    ValueError
        The trailer or the listing marker is missing, or the listing is truncated.
    """
    serving, not_serving = list_then_serve_endings(token)
    trailer = f"MOESPEC-END-{token} ".encode()
    end = data.rfind(trailer)
    if end < 0 or not (data.endswith(serving) or data.endswith(not_serving)):
        raise ValueError("listing trailer not found in the remote output")
    status = int(data[end + len(trailer) :].split(b"\n", 1)[0])
    return parse_find_output(data[:end], root, scopes), status, data.endswith(serving)


def parse_find_output(data: bytes, root: str, scopes: Iterable[str]) -> Listing:
    """Turn the output of ``find_command`` into a listing, refusing unsafe names.

    Raises
    ------
    ValueError
        The marker is missing or the output is truncated (not a whole number of records).
    """
    start = data.find(LISTING_MARKER)
    if start < 0:
        raise ValueError("listing marker not found in the remote output")
    fields = data[start + len(LISTING_MARKER) :].split(b"\0")
    if fields[-1] != b"" or (len(fields) - 1) % _FIND_FIELDS:
        raise ValueError("truncated remote listing")
    by_start = {remote_join(root, scope).encode("utf-8", "surrogateescape"): scope for scope in scopes}
    listing, seen = Listing(method="find"), set()
    for i in range(0, len(fields) - 1, _FIND_FIELDS):
        record = [f.decode("utf-8", "surrogateescape") for f in fields[i : i + _FIND_FIELDS]]
        start_point, kind_char, size, mtime, mode, rel, target = record
        scope = by_start.get(fields[i])
        shown = rel or start_point
        if scope is None:
            listing.refused.append(Refusal(start_point, "not one of the folders asked for"))
            continue
        if not rel:
            seen.add(scope)
            if not scope:
                continue  # the root itself
        try:
            path = check_relpath(join_scope(scope, rel))
            entry = Entry(path, _FIND_KINDS.get(kind_char, "other"), int(size), float(mtime), int(mode, 8), target)
        except UnsafePath as e:
            listing.refused.append(Refusal(shown, str(e)))
            continue
        except ValueError:
            listing.refused.append(Refusal(shown, "malformed listing record"))
            continue
        listing.add(entry)
    listing.missing = [scope for scope in scopes if scope not in seen]
    return listing


# --------------------------------------------------------------------------------------------------
# remote, SFTP walk (no shell)


def _sftp_entry(rel: str, attr, target: str = "") -> Entry:
    mode = attr.st_mode or 0
    if stat.S_ISLNK(mode):
        kind: Kind = "link"
    elif stat.S_ISDIR(mode):
        kind = "dir"
    elif stat.S_ISREG(mode):
        kind = "file"
    else:
        kind = "other"
    return Entry(
        rel, kind, (attr.st_size or 0) if kind == "file" else 0, float(attr.st_mtime or 0), stat.S_IMODE(mode), target
    )


def remote_bytes(path: str) -> bytes:
    """A remote path as the bytes SFTP carries (names that are not UTF-8 were decoded with surrogateescape)."""
    return path.encode("utf-8", "surrogateescape")


class RawNames:
    """STAT, READDIR and READLINK on a ``paramiko.SFTPClient`` with names as bytes.

    paramiko decodes the names a server sends as strict UTF-8 (``listdir_attr`` raises
    ``UnicodeDecodeError`` on any other byte); SFTP names are opaque bytes (draft-ietf-secsh-filexfer-02,
    section 6.1), so these requests are sent through paramiko's request layer and the names are
    decoded with ``surrogateescape``, as ``os.listdir`` does.
    """

    def __init__(self, sftp):
        self.sftp = sftp

    def stat(self, path: str):
        from paramiko.sftp import CMD_ATTRS, CMD_STAT
        from paramiko.sftp_attr import SFTPAttributes

        kind, msg = self.sftp._request(CMD_STAT, remote_bytes(path))
        if kind != CMD_ATTRS:
            raise OSError(f"unexpected SFTP answer {kind} to STAT")
        return SFTPAttributes._from_msg(msg)

    def listdir(self, path: str) -> list:
        """Attributes of every entry of a folder, each with ``filename`` set (``.`` and ``..`` left out)."""
        from paramiko.sftp import CMD_CLOSE, CMD_HANDLE, CMD_NAME, CMD_OPENDIR, CMD_READDIR
        from paramiko.sftp_attr import SFTPAttributes

        kind, msg = self.sftp._request(CMD_OPENDIR, remote_bytes(path))
        if kind != CMD_HANDLE:
            raise OSError(f"unexpected SFTP answer {kind} to OPENDIR")
        handle = msg.get_binary()
        entries = []
        try:
            while True:
                try:
                    kind, msg = self.sftp._request(CMD_READDIR, handle)
                except EOFError:  # SSH_FX_EOF: the end of the folder
                    return entries
                if kind != CMD_NAME:
                    raise OSError(f"unexpected SFTP answer {kind} to READDIR")
                for _ in range(msg.get_int()):
                    name = msg.get_string().decode("utf-8", "surrogateescape")
                    longname = msg.get_string().decode("utf-8", "replace")
                    attrs = SFTPAttributes._from_msg(msg, name, longname)  # read even when skipped
                    if name not in (".", ".."):
                        entries.append(attrs)
        finally:
            self.sftp._request(CMD_CLOSE, handle)

    def readlink(self, path: str) -> str:
        from paramiko.sftp import CMD_NAME, CMD_READLINK

        kind, msg = self.sftp._request(CMD_READLINK, remote_bytes(path))
        if kind != CMD_NAME or msg.get_int() != 1:
            raise OSError(f"unexpected SFTP answer {kind} to READLINK")
        return msg.get_string().decode("utf-8", "surrogateescape")


def walk_sftp(sftp, root: str, scopes: Iterable[str]) -> Listing:
    """List the scopes with SFTP requests only (for servers without a shell or GNU find).

    Parameters
    ----------
    sftp : paramiko.SFTPClient
    """
    return walk_names(RawNames(sftp), root, scopes)


def walk_names(names, root: str, scopes: Iterable[str]) -> Listing:
    """``walk_sftp`` over any object with ``stat``, ``listdir`` and ``readlink`` as ``RawNames`` has."""
    listing = Listing(method="sftp-walk")
    for scope in scopes:
        top = remote_join(root, scope)
        try:
            attr = names.stat(top)  # follows a symlinked scope root, like find -H
        except OSError as e:
            if getattr(e, "errno", None) == errno.ENOENT:
                listing.missing.append(scope)
            else:
                listing.warnings.append(f"cannot read {top}: {_reason(e)}")
            continue
        if scope:
            listing.add(_sftp_entry(scope, attr))
        if stat.S_ISDIR(attr.st_mode or 0):
            _walk_sftp_folder(names, top, scope, listing)
    return listing


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _walk_sftp_folder(names, top: str, scope: str, listing: Listing) -> None:
    stack = [(top, scope)]
    while stack:
        folder, rel_folder = stack.pop()
        try:
            children = names.listdir(folder)
        except OSError as e:
            listing.warnings.append(f"cannot read {folder}: {_reason(e)}")
            continue
        for attr in children:
            name = attr.filename
            shown = join_scope(rel_folder, name)
            if "/" in name or name in (".", ".."):
                listing.refused.append(Refusal(shown, "server sent a name that is not a single component"))
                continue
            try:
                rel = check_relpath(shown)
            except UnsafePath as e:
                listing.refused.append(Refusal(shown, str(e)))
                continue
            target = ""
            if stat.S_ISLNK(attr.st_mode or 0):
                try:
                    target = names.readlink(posixpath.join(folder, name)) or ""
                except OSError:
                    target = ""
            entry = _sftp_entry(rel, attr, target)
            listing.add(entry)
            if entry.kind == "dir":
                stack.append((posixpath.join(folder, name), rel))
