"""The HDF5 artifact store: where artifacts live, how they are written atomically, how they are read.

An artifact is a folder ``<root>/<experiment>/<stage>/<uid>/`` holding ``<stage>.h5``,
``config.yaml``, ``summary.json`` and ``log.txt``. A sharded stage writes one file per shard
(``<stage>.shard-00001-of-00004.h5``, one writer per file as HDF5 on parallel file systems requires)
and ``<stage>.h5`` is then a virtual dataset over the shards: consumers read one dataset, nothing is
copied.

Files are written as ``*.tmp`` in the same folder, flushed, fsynced and renamed with ``os.replace``,
so a file under its final name is always complete. The root of every HDF5 file carries provenance
attributes and ``complete=True``, set just before the rename.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Mapping

import h5py
import numpy as np

from moespec import __version__
from moespec.errors import ArtifactError

log = logging.getLogger("moespec")

#: Packages whose versions go into every artifact's provenance.
_PROVENANCE_PACKAGES = ("numpy", "h5py", "torch", "transformers", "datasets", "scikit-learn", "scipy")
_DTYPE_KINDS = ("float", "int", "str", "bool")


@dataclass(frozen=True)
class DatasetSpec:
    """The expected shape and dtype kind of one dataset of an artifact.

    Parameters
    ----------
    shape : tuple of (str or int)
        One entry per axis: a symbolic name (``"N"``, ``"D"``; equal names must have equal sizes
        across the datasets of one file) or a fixed size.
    dtype : {"float", "int", "str", "bool"}
    required : bool
        Whether the dataset must exist.
    """

    shape: tuple[str | int, ...]
    dtype: str
    required: bool = True

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPE_KINDS:
            raise ValueError(f"DatasetSpec.dtype must be one of {_DTYPE_KINDS}, got {self.dtype!r}")


Schema = Mapping[str, DatasetSpec]


# --------------------------------------------------------------------------------------------------
# paths


def artifact_dir(root: Path | str, experiment: str, stage: str, uid: str) -> Path:
    """The folder of one artifact: ``<root>/<experiment>/<stage>/<uid>``."""
    return Path(root) / experiment / stage / uid


def h5_name(stage: str, shard_index: int = 0, num_shards: int = 1) -> str:
    """File name of a stage's HDF5 file, or of one of its shards."""
    if num_shards == 1:
        return f"{stage}.h5"
    return f"{stage}.shard-{shard_index:05d}-of-{num_shards:05d}.h5"


# --------------------------------------------------------------------------------------------------
# atomic files


def fsync_path(path: Path) -> None:
    """Flush a file's data to disk (so a rename after it cannot expose an empty file after a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file of a folder and the folder itself."""
    if path.is_dir():
        for child in path.rglob("*"):
            if child.is_file():
                fsync_path(child)
    fsync_path(path)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through ``path.tmp`` + ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


#: Seconds between two records of a progress bar's count (see :meth:`ArtifactWriter.progress`).
PROGRESS_INTERVAL_S = 2.0


def _recorded(bar: Any, path: Path) -> Iterable:
    """Iterate ``bar``, writing ``{"desc", "n", "total", "elapsed_s"}`` to ``path`` every few seconds."""
    last = started = time.monotonic()
    try:
        for count, item in enumerate(bar, start=1):
            yield item
            now = time.monotonic()
            if now - last >= PROGRESS_INTERVAL_S:
                last = now
                # our own count: tqdm updates bar.n only when it redraws (every 30 s in a batch log)
                record = {"desc": bar.desc, "n": count, "total": bar.total, "elapsed_s": round(now - started, 1)}
                with contextlib.suppress(OSError):  # progress is informative; never fail a task for it
                    path.with_name(path.name + ".tmp").write_text(json.dumps(record), encoding="utf-8")
                    os.replace(path.with_name(path.name + ".tmp"), path)
    finally:
        bar.close()
        with contextlib.suppress(OSError):
            path.unlink()


# --------------------------------------------------------------------------------------------------
# provenance


@lru_cache(maxsize=1)
def _package_versions() -> dict[str, str]:
    from importlib import metadata

    versions = {"python": sys.version.split()[0], "moespec": __version__}
    for name in _PROVENANCE_PACKAGES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[name] = metadata.version(name)
    return versions


@lru_cache(maxsize=1)
def git_commit() -> str:
    """The git commit of the moespec checkout, with ``+dirty`` when modified; "" when unknown.

    Jobs run from a code snapshot that is not a git checkout; the submitter exports the commit
    it snapshotted as ``MOESPEC_GIT_COMMIT``, which wins.
    """
    if os.environ.get("MOESPEC_GIT_COMMIT"):
        return os.environ["MOESPEC_GIT_COMMIT"]
    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return ""
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        return sha.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def now_iso() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def provenance_attrs() -> dict[str, str]:
    """Attributes describing where and with what an artifact was made."""
    env = os.environ
    return {
        "moespec_version": __version__,
        "git_commit": git_commit(),
        "package_versions": json.dumps(_package_versions(), sort_keys=True),
        "host": socket.gethostname(),
        "slurm_job_id": env.get("SLURM_JOB_ID", ""),
        "slurm_array_job_id": env.get("SLURM_ARRAY_JOB_ID", ""),
        "slurm_array_task_id": env.get("SLURM_ARRAY_TASK_ID", ""),
    }


# --------------------------------------------------------------------------------------------------
# schema checks


def _kind_matches(dataset: h5py.Dataset, kind: str) -> bool:
    dtype = dataset.dtype
    if kind == "str":
        return h5py.check_string_dtype(dtype) is not None or dtype.kind in "SU"
    if kind == "float":
        return dtype.kind == "f"
    if kind == "int":
        return dtype.kind in "iu"
    return dtype.kind == "b"


def schema_problems(h5: h5py.File, schema: Schema) -> list[str]:
    """Every way the datasets of ``h5`` differ from ``schema`` (empty when they match)."""
    problems: list[str] = []
    sizes: dict[str, tuple[int, str]] = {}
    for name, spec in schema.items():
        if name not in h5:
            if spec.required:
                problems.append(f"missing dataset {name!r}")
            continue
        dataset = h5[name]
        if not isinstance(dataset, h5py.Dataset):
            problems.append(f"{name!r} is a group, expected a dataset")
            continue
        if not _kind_matches(dataset, spec.dtype):
            problems.append(f"{name!r} has dtype {dataset.dtype}, expected {spec.dtype}")
        if len(dataset.shape) != len(spec.shape):
            problems.append(f"{name!r} has shape {dataset.shape}, expected {len(spec.shape)} axes {spec.shape}")
            continue
        for axis, (dim, size) in enumerate(zip(spec.shape, dataset.shape)):
            if isinstance(dim, int):
                if size != dim:
                    problems.append(f"{name!r} axis {axis} has size {size}, expected {dim}")
            elif dim in sizes and sizes[dim][0] != size:
                other_size, other = sizes[dim]
                problems.append(f"{name!r} axis {axis} ({dim}) has size {size} but {other!r} has {dim}={other_size}")
            else:
                sizes.setdefault(dim, (size, name))
    return problems


# --------------------------------------------------------------------------------------------------
# reading


class ArtifactReader:
    """An artifact opened read-only, its completeness and schema checked.

    ``reader["embeddings"]`` is the (lazy) ``h5py.Dataset``; slice it in row blocks to stream.
    """

    def __init__(self, path: Path, h5: h5py.File):
        self.path = path
        self.h5 = h5
        self.attrs: dict[str, Any] = {key: _plain(value) for key, value in h5.attrs.items()}
        self.uid: str = str(self.attrs.get("uid", ""))
        self.stage: str = str(self.attrs.get("stage", ""))

    @property
    def config(self) -> dict[str, Any]:
        """The config of the stage that wrote this artifact."""
        import yaml

        return yaml.safe_load(self.attrs.get("config", "")) or {}

    def __getitem__(self, name: str) -> h5py.Dataset:
        try:
            return self.h5[name]
        except KeyError as e:
            raise ArtifactError(f"{self.path}: no dataset {name!r} (has {', '.join(self.names())})") from e

    def __contains__(self, name: str) -> bool:
        return name in self.h5

    def names(self) -> list[str]:
        """Every dataset path in the file."""
        found: list[str] = []
        self.h5.visititems(lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None)
        return found

    def read(self, name: str) -> np.ndarray:
        """Read a whole dataset into memory (strings decoded to ``str``)."""
        dataset = self[name]
        try:
            if h5py.check_string_dtype(dataset.dtype) is not None:
                return dataset.asstr()[()]
            return dataset[()]
        except OSError as e:
            raise ArtifactError(f"{self.path}: dataset {name!r} cannot be read (corrupt file?): {e}") from e

    def close(self) -> None:
        self.h5.close()

    def __enter__(self) -> "ArtifactReader":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _resolve_h5(path: Path) -> Path:
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.glob("*.h5") if ".shard-" not in p.name)
        if len(files) != 1:
            raise ArtifactError(f"{path}: expected one <stage>.h5 in the artifact folder, found {len(files)}")
        return files[0]
    return path


def open_artifact(path: Path | str, schema: Schema | None = None) -> ArtifactReader:
    """Open an artifact (its folder or its ``.h5``) for reading, checking that it is complete.

    Raises
    ------
    ArtifactError
        The file is missing, not HDF5 (truncated or corrupt), incomplete, a shard is missing,
        or its datasets do not match ``schema``. The message names the file.
    """
    h5_path = _resolve_h5(Path(path))
    if not h5_path.exists():
        raise ArtifactError(f"{h5_path}: artifact file does not exist")
    try:
        h5 = h5py.File(h5_path, "r")
    except (OSError, ValueError) as e:
        raise ArtifactError(f"{h5_path}: cannot be opened as HDF5 (truncated or corrupt file?): {e}") from e
    try:
        _check_open_file(h5_path, h5, schema)
    except ArtifactError:
        h5.close()
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        h5.close()
        raise ArtifactError(f"{h5_path}: unreadable HDF5 content (corrupt file?): {e}") from e
    return ArtifactReader(h5_path, h5)


def _check_open_file(h5_path: Path, h5: h5py.File, schema: Schema | None) -> None:
    if not bool(h5.attrs.get("complete", False)):
        raise ArtifactError(f"{h5_path}: artifact is incomplete (no complete=True attribute)")
    for shard in h5.attrs.get("shard_files", []):
        shard_path = h5_path.parent / _plain(shard)
        if not shard_path.exists():
            raise ArtifactError(f"{h5_path}: shard file {shard_path.name} is missing")
    if schema is not None:
        problems = schema_problems(h5, schema)
        if problems:
            raise ArtifactError(
                f"{h5_path}: does not match the {h5.attrs.get('stage', '?')} schema: " + "; ".join(problems)
            )
    # Touch the first and last row of every dataset so that a file cut short in its data
    # fails here, with the file named, rather than deep inside a stage.
    for name in schema or {}:
        if name in h5 and h5[name].shape and h5[name].shape[0] > 0:
            h5[name][0], h5[name][-1]


def is_complete(path: Path | str, schema: Schema | None = None) -> bool:
    """Whether the artifact exists, opens, and matches its schema."""
    try:
        open_artifact(path, schema).close()
    except ArtifactError:
        return False
    return True


# --------------------------------------------------------------------------------------------------
# writing


class ArtifactWriter:
    """Writes one artifact file atomically; the ``out`` argument of a stage's ``run``.

    Use as a context manager through :func:`write_artifact`. Everything is written to
    ``<file>.tmp`` (and side files to ``<name>.tmp``); on success the schema is checked, the file
    is marked complete, fsynced and renamed; on failure the temporary files are removed.
    """

    def __init__(
        self,
        directory: Path,
        stage: str,
        uid: str,
        *,
        schema: Schema,
        shard_index: int = 0,
        num_shards: int = 1,
        seed: int = 0,
        device: str = "cpu",
        logger: logging.Logger | None = None,
        root_attrs: Mapping[str, Any] | None = None,
    ):
        self.dir = Path(directory)
        self.stage = stage
        self.uid = uid
        self.schema = schema
        self.shard_index = shard_index
        self.num_shards = num_shards
        self.seed = seed
        self.device = device
        self.log = logger or log
        self.path = self.dir / h5_name(stage, shard_index, num_shards)
        self.tmp_path = self.path.with_name(self.path.name + ".tmp")
        self.summary: dict[str, Any] = {}
        self._side_files: dict[str, Path] = {}
        self._root_attrs = dict(root_attrs or {})
        self.h5: h5py.File | None = None

    # -- the API stages use -------------------------------------------------------------------------

    @property
    def attrs(self) -> h5py.AttributeManager:
        """Root attributes of the artifact file."""
        return self._file.attrs

    def create_dataset(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: Any,
        *,
        maxshape: tuple | None = None,
        chunks: Any = True,
        fillvalue: Any = None,
        **h5kw: Any,
    ) -> h5py.Dataset:
        """Create a dataset to fill in blocks (2-D float data is chunked by whole rows of ~1 MiB)."""
        if chunks is True and len(shape) == 2 and shape[0] > 0 and shape[1] > 0:
            row_bytes = shape[1] * np.dtype(dtype).itemsize
            chunks = (int(max(1, min(shape[0], (1 << 20) // max(row_bytes, 1)))), shape[1])
        elif chunks is True and (0 in shape or not shape):
            chunks = None
        return self._file.create_dataset(
            name, shape=shape, dtype=dtype, maxshape=maxshape, chunks=chunks, fillvalue=fillvalue, **h5kw
        )

    def write(self, name: str, array: Any, attrs: Mapping[str, Any] | None = None) -> h5py.Dataset:
        """Write a whole array; sequences of ``str`` are stored as UTF-8 strings."""
        values = np.asarray(array)
        if values.dtype.kind in "UO":
            values = np.asarray(values, dtype=object).astype(str).astype(object)
            dataset = self._file.create_dataset(name, data=values, dtype=h5py.string_dtype())
        else:
            dataset = self._file.create_dataset(name, data=values)
        for key, value in (attrs or {}).items():
            dataset.attrs[key] = value
        return dataset

    def progress(self, iterable: Iterable | None = None, total: int | None = None, desc: str | None = None):
        """A tqdm progress bar that updates rarely when stderr is not a terminal (batch logs).

        Iterating it also records the count in :attr:`progress_path` every couple of seconds,
        which ``moespec submit --executor local`` reads to show each running task's progress.
        """
        from tqdm.auto import tqdm

        interactive = sys.stderr.isatty()
        bar = tqdm(
            iterable,
            total=total,
            desc=desc or self.stage,
            mininterval=0.5 if interactive else 30.0,
            disable=None if interactive else False,
            file=sys.stderr,
        )
        return bar if iterable is None else _recorded(bar, self.progress_path)

    @property
    def progress_path(self) -> Path:
        """Where the progress of a running bar is recorded (removed when the bar ends)."""
        suffix = f".shard-{self.shard_index:05d}" if self.num_shards > 1 else ""
        return self.dir / f"progress{suffix}.json"

    @property
    def work_dir(self) -> Path:
        """A folder that survives failed and requeued attempts of this task (checkpoints to resume from).

        Unlike side files it is not cleaned up on failure, so a preempted task can resume; it
        is the stage's job to check that what it finds there belongs to its own config.
        """
        suffix = f".shard-{self.shard_index:05d}" if self.num_shards > 1 else ""
        path = self.dir / f"work{suffix}"
        path.mkdir(parents=True, exist_ok=True)
        return path

    def side_file(self, name: str) -> Path:
        """A temporary path for a side file or folder (checkpoint, plot, HF model); ``dir/name`` at commit."""
        if "/" in name or name.startswith("."):
            raise ValueError(f"side file names are plain file names, got {name!r}")
        final = self.dir / name
        self._side_files[name] = final.with_name(final.name + ".tmp")
        return self._side_files[name]

    # -- lifecycle (used by the runner) -------------------------------------------------------------

    @property
    def _file(self) -> h5py.File:
        if self.h5 is None:
            raise ArtifactError(f"{self.path}: writer is not open")
        return self.h5

    def open(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.h5 = h5py.File(self.tmp_path, "w", libver="latest")
        self.h5.attrs["stage"] = self.stage
        self.h5.attrs["uid"] = self.uid
        self.h5.attrs["shard_index"] = self.shard_index
        self.h5.attrs["num_shards"] = self.num_shards
        self.h5.attrs["start_time"] = now_iso()
        for key, value in {**provenance_attrs(), **self._root_attrs}.items():
            self.h5.attrs[key] = value

    def commit(self) -> None:
        """Check the schema, mark complete, flush, fsync and rename every file into place."""
        h5 = self._file
        problems = schema_problems(h5, self.schema)
        if problems:
            raise ArtifactError(
                f"{self.path}: the {self.stage} stage wrote an artifact that does not match "
                f"its schema: " + "; ".join(problems)
            )
        h5.attrs["end_time"] = now_iso()
        h5.attrs["complete"] = True
        h5.close()
        self.h5 = None
        fsync_path(self.tmp_path)
        for name, tmp in self._side_files.items():
            if not tmp.exists():
                raise ArtifactError(f"{self.dir / name}: side file was requested but never written")
            _fsync_tree(tmp)
            if tmp.is_dir() and (self.dir / name).is_dir():
                shutil.rmtree(self.dir / name)  # a recomputed folder replaces the old one whole (mode force)
            os.replace(tmp, self.dir / name)
        os.replace(self.tmp_path, self.path)

    def abort(self) -> None:
        """Close and remove every temporary file; nothing appears under a final name."""
        if self.h5 is not None:
            with contextlib.suppress(Exception):
                self.h5.close()
            self.h5 = None
        for tmp in [self.tmp_path, *self._side_files.values()]:
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            with contextlib.suppress(FileNotFoundError, IsADirectoryError):
                tmp.unlink()


@contextlib.contextmanager
def write_artifact(writer: ArtifactWriter):
    """Open ``writer``; commit it when the block succeeds, abort it when the block raises."""
    writer.open()
    try:
        yield writer
    except BaseException:
        writer.abort()
        raise
    writer.commit()


# --------------------------------------------------------------------------------------------------
# shards


def shard_paths(directory: Path, stage: str, num_shards: int) -> list[Path]:
    return [Path(directory) / h5_name(stage, i, num_shards) for i in range(num_shards)]


def build_shard_view(directory: Path, stage: str, num_shards: int, schema: Schema) -> bool:
    """Write ``<stage>.h5`` as a virtual dataset over complete shard files; False if shards are missing.

    Row-wise datasets (first axis ``"N"`` in the schema) are concatenated through HDF5 virtual
    datasets, which read the shard files in place (sources are relative file names, so the folder
    can be moved or synced). Other datasets (names tables) are copied from shard 0. Safe to call
    from several shard tasks at once: each writes the same content through its own temporary file.
    """
    directory = Path(directory)
    shards = shard_paths(directory, stage, num_shards)
    if not all(is_complete(p) for p in shards):
        return False
    final = directory / h5_name(stage)
    tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
    readers = [open_artifact(p) for p in shards]
    try:
        with h5py.File(tmp, "w", libver="latest") as view:
            _fill_shard_view(view, readers, schema)
        fsync_path(tmp)
        os.replace(tmp, final)
    finally:
        for reader in readers:
            reader.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return True


def _fill_shard_view(view: h5py.File, readers: list[ArtifactReader], schema: Schema) -> None:
    first = readers[0].h5
    for key, value in first.attrs.items():
        if key not in ("shard_index", "complete", "row_offset"):
            view.attrs[key] = value
    view.attrs["shard_files"] = [r.path.name for r in readers]
    for name in readers[0].names():
        spec = schema.get(name)
        source = first[name]
        rowwise = (
            spec is not None and spec.shape and spec.shape[0] == "N" or (spec is None and name.startswith("layers/"))
        )
        if not rowwise:
            view.create_dataset(name, data=source[()], dtype=source.dtype)
            continue
        total = sum(r.h5[name].shape[0] for r in readers)
        layout = h5py.VirtualLayout(shape=(total, *source.shape[1:]), dtype=source.dtype)
        offset = 0
        for reader in readers:
            shape = reader.h5[name].shape
            layout[offset : offset + shape[0]] = h5py.VirtualSource(reader.path.name, name, shape=shape)
            offset += shape[0]
        fill = np.nan if source.dtype.kind == "f" else None
        view.create_virtual_dataset(name, layout, fillvalue=fill)
    view.attrs["complete"] = True
