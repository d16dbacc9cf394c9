"""A cheap "is this task done?" for planning thousands of tasks: verify once, then trust a stamp.

``Task.is_done()`` opens the HDF5 file, checks its completeness flag and schema and reads the
first and last row of every dataset: 20-60 ms for a train or fiber artifact, two minutes for a
2,000-task sweep. Planning asks the same question again and again about files that never change,
so once a file has passed the full check (or its job has just committed it), a small stamp
``.done-<file>.json`` beside it records the file's size and modification time; later checks stat
the file and compare. Any change to the file (rewritten, truncated, replaced by a sync that does
not keep modification times) makes the stamp stale and brings back the full check. The stamp
also keeps the code version the artifact records, so a stale artifact is told apart without
opening it (:mod:`moespec.launch.codeversion`).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from moespec import artifacts
from moespec.launch.plan import Task, stale_reason


def stamp_path(task: Task) -> Path:
    return task.dir / f".done-{task.h5_path.name}.json"


def _signature(path: Path) -> dict[str, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def write_stamp(task: Task, code_version: str | None = None, stage_code: str | None = None) -> None:
    """Record that ``task``'s artifact, as it is now, passed the full check (best effort).

    ``code_version`` and ``stage_code``: what the artifact records (default: the task's own, as
    for an artifact the task has just written).
    """
    code_version = task.code_version if code_version is None else code_version
    stage_code = task.stage_code if stage_code is None else stage_code
    signature = _signature(task.h5_path)
    if signature is not None:
        with contextlib.suppress(OSError):  # read-only results (e.g. someone else's scratch)
            artifacts.atomic_write_text(
                stamp_path(task),
                json.dumps(
                    {"file": task.h5_path.name, **signature, "code_version": code_version, "stage_code": stage_code}
                ),
            )


def check(task: Task) -> tuple[bool, str]:
    """``task.check()``, answered from a valid stamp when there is one (and stamped when the file is valid)."""
    signature = _signature(task.h5_path)
    if signature is None:
        return False, ""
    try:
        stamp = json.loads(stamp_path(task).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        stamp = None
    if isinstance(stamp, dict) and {k: stamp.get(k) for k in signature} == signature:
        reason = stale_reason(task, str(stamp.get("code_version", "")), str(stamp.get("stage_code", "")))
        return not reason, reason
    try:
        made_by = task.made_by()
    except artifacts.ArtifactError as e:
        return False, f"unreadable artifact: {e}"
    write_stamp(task, *made_by)
    reason = stale_reason(task, *made_by)
    return not reason, reason


def is_done(task: Task) -> bool:
    """Whether ``task``'s artifact is complete, valid and current (see :func:`check`)."""
    return check(task)[0]
