"""The lora stage: one LoRA adapter per domain over a shared, frozen base causal LM.

The base is a HF model or folder (``base: {kind: hf, name: ...}``) or the model of the
experiment's ``lm`` stage (``base: {kind: lm}``). The texts come from the sources in ``data`` (the
same sources as ``embed``; each source is a domain). Every domain's texts are split, seeded and
stratified by domain, into training, validation and test texts (:func:`text_splits`); the test
texts are left to the ``route`` stage, which judges routers over these adapters. The stage is
sharded by domain: task ``i`` of the array trains the adapter of domain ``i`` on that domain's
training texts, with PEFT's ``LoraConfig`` (``adapter``) and the shared training loop
(:func:`moespec.models.training.fit`), keeping the weights with the lowest validation loss.
Checkpoints hold the adapter's weights only and resume bit for bit.

Each task writes its adapter as a PEFT folder ``adapter-<ii>-<domain>/`` beside the artifact
(``PeftModel.from_pretrained(base, folder)`` loads it unchanged) and one row of:

========================  ====================  ==================================================
dataset                   shape, dtype          meaning
========================  ====================  ==================================================
adapter_domain            (N,) int64            domain of each adapter (index into domain_names)
adapter_name              (N,) str              the domain's name
adapter_folder            (N,) str              the PEFT folder, relative to the artifact folder
base_val_loss             (N,) float64          validation loss (nats/token) of the base model
best_val_loss             (N,) float64          ... with the kept adapter
best_step, steps_run      (N,) int64            step of the kept weights; optimiser steps run
trainable_params          (N,) int64            adapter parameters
n_train, n_val, n_test    (N,) int64            texts of the domain in each split
train_seconds             (N,) float64          wall time of the training loop
curves/train_loss         (N, max_steps)        mean training loss of each step (NaN after a stop)
curves/val_loss           (N, n_evals)          validation loss at each evaluation (NaN padded)
curves/val_step           (N, n_evals) int64    step of each evaluation (-1 padded)
domain_names              (n_domains,) str
========================  ====================  ==================================================

Attributes: ``base`` (the model as configured), ``base_path`` (where it was loaded from, for
``route``), ``experts_implementation`` (an lm base's, as the lm stage chose it), ``split_digest``
(a hash of the test texts' ids, checked by ``route``), ``total_params``. Summary: the domain, its
base and best validation loss, steps run.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from moespec.artifacts import ArtifactReader, ArtifactWriter, DatasetSpec
from moespec.data.sources import BuiltinSource, Source, source_domains
from moespec.errors import ConfigError, DataError
from moespec.stages.base import StageConfig

NAME = "lora"
SCHEMA_VERSION = 1


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class HFBase(_Section):
    """A base causal LM by HF hub name or local folder (with its tokenizer).

    Attributes
    ----------
    name : str
        ``google/gemma-3-270m`` or a folder written by ``save_pretrained``.
    revision : str, optional
        Branch, tag or commit of a hub model.
    trust_remote_code : bool
    dtype : {"auto", "float32", "bfloat16"}
        Dtype of the frozen weights; ``auto`` is bfloat16 on a GPU and float32 on the CPU.
    """

    kind: Literal["hf"] = "hf"
    name: str
    revision: Optional[str] = None
    trust_remote_code: bool = False
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def local_folder(self) -> Optional[Path]:
        """The folder of a base given as a local folder, else None."""
        path = Path(self.name).expanduser()
        return path if self.name.startswith(("/", "./", "../", "~")) or path.is_dir() else None

    def path(self, inputs: dict[str, ArtifactReader]) -> str:
        folder = self.local_folder()
        if folder is not None and not (folder / "config.json").is_file():
            raise ConfigError(f"lora.base.name: {self.name!r} is not a HF model folder (no config.json)")
        return str(folder) if folder is not None else self.name

    def inputs(self) -> dict[str, str]:
        return {}

    def describe(self, inputs: dict[str, ArtifactReader]) -> str:
        return self.name

    def experts_implementation(self, inputs: dict[str, ArtifactReader]) -> str:
        return ""  # transformers' default for a model we did not train


class LMBase(_Section):
    """The model an ``lm`` stage of the same experiment trained (its HF folder ``model/``).

    Attributes
    ----------
    dtype : {"auto", "float32", "bfloat16"}
    """

    kind: Literal["lm"] = "lm"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    trust_remote_code: bool = False
    revision: Optional[str] = None

    @property
    def name(self) -> str:
        return "lm artifact"

    def local_folder(self) -> Optional[Path]:
        return None  # known once the lm task has run: its adapters are checked when the task loads it

    def path(self, inputs: dict[str, ArtifactReader]) -> str:
        reader = inputs["lm"]
        return str(reader.path.parent / str(reader.attrs.get("model_folder", "model")))

    def inputs(self) -> dict[str, str]:
        return {"lm": "lm"}

    def describe(self, inputs: dict[str, ArtifactReader]) -> str:
        return f"lm {inputs['lm'].uid}"

    def experts_implementation(self, inputs: dict[str, ArtifactReader]) -> str:
        """The experts implementation the lm stage chose for this model (reused, not measured again)."""
        return str(inputs["lm"].attrs.get("experts_implementation", ""))


def _base_kind(value: Any) -> str:
    """``kind`` of a base, ``hf`` when not given (``base: {name: google/gemma-3-270m}``)."""
    return value.get("kind", "hf") if isinstance(value, dict) else getattr(value, "kind", "hf")


#: The base of the adapters: a HF model or folder, or the lm stage's model.
Base = Annotated[Union[Annotated[HFBase, Tag("hf")], Annotated[LMBase, Tag("lm")]], Discriminator(_base_kind)]


class AdapterSettings(_Section):
    """The LoRA of every domain (PEFT ``LoraConfig``).

    Attributes
    ----------
    rank : int
        ``r``: rows of ``A`` and columns of ``B``.
    alpha : float
        ``lora_alpha``: the update is scaled by ``alpha / rank``.
    dropout : float
        Dropout on the adapter's input.
    target_modules : list of str
        Names of the linear layers that get an adapter (``q_proj``, ``v_proj``...).
    """

    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0.0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], min_length=1)


class TrainingSettings(_Section):
    """How every adapter is trained (the shared loop's settings and AdamW's).

    Attributes
    ----------
    max_steps : int
        Optimiser steps per adapter (epochs repeat the domain's texts as needed).
    batch_size : int
        Texts per batch.
    lr, weight_decay : float
        AdamW on the adapter's weights.
    schedule : {"constant", "cosine"}
        After ``warmup_steps`` of linear warm-up.
    eval_every : int
        Optimiser steps between validation passes (the weights with the lowest loss are kept).
    checkpoint_every : int
        Optimiser steps between resumable checkpoints.
    patience : int, optional
        Stop after this many evaluations without improvement.
    precision : {"auto", "float32", "bfloat16"}
        Autocast of training forward passes (``auto``: bfloat16 on a GPU).
    """

    max_steps: int = Field(200, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accumulation: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = Field(10, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0.0)
    eval_every: int = Field(50, ge=1)
    checkpoint_every: int = Field(50, ge=1)
    patience: Optional[int] = Field(None, ge=1)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"

    @property
    def n_evaluations(self) -> int:
        """Evaluations of a run that is not stopped early (every ``eval_every`` steps and the last)."""
        return math.ceil(self.max_steps / self.eval_every)


class Config(StageConfig):
    """The ``lora`` section of an experiment (see the module docstring for what it writes).

    Attributes
    ----------
    base : HFBase or LMBase
        ``{kind: hf, name: ...}`` or ``{kind: lm}`` (the experiment's lm stage; lora then reads it).
    data : list of Source
        Each source is one domain, and gets one adapter.
    adapter : AdapterSettings
    training : TrainingSettings
    max_length : int
        Tokens per text (longer texts are truncated).
    test_fraction, val_fraction : float
        Shares of each domain's texts held out for the routers' evaluation and for validation.
    seed : int
        Splits, batch order, adapter initialisation and dropout.
    """

    base: Base
    data: list[Source] = Field(default_factory=lambda: [BuiltinSource()], min_length=1)
    adapter: AdapterSettings = AdapterSettings()
    training: TrainingSettings = TrainingSettings()
    max_length: int = Field(128, ge=2)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    seed: int = 0

    def num_shards(self) -> int:
        """One task per domain."""
        return len(self.domains)

    @property
    def domains(self) -> list[str]:
        return [d for source in self.data for d in source_domains(source)]

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        problems = _domain_problems(self) + _split_problems(self)
        if not problems:
            problems = _base_problems(self)
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _domain_problems(cfg: Config) -> list[str]:
    repeated = sorted({d for d in cfg.domains if cfg.domains.count(d) > 1})
    if repeated:
        return [f"lora.data: domain(s) {repeated} come from more than one source; give each source its own 'domain'"]
    if cfg.test_fraction + cfg.val_fraction >= 1.0:
        return [f"lora.test_fraction + lora.val_fraction must be below 1, got {cfg.test_fraction + cfg.val_fraction}"]
    return []


def _split_problems(cfg: Config) -> list[str]:
    """Domains whose text count is known from the config and too small for three non-empty splits."""
    problems = []
    for index, source in enumerate(cfg.data):
        count, key = (source.n_per_domain, "n_per_domain") if isinstance(source, BuiltinSource) else (source.n, "n")
        if count is not None and min(split_sizes(count, cfg.test_fraction, cfg.val_fraction)) < 1:
            problems.append(
                f"lora.data[{index}].{key}: {count} text(s) per domain cannot be split into training, "
                f"validation and test texts; each domain needs at least {MIN_TEXTS}"
            )
    return problems


def _base_problems(cfg: Config) -> list[str]:
    """Adapter targets and rank checked against a local base folder's structure (no weights are read)."""
    from moespec.models.adapters import adapter_target_problems, linear_widths, meta_model

    folder = cfg.base.local_folder()
    if folder is None or not (folder / "config.json").is_file():
        return []  # a hub model is checked when the task loads it
    try:
        model = meta_model(str(folder), cfg.base.trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        return [f"lora.base.name: cannot read the model config in {folder}: {e}"]
    return adapter_target_problems(linear_widths(model), cfg.adapter.target_modules, cfg.adapter.rank, "lora.adapter")


#: Texts a domain needs so that its training, validation and test splits are each non-empty.
MIN_TEXTS = 3


def split_sizes(n: int, test_fraction: float, val_fraction: float) -> tuple[int, int, int]:
    """Training, validation and test texts of a domain of ``n`` texts (as :func:`text_splits` draws them)."""

    def held_out(size: int, fraction: float) -> int:  # the rule of moespec.data.splits.stratified_split
        return min(max(int(round(fraction * size)), 1), size - 1) if size >= 2 else 0

    n_test = held_out(n, test_fraction)
    n_val = held_out(n - n_test, val_fraction / (1.0 - test_fraction))
    return n - n_test - n_val, n_val, n_test


def text_splits(domain: np.ndarray, cfg: Config) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded training, validation and test texts, stratified by domain (sorted global indices).

    Raises
    ------
    DataError
        A domain has fewer than :data:`MIN_TEXTS` texts.
    """
    from moespec.data.splits import stratified_split

    counts = np.bincount(domain, minlength=len(cfg.domains))
    small = [f"{cfg.domains[d]} ({counts[d]})" for d in range(len(counts)) if counts[d] < MIN_TEXTS]
    if small:
        raise DataError(
            f"lora.data: domain(s) {', '.join(small)} have too few texts to split into training, "
            f"validation and test texts (at least {MIN_TEXTS} each)"
        )
    rest, test = stratified_split(domain, cfg.test_fraction, cfg.seed)
    train, val = stratified_split(domain[rest], cfg.val_fraction / (1.0 - cfg.test_fraction), cfg.seed + 1)
    return rest[train], rest[val], test


def split_digest(text_ids: list[str], test: np.ndarray) -> str:
    """A short hash of the test texts' ids: ``route`` checks it recomputes the very same test set."""
    return hashlib.sha256("\n".join(text_ids[i] for i in test).encode("utf-8")).hexdigest()[:16]


def adapter_folder_name(index: int, domain: str) -> str:
    return f"adapter-{index:02d}-{re.sub(r'[^A-Za-z0-9._-]+', '_', domain)}"


def experiment_problems(experiment: Any) -> list[str]:
    """An lm base checked against the lm section: the model it describes, built on the ``meta`` device."""
    from moespec.models.adapters import adapter_target_problems

    cfg, lm_cfg = experiment.lora, getattr(experiment, "lm", None)
    if not cfg.base.inputs() or lm_cfg is None:  # only a base trained by this experiment's lm stage
        return []
    # The vocabulary sets only the embedding and output widths; the tokenizer's is the best guess here.
    vocab = lm_cfg.model.vocab_size or getattr(lm_cfg.tokenizer, "vocab_size", None) or 256
    widths = _lm_widths(lm_cfg.model.model_dump_json(), vocab, lm_cfg.model.max_positions or lm_cfg.seq_len)
    return adapter_target_problems(widths, cfg.adapter.target_modules, cfg.adapter.rank, "lora.adapter")


@functools.lru_cache(maxsize=16)
def _lm_widths(model_json: str, vocab: int, positions: int) -> dict[str, tuple[int, int]]:
    """Linear layer widths of the lm section's model (sweep points that share it build it once)."""
    import warnings

    import torch
    from transformers import AutoModelForCausalLM

    from moespec.models.adapters import linear_widths
    from moespec.models.lm import LMModelConfig, hf_config

    config = hf_config(LMModelConfig.model_validate_json(model_json), vocab, positions, 0)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zero-width parts (no shared expert) warn on the meta device
        return linear_widths(AutoModelForCausalLM.from_config(config))


def inputs(cfg: Config) -> dict[str, str]:
    """The lm artifact when the base is the lm stage's model; nothing for a HF model or folder."""
    return cfg.base.inputs()


def schema(cfg: Config) -> dict[str, DatasetSpec]:
    per_adapter = {
        name: DatasetSpec(("N",), kind)
        for name, kind in [
            ("adapter_domain", "int"),
            ("adapter_name", "str"),
            ("adapter_folder", "str"),
            ("base_val_loss", "float"),
            ("best_val_loss", "float"),
            ("best_step", "int"),
            ("steps_run", "int"),
            ("trainable_params", "int"),
            ("n_train", "int"),
            ("n_val", "int"),
            ("n_test", "int"),
            ("train_seconds", "float"),
        ]
    }
    return {
        **per_adapter,
        "curves/train_loss": DatasetSpec(("N", cfg.training.max_steps), "float"),
        "curves/val_loss": DatasetSpec(("N", cfg.training.n_evaluations), "float"),
        "curves/val_step": DatasetSpec(("N", cfg.training.n_evaluations), "int"),
        "domain_names": DatasetSpec(("n_domains",), "str"),
    }


# --------------------------------------------------------------------------------------------------
# loading the base


def load_base(cfg: Config, path: str, device: str, log: Any, experts_implementation: str = "") -> tuple[Any, Any]:
    """The frozen base causal LM at ``path`` (eval mode, on ``device``) and its tokenizer (with a pad token).

    ``experts_implementation`` (an MoE base the lm stage trained: the one it measured fastest,
    e.g. ``sorted_mm``) replaces transformers' default, ``grouped_mm``, a per-expert loop on the CPU.

    Raises
    ------
    ConfigError
        The model cannot be loaded, or the adapter does not fit it (``lora.adapter``).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moespec.models.adapters import adapter_target_problems, linear_widths

    dtype = (
        torch.bfloat16
        if cfg.base.dtype == "bfloat16" or (cfg.base.dtype == "auto" and device.startswith("cuda"))
        else torch.float32
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            path, revision=cfg.base.revision, trust_remote_code=cfg.base.trust_remote_code
        )
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=cfg.base.revision, dtype=dtype, trust_remote_code=cfg.base.trust_remote_code
        )
    except (OSError, ValueError, KeyError, ImportError) as e:
        raise ConfigError(
            f"lora.base.name: cannot load the causal LM {cfg.base.name!r}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        ) from e
    problems = adapter_target_problems(
        linear_widths(model), cfg.adapter.target_modules, cfg.adapter.rank, "lora.adapter"
    )
    if problems:
        raise ConfigError(problems)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # pads are masked out of attention and loss
    if experts_implementation not in ("", "none"):
        from moespec.models.experts import register

        register()  # moespec's sorted_mm joins transformers' registry
        model.set_experts_implementation(experts_implementation)
    log.info(
        "base %s: %s, %.1fM parameters, %s on %s",
        cfg.base.name,
        type(model).__name__,
        sum(p.numel() for p in model.parameters()) / 1e6,
        str(dtype).removeprefix("torch."),
        device,
    )
    return model.to(device).eval(), tokenizer


def domain_texts(cfg: Config, log: Any) -> Any:
    """The texts of ``data`` (a :class:`~moespec.data.textset.TextSet`), checked to hold every domain."""
    from moespec.data.sources import load_texts

    texts = load_texts(cfg.data, log)
    if list(texts.domain_names) != cfg.domains:
        raise DataError(f"lora.data: the sources gave domains {texts.domain_names}, expected {cfg.domains}")
    return texts


# --------------------------------------------------------------------------------------------------
# the recipe


def run(cfg: Config, inputs: dict[str, ArtifactReader], out: ArtifactWriter) -> None:
    """Train the adapter of domain ``out.shard_index`` and write it, its curves and its row."""
    import torch
    from peft import get_peft_model

    from moespec.config import config_dict
    from moespec.models.adapters import AdapterObjective, TrainableView, lora_config, tokenize_texts
    from moespec.models.training import Checkpointer, autocast_dtype, fit

    index, domain = out.shard_index, cfg.domains[out.shard_index]
    texts = domain_texts(cfg, out.log)
    train, val, test = (split[texts.domain[split] == index] for split in text_splits(texts.domain, cfg))
    base_path = cfg.base.path(inputs)
    experts = cfg.base.experts_implementation(inputs)
    base, tokenizer = load_base(cfg, base_path, out.device, out.log, experts)
    torch.manual_seed(cfg.seed * 1_000_003 + index)  # A's initialisation; B starts at zero
    model = get_peft_model(
        base, lora_config(cfg.adapter.rank, cfg.adapter.alpha, cfg.adapter.dropout, cfg.adapter.target_modules)
    )
    view = TrainableView(model)
    encode = lambda rows: tokenize_texts(tokenizer, [texts.texts[i] for i in rows], cfg.max_length)  # noqa: E731
    objective = AdapterObjective(
        encode(train),
        encode(val),
        cfg.training.batch_size,
        cfg.seed + index,
        out.device,
        autocast_dtype(cfg.training.precision, out.device),
    )
    optimizer, scheduler = _optimiser(cfg.training, view)
    base_val_loss = objective.evaluate(view)["val_loss"]
    out.log.info(
        "lora %s (domain %d of %d): %d training, %d validation texts; base val loss %.4f",
        domain,
        index + 1,
        len(cfg.domains),
        len(train),
        len(val),
        base_val_loss,
    )
    checkpoint = Checkpointer(out.work_dir / "checkpoint.pt", {"config": config_dict(cfg), "domain": domain}, NAME)
    started = time.perf_counter()
    with threads_for(cfg, sum(p.numel() for p in model.parameters()), out.device, out.log):
        state = fit(view, optimizer, scheduler, objective, _loop(cfg.training), checkpoint=checkpoint, log=out.log)
    seconds = time.perf_counter() - started
    view.load_state_dict(state.best_state)
    folder = adapter_folder_name(index, domain)
    model.save_pretrained(out.side_file(folder))
    counts = {"n_train": len(train), "n_val": len(val), "n_test": len(test)}
    _write_row(
        cfg,
        out,
        domain,
        folder,
        state,
        base_val_loss,
        sum(p.numel() for p in view.parameters()),
        counts,
        seconds,
        texts.domain_names,
    )
    out.attrs["base"] = cfg.base.describe(inputs)
    out.attrs["base_path"] = base_path
    out.attrs["experts_implementation"] = experts
    out.attrs["split_digest"] = split_digest(texts.text_id, text_splits(texts.domain, cfg)[2])
    out.attrs["total_params"] = sum(p.numel() for p in model.parameters())
    checkpoint.remove()


def threads_for(cfg: Config, n_params: int, device: str, log: Any):
    """One CPU thread for training steps too small to share (:func:`moespec.models.training.threads_for_step`),
    with ``6 N`` FLOPs per token (Kaplan et al. 2020)."""
    from moespec.models.training import threads_for_step

    return threads_for_step(6.0 * n_params * cfg.training.batch_size * cfg.max_length, device, log)


def _optimiser(training: TrainingSettings, view: Any) -> tuple[Any, Any]:
    import torch

    from moespec.models.training import lr_schedule

    optimizer = torch.optim.AdamW(view.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    factor = lr_schedule(training.schedule, training.warmup_steps, training.max_steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _loop(training: TrainingSettings) -> Any:
    from moespec.models.training import LoopConfig

    return LoopConfig(
        max_steps=training.max_steps,
        grad_accumulation=training.grad_accumulation,
        max_grad_norm=training.max_grad_norm,
        eval_every=training.eval_every,
        checkpoint_every=training.checkpoint_every,
        patience=training.patience,
    )


def _write_row(
    cfg: Config,
    out: ArtifactWriter,
    domain: str,
    folder: str,
    state: Any,
    base_val_loss: float,
    trainable: int,
    counts: dict[str, int],
    seconds: float,
    domain_names: list[str],
) -> None:
    """The adapter's row of the artifact (one row per shard; the shard view stacks them)."""
    train_loss = np.full((1, cfg.training.max_steps), np.nan)
    for record in state.steps:
        train_loss[0, record["step"] - 1] = record["train"]["total"]
    val_loss = np.full((1, cfg.training.n_evaluations), np.nan)
    val_step = np.full((1, cfg.training.n_evaluations), -1, dtype=np.int64)
    for i, record in enumerate(state.history):
        val_loss[0, i], val_step[0, i] = record["val_loss"], record["step"]
    rows = {
        "adapter_domain": [out.shard_index],
        "adapter_name": [domain],
        "adapter_folder": [folder],
        "base_val_loss": [base_val_loss],
        "best_val_loss": [state.best_val_loss],
        "best_step": [state.best_step],
        "steps_run": [state.step],
        "trainable_params": [trainable],
        **{k: [v] for k, v in counts.items()},
        "train_seconds": [seconds],
    }
    for name, values in rows.items():
        out.write(name, np.asarray(values, dtype=object if isinstance(values[0], str) else None))
    out.write("curves/train_loss", train_loss)
    out.write("curves/val_loss", val_loss)
    out.write("curves/val_step", val_step)
    out.write("domain_names", list(domain_names))
    out.summary.update(
        domain=domain,
        base_val_loss=round(base_val_loss, 6),
        best_val_loss=round(state.best_val_loss, 6),
        best_step=state.best_step,
        steps_run=state.step,
        trainable_params=trainable,
        seconds=round(seconds, 2),
    )
