"""The embed stage: texts (or a model's token vocabulary) -> one embedding per row, in HDF5.

Two modes:

``texts`` (default)
    Texts from the sources in ``data`` (built-in corpus, HF datasets, local files; see
    :mod:`moespec.data`), embedded by ``model`` with length-sorted batches and padding-aware
    pooling (:mod:`moespec.embedding.encoder`).
``token_embeddings``
    The model's input embedding matrix, one row per vocabulary entry (``text_id`` = the token
    string). ``data``, ``pooling``, ``layer``, ``max_length``, ``batch_size`` and
    ``sort_by_length`` do not apply and may not be set.

Layers: ``layer`` indexes the model's ``hidden_states`` (0 = embedding output, ``i`` = after block
``i``, -1 = last layer). Given a list, ``embeddings`` holds the *first* listed layer and every
listed layer is also stored as ``layers/<index as written>`` (``layers/-1``, ``layers/2``); the
absolute indices are in the ``layer_indices`` attribute.

Output (rows in the deterministic order of the sources; each shard holds a contiguous slice and
the runner presents the shards as one virtual dataset):

==================  ===================  ==================================================
dataset             shape, dtype         meaning
==================  ===================  ==================================================
embeddings          (N, D) float32/16    pooled embedding of each text (token row)
layers/<i>          (N, D)               every listed layer, when ``layer`` is a list
domain              (N,) int64           index into ``domain_names`` (global across sources)
domain_names        (n_domains,) str
label               (N,) int64           index into ``label_names``; -1 = unlabelled
label_names         (n_labels,) str      ``"<domain>/<class>"``: classes of different sources
                                         never share a code
label_domain        (n_labels,) int64    domain of each label
text_id             (N,) str             ``"<domain>/<row in source>"``, or the token string
token_id            (N,) int64           token-embedding mode only
==================  ===================  ==================================================

Attributes: model name/revision/commit/class, compute ``dtype``, ``storage_dtype``, ``mode``,
``pooling``, ``layers``, ``layer_indices``, ``max_length``, ``batch_size``, ``padding_side``,
``row_offset`` and ``n_total`` (this shard's first global row, total rows), ``sources`` (JSON
provenance of each source). Summary: ``n_texts``, ``dim``, ``tokens``, ``tokens_per_s``,
``pad_efficiency``, ``n_truncated``, ``seconds``.

This module imports neither torch nor ``datasets`` at import time: validating a config is cheap.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moespec.artifacts import ArtifactReader, ArtifactWriter, DatasetSpec
from moespec.data.sources import BuiltinSource, Source, load_texts, source_domains
from moespec.data.textset import shard_bounds
from moespec.errors import DataError
from moespec.stages.base import StageConfig

NAME = "embed"
SCHEMA_VERSION = 1

#: Memory for one window of pooled rows (per run, whatever N): rows = this / (D * 4 bytes * layers).
WINDOW_BYTES = 128 << 20
#: Rows of the token-embedding matrix read per block in token mode.
TOKEN_BLOCK_BYTES = 16 << 20
_TEXT_ONLY_FIELDS = ("data", "pooling", "layer", "max_length", "batch_size", "sort_by_length")


class ModelConfig(BaseModel):
    """Which model embeds, and how it is run.

    Attributes
    ----------
    name : str
        ``builtin:tiny-bert`` (default), ``builtin:tiny-llama``, a hub name or a local folder (``./x`` and
        ``../x`` are relative to the experiment file).
    revision : str, optional
        Branch, tag or commit of a hub model (pin a commit for reproducible runs).
    trust_remote_code : bool
        Run the model repository's own code (off: it is arbitrary code).
    dtype : {"auto", "float32", "bfloat16", "float16"}
        Compute dtype; ``auto`` = bfloat16 on CUDA, float32 on CPU. Pooling is always float32.
    device : {"auto", "cpu", "cuda"}
        ``auto`` = CUDA when available (and allowed by ``MOESPEC_DEVICE``), else CPU.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = "builtin:tiny-bert"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    @field_validator("name")
    @classmethod
    def _known_builtin(cls, value: str) -> str:
        from moespec.embedding.builtin import BUILTIN_MODELS, is_builtin

        if is_builtin(value) and value not in BUILTIN_MODELS:
            raise ValueError(f"unknown built-in model; built-in models are {', '.join(BUILTIN_MODELS)}")
        return value

    @model_validator(mode="after")
    def _builtin_has_no_revision(self) -> "ModelConfig":
        if self.name.startswith("builtin:") and self.revision:
            raise ValueError(f"built-in model {self.name} has no revisions; remove revision")
        return self

    def load(self, default_device: str, log: logging.Logger) -> Any:
        """Load the model and tokenizer (:class:`moespec.embedding.loading.LoadedModel`)."""
        from moespec.embedding.loading import load_model, resolve_device

        device = resolve_device(self.device, default_device)
        return load_model(
            self.name,
            revision=self.revision,
            trust_remote_code=self.trust_remote_code,
            dtype=self.dtype,
            device=device,
            log=log,
        )


class Config(StageConfig):
    """The ``embed`` section of an experiment (see the module docstring for what it writes).

    Attributes
    ----------
    model : ModelConfig
    mode : {"texts", "token_embeddings"}
    data : list of Source
        Text sources, ``{kind: builtin | hf | files, ...}``; each contributes its own domain(s).
    pooling : {"mean", "cls", "last"}
        Masked mean (encoders), first real token, last real token (decoders).
    layer : int or list of int
        Index into ``hidden_states``; a list stores each listed layer (see module docstring).
    max_length : int
        Tokens per text (longer texts are truncated; the count is in the summary).
    batch_size : int
    sort_by_length : bool
        Length-sorted batches (same output, several times faster); False for the naive order.
    shards : int
        Contiguous row slices processed by separate tasks (a SLURM array).
    storage_dtype : {"float32", "float16"}
        float16 halves the file, relative row error ~2e-4 (docs/performance.md, "HDF5 storage").
    """

    model: ModelConfig = ModelConfig()
    mode: Literal["texts", "token_embeddings"] = "texts"
    data: list[Source] = Field(default_factory=lambda: [BuiltinSource()])
    pooling: Literal["mean", "cls", "last"] = "mean"
    layer: Union[int, list[int]] = -1
    max_length: int = Field(128, ge=1)
    batch_size: int = Field(32, ge=1)
    sort_by_length: bool = True
    shards: int = Field(1, ge=1)
    storage_dtype: Literal["float32", "float16"] = "float32"

    def num_shards(self) -> int:
        return self.shards

    @field_validator("layer")
    @classmethod
    def _layer_list(cls, value: Union[int, list[int]]) -> Union[int, list[int]]:
        if isinstance(value, list) and (not value or len(set(value)) != len(value)):
            raise ValueError("a list of layers must be non-empty and list each layer once")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        if self.mode == "token_embeddings":
            given = [f for f in _TEXT_ONLY_FIELDS if f in self.model_fields_set]
            if given:
                raise ValueError(f"mode token_embeddings exports the vocabulary matrix; remove {', '.join(given)}")
            return self
        if not self.data:
            raise ValueError("data: give at least one text source (e.g. [{kind: builtin}])")
        domains = [d for source in self.data for d in source_domains(source)]
        repeated = sorted({d for d in domains if domains.count(d) > 1})
        if repeated:
            raise ValueError(
                f"data: domain(s) {repeated} come from more than one source; give each source its "
                f"own 'domain' (text ids and labels would collide)"
            )
        return self

    @property
    def layers(self) -> list[int]:
        """The requested layers as a list (first = the one stored as ``embeddings``)."""
        return [self.layer] if isinstance(self.layer, int) else list(self.layer)


def inputs(cfg: Config) -> dict[str, str]:
    """embed reads no upstream artifact."""
    return {}


#: Per-row metadata and its names tables: written here, carried unchanged by later stages (reduce).
ROW_METADATA: dict[str, DatasetSpec] = {
    "domain": DatasetSpec(("N",), "int"),
    "domain_names": DatasetSpec(("n_domains",), "str"),
    "label": DatasetSpec(("N",), "int"),
    "label_names": DatasetSpec(("n_labels",), "str"),
    "label_domain": DatasetSpec(("n_labels",), "int"),
    "text_id": DatasetSpec(("N",), "str"),
}


def schema(cfg: Config) -> dict[str, DatasetSpec]:
    spec = {"embeddings": DatasetSpec(("N", "D"), "float"), **ROW_METADATA}
    if cfg.mode == "token_embeddings":
        spec["token_id"] = DatasetSpec(("N",), "int")
    elif isinstance(cfg.layer, list):
        spec.update({_layer_name(layer): DatasetSpec(("N", "D"), "float") for layer in cfg.layer})
    return spec


def run(cfg: Config, inputs: dict[str, ArtifactReader], out: ArtifactWriter) -> None:
    """Embed this shard's rows and write them, their metadata and the summary through ``out``."""
    loaded = cfg.model.load(out.device, out.log)
    _write_model_attrs(cfg, loaded, out)
    if cfg.mode == "token_embeddings":
        _embed_tokens(cfg, loaded, out)
    else:
        _embed_texts(cfg, loaded, out)


# --------------------------------------------------------------------------------------------------
# texts


def _embed_texts(cfg: Config, loaded: Any, out: Any) -> None:
    from moespec.embedding.encoder import TextEncoder

    texts = load_texts(cfg.data, out.log)
    start, stop = _shard_rows(len(texts), out)
    shard = texts.rows(start, stop)
    encoder = TextEncoder(
        loaded.model,
        loaded.tokenizer,
        pooling=cfg.pooling,
        layers=cfg.layers,
        max_length=cfg.max_length,
        batch_size=cfg.batch_size,
        device=loaded.device,
        name=cfg.model.name,
    )
    started = time.perf_counter()
    real, padded, n_truncated = _stream_embeddings(cfg, encoder, shard, out)
    seconds = time.perf_counter() - started
    _write_rows(
        out, shard.domain, shard.domain_names, shard.label, shard.label_names, shard.label_domain, shard.text_id
    )
    out.attrs["layer_indices"] = np.asarray(encoder.layer_indices, dtype=np.int64)
    out.attrs["sources"] = json.dumps(texts.sources, sort_keys=True, default=str)
    out.attrs["row_offset"], out.attrs["n_total"] = start, len(texts)
    out.summary.update(
        n_texts=len(shard),
        dim=encoder.dim,
        tokens=real,
        tokens_per_s=round(real / seconds, 1),
        pad_efficiency=round(real / max(padded, 1), 4),
        n_truncated=n_truncated,
        seconds=round(seconds, 2),
    )
    out.log.info(
        "embedded %d texts (rows %d:%d of %d): %d real tokens in %.1f s (%.0f tokens/s), pad efficiency %.2f",
        len(shard),
        start,
        stop,
        len(texts),
        real,
        seconds,
        real / seconds,
        real / max(padded, 1),
    )


def _stream_embeddings(cfg: Config, encoder: Any, shard: Any, out: Any) -> tuple[int, int, int]:
    """Embed ``shard`` window by window into the HDF5 datasets; returns (real tokens, padded tokens, truncated)."""
    from moespec.embedding.encoder import plan_batches

    lengths = encoder.token_lengths(shard.texts)  # only the lengths are kept; batches are re-tokenised
    _check_lengths(lengths, shard.text_id, cfg.model.name)
    n_truncated = int((lengths > cfg.max_length).sum())
    datasets = _create_embedding_datasets(cfg, out, len(shard), encoder.dim)
    window = _window_rows(encoder.dim, len(cfg.layers), datasets["embeddings"].chunks[0])
    plan = plan_batches(
        np.minimum(lengths, cfg.max_length), cfg.batch_size, sort_by_length=cfg.sort_by_length, window_rows=window
    )
    out.log.info(
        "embedding %d texts into D=%d: %d batches of %d in %d window(s); %d text(s) truncated at %d tokens",
        len(shard),
        encoder.dim,
        len(plan.batches),
        cfg.batch_size,
        len(plan.windows),
        n_truncated,
        cfg.max_length,
    )
    real = padded = 0
    progress = lambda batches, total: out.progress(batches, total=total, desc="embed batches")  # noqa: E731
    for block in encoder.iter_windows(shard.texts, plan, progress=progress, text_ids=shard.text_id):
        for layer, values in block.embeddings.items():
            stored = _to_storage(values, cfg.storage_dtype, shard.text_id[block.start : block.stop])
            for name in _names_of_layer(cfg, layer):
                datasets[name][block.start : block.stop] = stored  # whole chunks, in row order
        real, padded = real + block.real_tokens, padded + block.padded_tokens
    return real, padded, n_truncated


def _check_lengths(lengths: np.ndarray, text_ids: list[str], model: str) -> None:
    empty = np.flatnonzero(lengths == 0)
    if empty.size:
        names = [text_ids[i] for i in empty[:5]]
        raise DataError(f"{empty.size} text(s) tokenise to zero tokens with {model!r} (nothing to pool), e.g. {names}")


def _window_rows(dim: int, n_layers: int, chunk_rows: int) -> int:
    """Rows per window: a multiple of the HDF5 chunk rows (whole-chunk writes) within WINDOW_BYTES."""
    budget = WINDOW_BYTES // (dim * 4 * n_layers)
    return max(chunk_rows, budget // chunk_rows * chunk_rows)


# --------------------------------------------------------------------------------------------------
# token embeddings


def _embed_tokens(cfg: Config, loaded: Any, out: Any) -> None:
    from moespec.embedding.tokens import embedding_matrix, iter_token_blocks, token_strings

    n_total, dim = embedding_matrix(loaded.model).shape
    start, stop = _shard_rows(n_total, out)
    started = time.perf_counter()
    dataset = out.create_dataset("embeddings", (stop - start, dim), cfg.storage_dtype, fillvalue=np.nan)
    block_rows = max(dataset.chunks[0], TOKEN_BLOCK_BYTES // (dim * 4) // dataset.chunks[0] * dataset.chunks[0])
    tokens = token_strings(loaded.tokenizer, n_total)[start:stop]
    blocks = iter_token_blocks(loaded.model, start, stop, block_rows)
    for a, b, values in out.progress(blocks, total=-(-(stop - start) // block_rows), desc="embed token rows"):
        dataset[a - start : b - start] = _to_storage(values, cfg.storage_dtype, tokens[a - start : b - start])
    n = stop - start
    _write_rows(out, np.zeros(n, np.int64), ["tokens"], np.full(n, -1, np.int64), [], np.zeros(0, np.int64), tokens)
    out.write("token_id", np.arange(start, stop, dtype=np.int64))
    out.attrs["row_offset"], out.attrs["n_total"] = start, n_total
    out.attrs["sources"] = json.dumps(
        [{"kind": "token_embeddings", "vocab_rows": int(n_total), "tokenizer_size": len(loaded.tokenizer)}]
    )
    seconds = time.perf_counter() - started
    out.summary.update(
        n_texts=n,
        dim=int(dim),
        tokens=0,
        tokens_per_s=0.0,
        pad_efficiency=1.0,
        n_truncated=0,
        seconds=round(seconds, 2),
    )
    out.log.info("exported input embeddings of %d tokens (rows %d:%d of %d), D=%d", n, start, stop, n_total, dim)


# --------------------------------------------------------------------------------------------------
# writing


def _shard_rows(n_total: int, out: Any) -> tuple[int, int]:
    start, stop = shard_bounds(n_total, out.shard_index, out.num_shards)
    if stop <= start:
        raise DataError(
            f"shard {out.shard_index} of {out.num_shards} has no rows: there are only {n_total} rows; "
            f"use at most {n_total} shards"
        )
    return start, stop


def _layer_name(layer: int) -> str:
    return f"layers/{layer}"


def _names_of_layer(cfg: Config, layer: int) -> list[str]:
    names = ["embeddings"] if layer == cfg.layers[0] else []
    return names + ([_layer_name(layer)] if isinstance(cfg.layer, list) else [])


def _create_embedding_datasets(cfg: Config, out: Any, n: int, dim: int) -> dict[str, Any]:
    # NaN fill: a row that was never written reads as NaN, never as a plausible embedding.
    names = ["embeddings"] + ([_layer_name(layer) for layer in cfg.layer] if isinstance(cfg.layer, list) else [])
    return {name: out.create_dataset(name, (n, dim), cfg.storage_dtype, fillvalue=np.nan) for name in names}


def _to_storage(values: np.ndarray, storage_dtype: str, text_ids: list[str]) -> np.ndarray:
    """Cast a (rows, D) float32 block to the storage dtype, refusing values float16 cannot hold."""
    stored = values.astype(storage_dtype, copy=False)
    finite = np.isfinite(stored).all(axis=1)
    if not finite.all():
        bad = [text_ids[i] for i in np.flatnonzero(~finite)[:5]]
        reason = (
            "exceed the float16 range (|x| > 65504); use storage_dtype: float32"
            if storage_dtype == "float16" and np.isfinite(values).all()
            else "are NaN/inf"
        )
        raise DataError(f"embeddings of {int((~finite).sum())} row(s) {reason}, e.g. {bad}")
    return stored


def _write_rows(
    out: Any,
    domain: np.ndarray,
    domain_names: list[str],
    label: np.ndarray,
    label_names: list[str],
    label_domain: np.ndarray,
    text_id: list[str],
) -> None:
    out.write("domain", np.asarray(domain, dtype=np.int64))
    _write_strings(out, "domain_names", domain_names)
    out.write("label", np.asarray(label, dtype=np.int64))
    _write_strings(out, "label_names", label_names)
    out.write("label_domain", np.asarray(label_domain, dtype=np.int64))
    _write_strings(out, "text_id", text_id)


def _write_strings(out: Any, name: str, values: list[str]) -> None:
    if values:
        out.write(name, list(values))
    else:  # an empty list has no dtype to tell h5py it holds strings
        import h5py

        out.create_dataset(name, (0,), h5py.string_dtype())


def _write_model_attrs(cfg: Config, loaded: Any, out: Any) -> None:
    attrs = {
        "mode": cfg.mode,
        "model_name": cfg.model.name,
        "model_revision": cfg.model.revision or "",
        "model_commit": loaded.commit,
        "model_class": type(loaded.model).__name__,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": loaded.device,
        "storage_dtype": cfg.storage_dtype,
        "padding_side": str(loaded.tokenizer.padding_side),
    }
    if cfg.mode == "texts":
        attrs.update(
            pooling=cfg.pooling,
            layers=np.asarray(cfg.layers, dtype=np.int64),
            max_length=cfg.max_length,
            batch_size=cfg.batch_size,
            sort_by_length=cfg.sort_by_length,
            embeddings_layer=cfg.layers[0],
        )
    for key, value in attrs.items():
        out.attrs[key] = value
