"""The sync planner: two listings and the filters in, the list of actions out. Pure: no I/O.

Rules (rsync's quick check, plus the safety rules of docs/sync.md):

- a file moves when it is new, or when its size or whole-second mtime differs; with checksums,
  equal-size files move only when their contents differ (equal contents with another mtime only
  get the mtime set: a ``touch``);
- a destination file that is newer than the source file is kept unless ``force``;
- links are recreated only when their target stays inside the root; others are refused;
- nothing is deleted unless ``delete``; excluded paths are never deleted, and a side whose
  listing was incomplete (missing scope, unreadable folder) deletes nothing;
- a wrong or purged source path must not wipe the destination: deletions in an experiment (the
  first path component) are refused, unless ``force``, when the source has nothing there or when
  more than ``max_delete`` of the experiment's destination files would go;
- a folder where a file should go, or a file or link where a folder should be, is reported as a
  conflict and left alone;
- partial files of this tool (``.name.<size>-<mtime>.part``) on the destination that no copy of
  this plan can resume are stale and removed (they are ours, not the user's).
"""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass, field
from typing import Literal, Mapping

from moespec.sync.filters import Filters
from moespec.sync.listing import Entry, Listing, Refusal
from moespec.sync.paths import link_escapes

ActionKind = Literal["copy", "link", "touch", "delete"]
_PART = re.compile(r"^\.(?P<name>.+)\.(?P<size>\d+)-(?P<mtime>\d+)\.part$", re.DOTALL)


@dataclass(frozen=True)
class Action:
    """One thing to do on the destination side."""

    kind: ActionKind
    path: str
    reason: str
    source: Entry | None = None
    dest: Entry | None = None

    @property
    def size(self) -> int:
        return self.source.size if self.kind == "copy" and self.source is not None else 0


@dataclass(frozen=True)
class Skip:
    """A source entry that is deliberately not applied, and why."""

    path: str
    reason: str


@dataclass
class Plan:
    """What a sync will do. ``copies`` are sorted largest first (they start first)."""

    copies: list[Action] = field(default_factory=list)
    links: list[Action] = field(default_factory=list)
    touches: list[Action] = field(default_factory=list)
    deletes: list[Action] = field(default_factory=list)
    stale_parts: list[str] = field(default_factory=list)
    kept: list[Skip] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    deletes_refused: list[str] = field(default_factory=list)
    unchanged: int = 0
    excluded: int = 0

    @property
    def bytes(self) -> int:
        return sum(a.size for a in self.copies)

    def actions(self) -> list[Action]:
        """Every action, in the order they are listed to the user."""
        return sorted(self.copies + self.links + self.touches, key=lambda a: a.path) + self.deletes

    def is_empty(self) -> bool:
        return not (self.copies or self.links or self.touches or self.deletes)


def checksum_candidates(source: Listing, dest: Listing, filters: Filters) -> list[str]:
    """Paths whose contents must be hashed under ``--checksum``: selected files of equal size."""
    out = []
    for path, entry in source.entries.items():
        other = dest.entries.get(path)
        if (
            entry.kind == "file"
            and other is not None
            and other.kind == "file"
            and other.size == entry.size
            and filters.selects(path)
        ):
            out.append(path)
    return sorted(out)


def _ancestor_conflict(path: str, dest: Listing) -> str | None:
    folder = posixpath.dirname(path)
    while folder:
        other = dest.entries.get(folder)
        if other is not None and other.kind != "dir":
            return f"destination has a {other.kind} at {folder}, not a folder"
        folder = posixpath.dirname(folder)
    return None


def _plan_file(
    src: Entry, dst: Entry | None, force: bool, window: int, sums: tuple[Mapping[str, str], Mapping[str, str]] | None
) -> Action | Skip | None:
    """Action for one selected source file (None: unchanged)."""
    if dst is None:
        return Action("copy", src.path, "new", src)
    if dst.kind == "dir":
        return Skip(src.path, "destination has a folder here; left alone")
    same_size = dst.kind == "file" and dst.size == src.size
    same_time = abs(dst.mtime_s - src.mtime_s) <= window
    if sums is not None and same_size:
        source_sum, dest_sum = sums[0].get(src.path), sums[1].get(src.path)
        if source_sum is not None and source_sum == dest_sum:
            return None if same_time else Action("touch", src.path, "same content, mtime differs", src, dst)
        reason = "checksum differs"
    elif same_size and same_time:
        return None
    else:
        reason = "size differs" if not same_size else "mtime differs"
    if dst.mtime_s > src.mtime_s + window and not force:
        return Skip(src.path, f"destination is newer ({reason}); not overwritten without --force")
    return Action("copy", src.path, reason, src, dst)


def _plan_link(src: Entry, dst: Entry | None, force: bool, links: Mapping[str, str]) -> Action | Skip | Refusal | None:
    if link_escapes(src.path, src.target, links):
        return Refusal(src.path, f"link to '{src.target}' leaves the root")
    if dst is None:
        return Action("link", src.path, "new", src)
    if dst.kind == "link" and dst.target == src.target:
        return None
    if dst.kind == "dir":
        return Skip(src.path, "destination has a folder here; left alone")
    if dst.mtime_s > src.mtime_s and not force:
        return Skip(src.path, "destination is newer; not overwritten without --force")
    return Action("link", src.path, "target differs", src, dst)


def plan_sync(
    source: Listing,
    dest: Listing,
    filters: Filters,
    *,
    delete: bool = False,
    force: bool = False,
    max_delete: float = 0.5,
    modify_window: int = 0,
    checksums: tuple[Mapping[str, str], Mapping[str, str]] | None = None,
) -> Plan:
    """Compare two listings of the same scopes and return what to do on the destination.

    Parameters
    ----------
    source, dest : Listing
        Entries relative to the same sync root.
    filters : Filters
        Selects what is transferred and what ``delete`` may remove.
    delete : bool
        Delete destination entries that the source lacks.
    force : bool
        Overwrite destination files that are newer than the source, and delete past ``max_delete``.
    max_delete : float
        Largest share of an experiment's selected destination files (and links) that ``delete``
        may remove; an experiment that the source has nothing of is never emptied (without
        ``force``).
    modify_window : int
        mtimes within this many seconds count as equal.
    checksums : (dict, dict) or None
        Content hashes of ``checksum_candidates`` on the source and destination; when given,
        equal-size files are compared by content instead of mtime.
    """
    plan = Plan(refused=list(source.refused), missing=list(source.missing))
    links = _links_after(source, dest, filters)
    for path in sorted(source.entries):
        src = source.entries[path]
        if src.kind == "dir":
            continue
        if not filters.selects(path):
            plan.excluded += 1
            continue
        conflict = _ancestor_conflict(path, dest)
        if conflict is not None:
            plan.kept.append(Skip(path, conflict))
            continue
        dst = dest.entries.get(path)
        if src.kind == "file":
            result = _plan_file(src, dst, force, modify_window, checksums)
        elif src.kind == "link":
            result = _plan_link(src, dst, force, links)
        else:
            result = Skip(path, "not a regular file, folder or link")
        _record(plan, result)
    if delete:
        _plan_deletes(plan, source, dest, filters)
        if not force:
            _refuse_mass_deletes(plan, source, dest, filters, max_delete)
    plan.copies.sort(key=lambda a: (-a.size, a.path))
    plan.stale_parts = _stale_parts(dest, plan.copies)
    return plan


def _links_after(source: Listing, dest: Listing, filters: Filters) -> dict[str, str]:
    """Path -> target of every link of the destination as the sync would leave it.

    The destination's links, replaced where a selected source entry takes their place; a new link
    is checked against these, so that a link through a link is followed as the kernel would.
    """
    links = {path: entry.target for path, entry in dest.entries.items() if entry.kind == "link"}
    for path, entry in source.entries.items():
        if entry.kind == "dir" or filters.selects(path):
            kept_folder = path in dest.entries and dest.entries[path].kind == "dir"  # a link never replaces one
            if entry.kind == "link" and not kept_folder:
                links[path] = entry.target
            else:
                links.pop(path, None)
    return links


def _stale_parts(dest: Listing, copies: list[Action]) -> list[str]:
    """Partial files on the destination that belong to no copy of this plan (same version)."""
    wanted = {(a.path, a.size, a.source.mtime_s) for a in copies}
    stale = []
    for path, entry in dest.entries.items():
        folder, name = posixpath.split(path)
        match = _PART.match(name)
        if entry.kind == "file" and match:
            target = posixpath.join(folder, match["name"]) if folder else match["name"]
            if (target, int(match["size"]), int(match["mtime"])) not in wanted:
                stale.append(path)
    return sorted(stale)


def _record(plan: Plan, result) -> None:
    if result is None:
        plan.unchanged += 1
    elif isinstance(result, Refusal):
        plan.refused.append(result)
    elif isinstance(result, Skip):
        plan.kept.append(result)
    elif result.kind == "copy":
        plan.copies.append(result)
    elif result.kind == "link":
        plan.links.append(result)
    else:
        plan.touches.append(result)


def _plan_deletes(plan: Plan, source: Listing, dest: Listing, filters: Filters) -> None:
    if source.missing or source.warnings:
        plan.notes.append(
            "nothing deleted: the source listing was incomplete ("
            + "; ".join([f"missing {m or 'root'}" for m in source.missing] + source.warnings[:3])
            + ")"
        )
        return
    protected = {r.path for r in source.refused}
    doomed = []
    for path, entry in dest.entries.items():
        if path in source.entries or path in protected or not filters.selects(path, entry.kind == "dir"):
            continue
        if any(path.startswith(p + "/") for p in protected):
            continue
        doomed.append(Action("delete", path, "not on the source", dest=entry))
    # contents before their folder; a folder that still holds protected files is left by rmdir
    plan.deletes = sorted(doomed, key=lambda a: (-a.path.count("/"), a.path))


def _experiment(path: str) -> str:
    return path.split("/", 1)[0] if "/" in path else ""


def _refuse_mass_deletes(plan: Plan, source: Listing, dest: Listing, filters: Filters, max_delete: float) -> None:
    """Drop the deletions of every experiment where they look like a wrong path, not a cleanup."""
    doomed: dict[str, int] = {}
    for action in plan.deletes:
        if action.dest.kind != "dir":
            doomed[_experiment(action.path)] = doomed.get(_experiment(action.path), 0) + 1
    if not doomed:
        return
    held: dict[str, int] = {}
    for path, entry in dest.entries.items():
        if entry.kind != "dir" and filters.selects(path):
            held[_experiment(path)] = held.get(_experiment(path), 0) + 1
    offered = {_experiment(path) for path, entry in source.entries.items() if entry.kind != "dir"}
    refused = set()
    for experiment, count in sorted(doomed.items()):
        where = experiment or "the root"
        if experiment not in offered:
            why = "the source has no files there (a wrong or purged path?)"
        elif count > max_delete * held[experiment]:
            why = f"that is more than --max-delete {max_delete:.0%} of its {held[experiment]} files"
        else:
            continue
        refused.add(experiment)
        plan.deletes_refused.append(
            f"{where}: --delete would remove {count} of its {held[experiment]} files, and "
            f"{why}; nothing deleted there (check the path, or pass --force)"
        )
    plan.deletes = [a for a in plan.deletes if _experiment(a.path) not in refused]
