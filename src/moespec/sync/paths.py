"""Path safety: names from the other side are checked, and local writes stay under the local root.

A remote listing is data from a machine we do not control. Every name in it is checked by
``check_relpath`` before it reaches the planner, links are refused when their target leaves the
root (``link_escapes``), and ``LocalRoot`` creates folders one component at a time so that a
symlinked folder can never carry a write outside the root.
"""

from __future__ import annotations

import os
import posixpath
import threading
from pathlib import Path

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


def link_escapes(link_path: str, target: str) -> bool:
    """Whether a symlink at ``link_path`` (relative to the root) points outside the root."""
    if not target or target.startswith("/") or "\x00" in target:
        return True
    resolved = posixpath.normpath(posixpath.join(posixpath.dirname(link_path), target))
    return resolved == ".." or resolved.startswith("../")


def part_name(name: str, size: int, mtime: float) -> str:
    """Name of the partial file of ``name``: hidden, next to it, tagged with the remote version.

    The tag (size and whole-second mtime of the file being copied) lets the next run resume only
    a partial file of the same remote version.
    """
    candidate = f".{name}.{size}-{int(mtime)}.part"
    if len(candidate.encode("utf-8", "surrogateescape")) <= 255:
        return candidate
    import hashlib

    digest = hashlib.sha1(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f".{digest}.{size}-{int(mtime)}.part"


def part_prefix(name: str) -> str:
    """Common prefix of every partial file of ``name`` (any remote version)."""
    return f".{name}."


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
                    if not current.is_dir():
                        raise SyncError(f"{current}: exists and is not a folder") from None
                if not self._inside(str(current)):
                    raise SyncError(f"{current}: resolves outside {self.root}; refusing to write through it")
                self._checked.add(key)
            return current

    def check_parent(self, rel: str) -> Path:
        """Path of ``rel`` after making sure its folder exists inside the root."""
        folder = posixpath.dirname(rel)
        self.ensure_folder(folder)
        return self.path(rel)
