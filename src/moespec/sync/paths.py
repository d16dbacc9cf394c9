"""Path safety: names from the other side are checked, and local writes stay under the local root.

A remote listing is data from a machine we do not control. Every name in it is checked by
``check_relpath`` before it reaches the planner, links are refused when their target leaves the
root (``link_escapes``: resolved component by component through the other links of the tree, as
path resolution does, path_resolution(7)), and ``LocalRoot`` creates folders one component at a
time so that a symlinked folder can never carry a write outside the root. ``printable`` escapes
what a name may hold that a terminal would act on.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import threading
import unicodedata
from pathlib import Path
from typing import Mapping

from moespec.errors import SyncError


class UnsafePath(ValueError):
    """A name that would leave the sync root or cannot be represented safely."""


def check_relpath(path: str) -> str:
    """Return ``path`` if it is a clean relative POSIX path; raise ``UnsafePath`` otherwise.

    Refused: empty names, absolute paths, ``.`` / ``..`` / empty components, NUL and backslash
    characters (a folder separator on Windows), and ``:`` on Windows (drive letters, streams).
    """
    if not path:
        raise UnsafePath("empty name")
    if "\x00" in path:
        raise UnsafePath("NUL character in name")
    if path.startswith("/"):
        raise UnsafePath("absolute path")
    if "\\" in path or (os.name == "nt" and ":" in path):
        raise UnsafePath("backslash or drive separator in name")
    for part in path.split("/"):
        if part in ("", ".", ".."):
            raise UnsafePath(f"'{part or '//'}' component in name")
    return path


#: Links followed while resolving one path before giving up, as Linux does (MAXSYMLINKS, path_resolution(7)).
MAX_LINK_FOLLOWS = 40


def link_escapes(link_path: str, target: str, links: Mapping[str, str] | None = None) -> bool:
    """Whether a symlink at ``link_path`` (relative to the root) points outside the root.

    The target is resolved one component at a time, as the kernel does: a component that is
    itself a link in ``links`` (relative path -> target, the links of the tree being built) is
    replaced by its target, and ``..`` above the root is an escape even when later components
    would come back in (``up/x/../..`` through ``up -> ..``). Absolute targets, empty ones and
    chains longer than ``MAX_LINK_FOLLOWS`` count as escaping.
    """
    links = links or {}
    if not target or target.startswith("/") or "\x00" in target:
        return True
    folder = [part for part in posixpath.dirname(link_path).split("/") if part]
    pending = target.split("/")
    follows = 0
    while pending:
        part = pending.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not folder:
                return True
            folder.pop()
            continue
        inner = links.get("/".join([*folder, part]))
        if inner is None:
            folder.append(part)
            continue
        follows += 1
        if follows > MAX_LINK_FOLLOWS or not inner or inner.startswith("/"):
            return True
        pending = inner.split("/") + pending
    return False


def part_name(name: str, size: int, mtime: float) -> str:
    """Name of the partial file of ``name``: hidden, next to it, tagged with the remote version.

    The tag (size and whole-second mtime of the file being copied) lets the next run resume only
    a partial file of the same remote version.
    """
    return hidden_name(name, f".{size}-{int(mtime)}.part")


def hidden_name(name: str, suffix: str) -> str:
    """``.<name><suffix>``, or ``.<hash of name><suffix>`` where that would pass NAME_MAX (255 bytes)."""
    candidate = f".{name}{suffix}"
    if len(candidate.encode("utf-8", "surrogateescape")) <= 255:
        return candidate
    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f".{digest}{suffix}"


def printable(name: str) -> str:
    """``name`` safe to print: control and format characters, and undecodable bytes, as escapes.

    Names are str decoded with ``surrogateescape``; a byte that was not UTF-8 shows as ``\\xff``,
    a control character as ``\\x1b`` (a terminal would act on it), a backslash as ``\\\\``.
    """
    if name.isprintable() and "\\" not in name:
        return name
    out = []
    for char in name:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte (surrogateescape)
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char == "\\":
            out.append("\\\\")
        elif char == " " or unicodedata.category(char)[0] not in "CZ":
            out.append(char)
        else:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
    return "".join(out)


class LocalRoot:
    """Writes under one local folder, refusing anything that would land outside it.

    Parameters
    ----------
    root : Path
        The local root; created on first write.
    """

    def __init__(self, root: Path):
        self.root = Path(root).absolute()
        self._real: str | None = None
        self._checked: set[str] = set()
        self._lock = threading.Lock()

    def path(self, rel: str) -> Path:
        """The local path of a checked relative name."""
        return self.root.joinpath(*check_relpath(rel).split("/"))

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real == self._real or real.startswith(self._real.rstrip(os.sep) + os.sep)

    def ensure_folder(self, rel_folder: str) -> Path:
        """Create ``rel_folder`` (and its parents) under the root; return its path.

        Raises
        ------
        SyncError
            A component exists and is not a folder, or resolves outside the root (a symlink).
        """
        with self._lock:
            if self._real is None:
                self.root.mkdir(parents=True, exist_ok=True)
                self._real = os.path.realpath(self.root)
            if rel_folder in self._checked or not rel_folder:
                return self.path(rel_folder) if rel_folder else self.root
            current = self.root
            walked = []
            for part in check_relpath(rel_folder).split("/"):
                current = current / part
                walked.append(part)
                key = "/".join(walked)
                if key in self._checked:
                    continue
                try:
                    os.mkdir(current)
                except FileExistsError:
                    # what was there may be a link: it must be a folder, and resolve inside the root
                    if not current.is_dir():
                        raise SyncError(f"{current}: exists and is not a folder") from None
                    if not self._inside(str(current)):
                        raise SyncError(
                            f"{current}: resolves outside {self.root}; refusing to write through it"
                        ) from None
                # a folder just made in a checked folder is inside: no realpath (a stat per component)
                self._checked.add(key)
            return current

    def link_stays_inside(self, link: Path, target: str) -> bool:
        """Whether a link at ``link`` to ``target`` resolves inside the root through what is on disk now."""
        self.ensure_folder("")
        return self._inside(os.path.join(os.path.dirname(link), target))

    def check_parent(self, rel: str) -> Path:
        """Path of ``rel`` after making sure its folder exists inside the root."""
        folder = posixpath.dirname(rel)
        self.ensure_folder(folder)
        return self.path(rel)
