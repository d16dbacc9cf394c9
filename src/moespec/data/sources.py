"""Where texts come from: the built-in corpus, a HF ``datasets`` dataset, or local files.

Each source is a pydantic config (a member of the tagged union :data:`Source`, told apart by
``kind``) whose ``load(log)`` returns a :class:`~moespec.data.textset.TextSet`. Importing this
module is cheap: ``datasets`` is imported when a hf or files source is loaded.

A source draws ``n`` texts by a seeded shuffle of its rows (never a head slice: many datasets are
sorted by label or date), skips empty texts (logged), and keeps the drawn rows in their source
order. Each source is one domain (the built-in source: one per built-in domain); its labels are
coded per source, so classes of different datasets never share a code (see ``TextSet``).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import logging
import lzma
import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Sequence, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moespec.data import corpus
from moespec.data.textset import TextSet, concat
from moespec.errors import DataError

_log = logging.getLogger("moespec")


_FORMAT_OF_SUFFIX = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
}
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst", ".zip")
_BUILDER_OF_FORMAT = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}
_PACKAGED_BUILDERS = ("json", "csv", "parquet", "text", "arrow")
#: Bytes of each local file that ``moespec validate`` reads (encoding, first record); a load reads all.
CHECK_BYTES = 8 << 20


def config_relative_path(path: str) -> str:
    """An absolute path: a relative one is taken relative to the current directory.

    The experiment loader has already made the relative paths of a file absolute against the
    file's folder (:func:`moespec.config.resolve_relative_paths`); this covers configs built in
    Python. Paths starting with ``~`` or ``$`` are kept as written and expanded when the files are
    read, so that ``$SCRATCH/texts.jsonl`` means the node's scratch.
    """
    if path.startswith(("~", "$")) or os.path.isabs(path):
        return path
    return os.path.normpath(os.path.join(os.getcwd(), path))


class _SourceConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BuiltinSource(_SourceConfig):
    """The built-in multi-domain corpus (:mod:`moespec.data.corpus`), generated in code.

    Attributes
    ----------
    n_per_domain : int
        Texts per domain.
    domains : list of str, optional
        A subset of the built-in domains (default: all six).
    seed : int
        Corpus seed.
    """

    kind: Literal["builtin"] = "builtin"
    n_per_domain: int = Field(100, ge=1)
    domains: Optional[list[str]] = None
    seed: int = 0

    @field_validator("domains")
    @classmethod
    def _known_domains(cls, value: Optional[list[str]]) -> Optional[list[str]]:
        if value is None:
            return value
        unknown = [d for d in value if d not in corpus.DOMAIN_NAMES]
        if unknown:
            raise ValueError(f"unknown built-in domain(s) {unknown}; choose from {', '.join(corpus.DOMAIN_NAMES)}")
        if len(set(value)) != len(value) or not value:
            raise ValueError("must list each built-in domain at most once, and at least one")
        return value

    def domain_names(self) -> list[str]:
        return list(self.domains or corpus.DOMAIN_NAMES)

    def load(self, log: logging.Logger = _log) -> TextSet:
        parts = []
        for name in self.domain_names():
            texts, labels = corpus.generate_domain(name, self.n_per_domain, self.seed)
            provenance = {
                "kind": "builtin",
                "domain": name,
                "n_per_domain": self.n_per_domain,
                "seed": self.seed,
                "corpus_version": corpus.CORPUS_VERSION,
            }
            parts.append(
                TextSet.single_domain(
                    name, texts, range(len(texts)), labels, list(corpus.domain_by_name(name).classes), provenance
                )
            )
        log.info("built-in corpus: %d domains x %d texts (seed %d)", len(parts), self.n_per_domain, self.seed)
        return concat(parts)


class _TableSource(_SourceConfig):
    """Fields shared by sources read through ``datasets`` tables."""

    text_field: Union[str, list[str]] = "text"
    #: Joins the fields when ``text_field`` lists several (e.g. premise and hypothesis).
    separator: str = "\n"
    label_field: Optional[str] = None
    domain: Optional[str] = None
    #: A column naming each row's domain, so that one file or dataset holds several domains.
    domain_field: Optional[str] = None
    n: Optional[int] = Field(None, ge=1)
    seed: int = 0

    @field_validator("text_field")
    @classmethod
    def _some_field(cls, value: Union[str, list[str]]) -> Union[str, list[str]]:
        if isinstance(value, list) and not value:
            raise ValueError("must name at least one field")
        return value

    @model_validator(mode="after")
    def _domain_or_domain_field(self) -> "_TableSource":
        if self.domain is not None and self.domain_field is not None:
            raise ValueError(
                "domain_field: give domain (one name for every row) or domain_field (a column naming "
                "each row's domain), not both"
            )
        return self

    def fields(self) -> list[str]:
        """Every column the source reads: text, label and domain fields."""
        return [*self.text_fields(), *(f for f in (self.label_field, self.domain_field) if f is not None)]

    def text_fields(self) -> list[str]:
        return [self.text_field] if isinstance(self.text_field, str) else list(self.text_field)

    def _texts(self, dataset: Any, where: str, log: logging.Logger, provenance: dict[str, Any]) -> TextSet:
        return texts_from_dataset(
            dataset,
            where=where,
            domain=self.domain_name(),
            text_fields=self.text_fields(),
            separator=self.separator,
            label_field=self.label_field,
            n=self.n,
            seed=self.seed,
            provenance=provenance,
            log=log,
            domain_field=self.domain_field,
        )

    def domain_name(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError


class HFSource(_TableSource):
    """A dataset from the Hugging Face hub (or its local cache), through ``datasets.load_dataset``.

    Attributes
    ----------
    name : str
        Dataset name on the hub (``"stanfordnlp/imdb"``) or a local dataset folder.
    config : str, optional
        Dataset configuration (``"sst2"`` of ``"nyu-mll/glue"``).
    split : str
        Split, with ``datasets`` slicing syntax if wanted (``"train"``, ``"test[:50%]"``).
    revision : str, optional
        Git revision of the dataset repository.
    text_field : str or list of str
        Column(s) holding the text; several are joined with ``separator``.
    label_field : str, optional
        Column holding the class label (ClassLabel, int, bool or str).
    domain : str, optional
        Domain name of every row (default: ``name``).
    domain_field : str, optional
        Column naming each row's domain instead (one source, several domains; not with ``domain``).
    n : int, optional
        Texts to draw by a seeded shuffle, from all domains together (default: every row).
    seed : int
        Seed of the shuffle.
    """

    kind: Literal["hf"] = "hf"
    name: str
    config: Optional[str] = None
    split: str = "train"
    revision: Optional[str] = None

    def domain_name(self) -> str:
        return self.domain or self.name

    def check(self, max_bytes: Optional[int] = None) -> list[tuple[str, str]]:
        """``[("name", problem)]`` when the dataset is neither a local folder, nor cached, nor on a reachable hub."""
        from moespec.hub import availability_problem

        if Path(self.name).expanduser().is_dir() or self.name in _PACKAGED_BUILDERS:
            return []
        problem = availability_problem(self.name, "dataset", self.revision)
        return [("name", problem)] if problem else []

    def load(self, log: logging.Logger = _log) -> TextSet:
        import datasets

        where = f"hf:{self.name}" + (f"/{self.config}" if self.config else "") + f" (split {self.split})"
        unavailable = self.check()  # at once, instead of a minute of network retries on an offline node
        if unavailable:
            raise DataError(f"source {where}: {unavailable[0][1]}")
        try:
            dataset = datasets.load_dataset(self.name, self.config, split=self.split, revision=self.revision)
        except (OSError, ValueError, KeyError, datasets.exceptions.DatasetsError) as e:
            raise DataError(
                f"source {where}: cannot load dataset {self.name!r} "
                f"({type(e).__name__}: {_first_line(e)}). {_offline_hint()}"
            ) from e
        provenance = {
            "kind": "hf",
            "name": self.name,
            "config": self.config,
            "split": self.split,
            "revision": self.revision,
            "fingerprint": getattr(dataset, "_fingerprint", ""),
        }
        return self._texts(dataset, where, log, provenance)


class FilesSource(_TableSource):
    """Local jsonl, csv (or tsv) or parquet files, read through ``datasets.load_dataset``.

    Attributes
    ----------
    paths : list of str
        Files, all of one format. A relative path is taken relative to the experiment file's
        folder when the file is loaded; ``~`` and ``$VARS`` are expanded when the files are read,
        so ``$SCRATCH/texts.jsonl`` works on a cluster.
    format : {"auto", "jsonl", "csv", "parquet"}
        ``auto`` reads it from the file suffix (``.jsonl``/``.json``, ``.csv``/``.tsv``, ``.parquet``,
        optionally compressed, ``.jsonl.gz``).
    text_field : str or list of str
        Field(s) (jsonl keys, csv columns) holding the text; several are joined with ``separator``
        (default ``"\\n"``).
    label_field : str, optional
        Field holding the class label (int, bool or str).
    domain : str, optional
        Domain name of every row (default: the first file's name without its suffixes).
    domain_field : str, optional
        Field naming each row's domain instead (one file, several domains; not with ``domain``).
    n, seed
        As for :class:`HFSource`.
    """

    kind: Literal["files"] = "files"
    paths: list[str] = Field(min_length=1)
    format: Literal["auto", "jsonl", "csv", "parquet"] = "auto"

    @field_validator("paths", mode="before")
    @classmethod
    def _one_path(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("paths")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        return [config_relative_path(p) for p in value]

    @model_validator(mode="after")
    def _one_format(self) -> "FilesSource":
        if self.format == "auto":
            formats = {_format_of(p) for p in self.paths}
            if len(formats) > 1:
                raise ValueError(f"paths mix formats {sorted(formats)}; give one format per source")
        return self

    def resolved_format(self) -> str:
        return self.format if self.format != "auto" else _format_of(self.paths[0])

    def domain_name(self) -> str:
        return self.domain or _stem(self.paths[0])

    def local_paths(self) -> list[str]:
        """The paths with ``~`` and ``$VARS`` expanded (as they are read on this machine)."""
        return [os.path.expandvars(os.path.expanduser(p)) for p in self.paths]

    def check(self, max_bytes: Optional[int] = CHECK_BYTES) -> list[tuple[str, str]]:
        """Problems found without loading: ``(sub-key, message)`` pairs, empty when the files look usable.

        Each file must exist, be readable and non-empty, be UTF-8 text (jsonl, csv) and hold the
        named fields in its first record or header; only the first ``max_bytes`` of each file are
        read (None: all of it).
        """
        problems = []
        for index, path in enumerate(self.local_paths()):
            problem = check_file(path, self.resolved_format(), self.fields(), max_bytes)
            if problem:
                problems.append((f"paths[{index}]", problem))
        return problems

    def load(self, log: logging.Logger = _log) -> TextSet:
        import datasets

        paths = self.local_paths()
        where = f"files:{paths[0]}" + (f" (+{len(paths) - 1} more)" if len(paths) > 1 else "")
        problems = self.check(max_bytes=None)
        if problems:
            raise DataError("source files: " + "; ".join(message for _, message in problems))
        fmt = self.resolved_format()
        extra = {"delimiter": "\t"} if fmt == "csv" and _stem_suffix(paths[0]) == ".tsv" else {}
        try:
            dataset = datasets.load_dataset(_BUILDER_OF_FORMAT[fmt], data_files=paths, split="train", **extra)
        except Exception as e:  # noqa: BLE001 - datasets raises many kinds (StopIteration on an empty file)
            raise DataError(f"source {where}: cannot read the {fmt} file(s) ({_root_cause(e)})") from e
        provenance = {
            "kind": "files",
            "paths": list(self.paths),
            "format": fmt,
            "files": [{"path": p, "bytes": os.path.getsize(p), "mtime": int(os.path.getmtime(p))} for p in paths],
            "fingerprint": getattr(dataset, "_fingerprint", ""),
        }
        return self._texts(dataset, where, log, provenance)


#: One entry of ``embed.data``: a tagged union on ``kind``.
Source = Annotated[Union[BuiltinSource, HFSource, FilesSource], Field(discriminator="kind")]


def source_domains(source: BuiltinSource | HFSource | FilesSource) -> list[str]:
    """The domain names a source contributes, as far as its config tells (none for a ``domain_field``)."""
    if isinstance(source, BuiltinSource):
        return source.domain_names()
    return [] if source.domain_field is not None else [source.domain_name()]


def load_texts(sources: Sequence[BuiltinSource | HFSource | FilesSource], log: logging.Logger = _log) -> TextSet:
    """Load every source, in order, into one text set with global domain and label codes.

    Raises
    ------
    DataError
        A source cannot be read, lacks a field, is empty, or two sources share a domain name.
    """
    if not sources:
        raise DataError("no text sources: embed.data is empty")
    return concat([source.load(log) for source in sources])


# --------------------------------------------------------------------------------------------------
# reading a datasets.Dataset


def texts_from_dataset(
    dataset: Any,
    *,
    where: str,
    domain: str,
    text_fields: list[str],
    separator: str,
    label_field: Optional[str],
    n: Optional[int],
    seed: int,
    provenance: dict[str, Any],
    log: logging.Logger = _log,
    domain_field: Optional[str] = None,
) -> TextSet:
    """Draw the texts (and labels) of one domain from a ``datasets.Dataset``.

    Parameters
    ----------
    dataset : datasets.Dataset
    where : str
        Names the source in messages.
    domain : str
    text_fields : list of str
        Columns joined with ``separator`` into the text.
    label_field : str, optional
    n : int, optional
        Texts to draw by a seeded shuffle; None takes every non-empty row.
    seed : int
    provenance : dict
        Updated with the rows available, drawn and skipped.
    domain_field : str, optional
        A column naming each row's domain: the drawn rows are split into one domain per value
        (sorted by name), each with its own classes; ``domain`` is then unused.

    Raises
    ------
    DataError
        A field is missing or not text, the dataset is empty, or it has fewer than ``n`` non-empty texts.
    """
    _check_fields(dataset, where, text_fields, label_field, domain_field)
    if len(dataset) == 0:
        raise DataError(f"source {where}: the dataset is empty (0 rows)")
    rows, texts, n_empty = _draw_rows(dataset, text_fields, separator, n, seed)
    if n_empty:
        log.warning("source %s: skipped %d empty text(s) in field(s) %s", where, n_empty, text_fields)
    if not rows.size:
        raise DataError(f"source {where}: every text in field(s) {text_fields} is empty")
    if n is not None and rows.size < n:
        raise DataError(
            f"source {where}: asks for n={n} texts but the dataset has only {rows.size} non-empty "
            f"text(s) in field(s) {text_fields}"
        )
    labels, class_names = (None, []) if label_field is None else _labels(dataset, rows, label_field, where)
    provenance = {
        **provenance,
        "domain": domain,
        "rows_available": len(dataset),
        "rows_drawn": int(rows.size),
        "empty_skipped": n_empty,
        "n": n,
        "seed": seed,
        "text_fields": text_fields,
        "label_field": label_field,
        "domain_field": domain_field,
    }
    if domain_field is not None:
        return _split_domains(dataset, rows, texts, labels, class_names, domain_field, where, provenance, log)
    log.info(
        "source %s: %d texts of %d rows (domain %s%s)",
        where,
        rows.size,
        len(dataset),
        domain,
        f", {len(class_names)} classes" if label_field else ", unlabelled",
    )
    return TextSet.single_domain(domain, texts, rows.tolist(), labels, class_names, provenance)


def _split_domains(
    dataset: Any,
    rows: np.ndarray,
    texts: list[str],
    labels: Optional[np.ndarray],
    class_names: list[str],
    domain_field: str,
    where: str,
    provenance: dict[str, Any],
    log: logging.Logger,
) -> TextSet:
    """One single-domain text set per value of ``domain_field`` among the drawn rows, concatenated.

    Each domain keeps only the classes its rows have, so that every label belongs to one domain
    (:class:`TextSet`'s rule): the class "positive" of two domains gets two codes.
    """
    values = list(dataset.select(rows.tolist())[domain_field])
    blank = [int(row) for row, value in zip(rows.tolist(), values) if value is None or not str(value).strip()]
    if blank:
        raise DataError(
            f"source {where}: domain field {domain_field!r} is empty in {len(blank)} row(s), e.g. row(s) {blank[:5]}"
        )
    names = np.array([str(value) for value in values], dtype=object)
    parts = []
    for name in sorted(set(names.tolist())):
        where_name = np.flatnonzero(names == name)
        part_labels, part_classes = None, []
        if labels is not None:
            used = sorted({int(code) for code in labels[where_name] if code >= 0})
            recode = {code: i for i, code in enumerate(used)}
            part_labels = np.array([recode.get(int(code), -1) for code in labels[where_name]], dtype=np.int64)
            part_classes = [class_names[code] for code in used]
        parts.append(
            TextSet.single_domain(
                name,
                [texts[i] for i in where_name],
                rows[where_name].tolist(),
                part_labels,
                part_classes,
                {**provenance, "domain": name, "rows_drawn": int(where_name.size)},
            )
        )
    log.info(
        "source %s: %d texts of %d rows in %d domains from field %r (%s)",
        where,
        rows.size,
        len(dataset),
        len(parts),
        domain_field,
        ", ".join(f"{p.domain_names[0]} {len(p)}" for p in parts),
    )
    return concat(parts)


def _check_fields(
    dataset: Any, where: str, text_fields: list[str], label_field: Optional[str], domain_field: Optional[str] = None
) -> None:
    import datasets

    columns = list(dataset.column_names)
    named = [
        *(("text", f) for f in text_fields),
        *([("label", label_field)] if label_field else []),
        *([("domain", domain_field)] if domain_field else []),
    ]
    for role, field in named:
        if field not in columns:
            raise DataError(f"source {where}: {role} field {field!r} not found; the columns are {columns}")
    for field in text_fields:
        feature = dataset.features[field]
        if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
            raise DataError(f"source {where}: text field {field!r} holds {feature}, not strings")


def _draw_rows(
    dataset: Any, text_fields: list[str], separator: str, n: Optional[int], seed: int
) -> tuple[np.ndarray, list[str], int]:
    """Rows drawn in seeded-shuffle order, skipping empty texts, returned in source order.

    Reads only as many rows as needed (blocks of the permutation), not the whole column.
    """
    order = np.arange(len(dataset)) if n is None else np.random.default_rng(seed).permutation(len(dataset))
    wanted = len(dataset) if n is None else n
    kept: dict[int, str] = {}
    n_empty = 0
    start = 0
    while len(kept) < wanted and start < len(order):
        block = order[start : start + max(wanted - len(kept), 256)]
        start += len(block)
        texts_of = dict(zip(np.sort(block).tolist(), _read_texts(dataset, np.sort(block), text_fields, separator)))
        for row in block.tolist():  # permutation order decides which rows make the first n
            if len(kept) == wanted:
                break
            if texts_of[row].strip():
                kept[row] = texts_of[row]
            else:
                n_empty += 1
    rows = np.array(sorted(kept), dtype=np.int64)
    return rows, [kept[r] for r in rows.tolist()], n_empty


def _read_texts(dataset: Any, rows: np.ndarray, text_fields: list[str], separator: str) -> list[str]:
    subset = dataset.select(rows.tolist())
    columns = [list(subset[field]) for field in text_fields]
    return [separator.join(v for v in values if v) for values in zip(*columns)]


def _labels(dataset: Any, rows: np.ndarray, label_field: str, where: str) -> tuple[np.ndarray, list[str]]:
    """Label codes of the drawn rows (-1 when missing) and the class names they index."""
    import datasets

    feature = dataset.features[label_field]
    values = list(dataset.select(rows.tolist())[label_field])
    if isinstance(feature, datasets.ClassLabel):
        # ClassLabel uses -1 for "no label" (e.g. GLUE test splits).
        return np.array([-1 if v is None else v for v in values], dtype=np.int64), list(feature.names)
    if not isinstance(feature, datasets.Value) or feature.dtype.startswith(("float", "double", "half")):
        raise DataError(
            f"source {where}: label field {label_field!r} holds {feature}; expected class labels "
            f"(ClassLabel, int, bool or string)"
        )
    present = sorted({v for v in values if v is not None}, key=lambda v: (str(type(v)), v))
    code_of = {v: i for i, v in enumerate(present)}
    return np.array([-1 if v is None else code_of[v] for v in values], dtype=np.int64), [str(v) for v in present]


# --------------------------------------------------------------------------------------------------
# checking local files before reading them


_OPENERS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def check_file(path: str, fmt: str, fields: list[str], max_bytes: Optional[int] = CHECK_BYTES) -> Optional[str]:
    """The first problem of a local data file that shows without loading it, or None.

    Parameters
    ----------
    path : str
        With ``~`` and ``$VARS`` expanded.
    fmt : {"jsonl", "csv", "parquet"}
    fields : list of str
        Fields the first record (jsonl) or the header (csv) or the schema (parquet) must have.
    max_bytes : int, optional
        Bytes of a text file to read (the encoding is checked that far); None reads all of it.
    """
    file = Path(path)
    if "$" in path:
        return f"{path}: the environment variable in this path is not set"
    if not file.is_file():
        return f"{path}: {'not a file' if file.exists() else 'file not found'}"
    if not os.access(file, os.R_OK):
        return f"{path}: not readable (permissions)"
    if file.stat().st_size == 0:
        return f"{path}: the file is empty"
    if fmt == "parquet":
        return _check_parquet(file, fields)
    suffix = file.suffix.lower()
    if suffix in _COMPRESSION_SUFFIXES and suffix not in _OPENERS:
        return None  # .zst / .zip: datasets reads them, Python's standard library cannot
    delimiter = "\t" if _stem_suffix(path) == ".tsv" else ","
    try:
        with (_OPENERS.get(suffix) or open)(file, "rb") as stream:
            return _check_text(path, stream, fmt, fields, max_bytes, delimiter)
    except (OSError, EOFError) as e:
        return f"{path}: cannot read it ({type(e).__name__}: {_first_line(e)})"


def _check_text(
    path: str, stream: Any, fmt: str, fields: list[str], max_bytes: Optional[int], delimiter: str
) -> Optional[str]:
    """Decode lines as UTF-8 (naming the first bad line) and check the first record or header."""
    read, records, columns = 0, 0, None
    for number, raw in enumerate(stream, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return (
                f"{path} line {number}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                f"save the file as UTF-8"
            )
        read += len(raw)
        if line.strip():
            if columns is None:
                columns, problem = _first_record(path, number, line, fmt, delimiter)
                if problem:
                    return problem
                missing = [f for f in fields if f not in columns]
                if missing:
                    what = "the first record" if fmt == "jsonl" else "the header"
                    return f"{path} line {number}: no field(s) {missing} in {what}; its fields are {columns}"
            records += 1
        if max_bytes is not None and read >= max_bytes:
            return None
    needed = 1 if fmt == "jsonl" else 2
    if records < needed:
        return f"{path}: has no records" + (" (only blank lines)" if fmt == "jsonl" else ", only a header")
    return None


def _first_record(path: str, number: int, line: str, fmt: str, delimiter: str) -> tuple[list[str], Optional[str]]:
    """The field names of a jsonl record or csv header line, or a problem."""
    if fmt != "jsonl":
        return next(csv.reader([line], delimiter=delimiter)), None
    try:
        record = json.loads(line)
    except ValueError as e:
        return [], f"{path} line {number}: not JSON ({_first_line(e)})"
    if not isinstance(record, dict):
        return [], f"{path} line {number}: a JSON {type(record).__name__}, not an object of fields"
    return list(record), None


def _check_parquet(file: Path, fields: list[str]) -> Optional[str]:
    import pyarrow.parquet as pq

    try:
        metadata = pq.read_metadata(file)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several kinds for a file that is not parquet
        return f"{file}: not a parquet file ({type(e).__name__}: {_first_line(e)})"
    columns = list(metadata.schema.names)
    missing = [f for f in fields if f not in columns]
    if missing:
        return f"{file}: no column(s) {missing}; the columns are {columns}"
    return None if metadata.num_rows else f"{file}: has no rows"


# --------------------------------------------------------------------------------------------------
# file names


def _stem_suffix(path: str) -> str:
    suffixes = [s.lower() for s in Path(path).suffixes]
    while suffixes and suffixes[-1] in _COMPRESSION_SUFFIXES:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def _format_of(path: str) -> str:
    suffix = _stem_suffix(path)
    if suffix not in _FORMAT_OF_SUFFIX:
        raise ValueError(
            f"cannot tell the format of {path!r} from its suffix {suffix!r}; set format: jsonl, csv or parquet"
        )
    return _FORMAT_OF_SUFFIX[suffix]


def _stem(path: str) -> str:
    name = Path(path).name
    return name.split(".")[0] or name


def _offline_hint() -> str:
    """What to do when a hub dataset cannot be loaded, said once and only where it applies."""
    from moespec.hub import offline

    if offline() or os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        return "Offline mode is set: load it once on a machine with internet into the same HF_HOME (see hpc/README.md)."
    return (
        "If this machine has no internet, load it once on one that has into the same HF_HOME and run with "
        "HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 (see hpc/README.md)."
    )


def _root_cause(error: BaseException) -> str:
    """``Type: first line`` of an error and, when it wraps another, of the innermost one."""
    root = error
    for _ in range(20):  # a chain, not a cycle: bounded all the same
        inner = root.__cause__ or root.__context__
        if inner is None:
            break
        root = inner
    text = f"{type(error).__name__}: {_first_line(error)}"
    return text if root is error else f"{text}; cause: {type(root).__name__}: {_first_line(root)}"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
