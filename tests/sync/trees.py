"""Shared builders of the sync tests: small file trees built in code, requests, and tree comparisons."""

from __future__ import annotations

import os
from pathlib import Path

from moespec.sync.engine import EngineSettings
from moespec.sync.session import SyncRequest

#: A results tree like the pipeline writes: summaries, plots, an embedding, a checkpoint.
RESULTS = {
    "demo/summary.json": b'{"tasks": 3}\n',
    "demo/embed/1a2b/embed.h5": 300_000,
    "demo/embed/1a2b/config.yaml": b"model: tiny\n",
    "demo/reduce/3c4d/reduce.h5": 40_000,
    "demo/reduce/3c4d/plot.png": 5_000,
    "demo/train/5e6f/ckpt.pt": 120_000,
    "demo/empty.txt": b"",
    "other/summary.json": b'{"tasks": 1}\n',
}

OLD = 1_600_000_000  # a fixed mtime in the past (whole seconds, as SFTP carries)


def make_tree(root: Path, files: dict, mtime: int = OLD) -> Path:
    """Write ``files`` (relative path -> bytes, or a size for random bytes) under ``root``."""
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(content) if isinstance(content, int) else content)
        os.utime(path, (mtime, mtime))
    return root


def snapshot(root: Path) -> dict[str, tuple[bytes, int]]:
    """Relative path -> (content, whole-second mtime) of every regular file under ``root``."""
    out = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            if path.is_symlink():
                continue
            out[path.relative_to(root).as_posix()] = (path.read_bytes(), int(path.stat().st_mtime))
    return out


def parts(root: Path) -> list[Path]:
    """Every ``.part`` file left under ``root``."""
    return [p for p in root.rglob("*.part")] if root.exists() else []


def pull_request(host: str, remote: Path, local: Path, config: Path, **options) -> SyncRequest:
    """A pull of ``remote`` on ``host`` into ``local`` through the ssh ``config``: no retries, short timeouts."""
    defaults = dict(
        direction="pull",
        host=host,
        remote_root=str(remote),
        local_root=local,
        ssh_config=config,
        retries=0,
        connect_timeout=10,
        engine=EngineSettings(stall_timeout=30),
    )
    return SyncRequest(**{**defaults, **options})
