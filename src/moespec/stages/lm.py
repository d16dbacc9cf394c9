"""The lm stage: train a decoder-only language model (an MoE or its matched dense twin) on texts.

Texts come from the same sources as ``embed`` (``data``: built-in corpus, HF datasets, local
files). They are split by text into training and validation sets, stratified by domain and
seeded; the tokenizer (a byte-level BPE trained on the training split, or a HF tokenizer) encodes
them, and each split is packed into windows of ``seq_len`` tokens with an end-of-text token
between texts (:mod:`moespec.data.packing`). The model is transformers' Qwen2-MoE, Mixtral or OLMoE, or the Qwen2 /
Llama model matched to it on active or total parameters (:mod:`moespec.models.lm`); it trains
through the shared loop (:func:`moespec.models.training.fit`: AdamW, warm-up then cosine decay,
gradient accumulation, clipping, evaluation every ``eval_every`` steps, checkpoints that resume to
bit-identical weights) and is saved as a standard HF folder ``model/`` (config, safetensors,
tokenizer) that ``AutoModelForCausalLM.from_pretrained`` loads.

Output (``n_steps`` optimiser steps, ``n_evals`` evaluations, ``L`` MoE layers, ``E`` experts):

=================================  =========================  =========================================
dataset                            shape                      meaning
=================================  =========================  =========================================
steps/index, steps/lr              (n_steps,)                 optimiser step, learning rate it used
steps/train/<term>                 (n_steps,)                 lm, total (+ balance, z): step means
curves/step, curves/lr             (n_evals,)                 step of each evaluation
curves/train/<term>                (n_evals,)                 train means since the previous evaluation
curves/val_loss                    (n_evals,)                 nats per validation token
curves/val_perplexity              (n_evals,)                 exp(val_loss)
curves/val_bits_per_byte           (n_evals,)                 tokenizer-independent
curves/val_accuracy                (n_evals,)                 next-token argmax accuracy
curves/val_domain_loss             (n_evals, n_domains)       nats per token, per domain
curves/expert_load                 (n_evals, L, E)            MoE: share of routed slots
curves/router_entropy              (n_evals, L)               MoE: mean router entropy / log E
curves/val_balance, curves/val_z   (n_evals,)                 MoE: validation aux losses
curves/router_saturation           (n_evals, L)               MoE: top-k overlap with the final model
domain_names                       (n_domains,) str
val/domain_loss, val/domain_bpb    (n_domains,)               final model, per domain
val/texts, val/domain, val/text_id (n_val_texts,)             the validation texts (for ablate)
specialisation/<measure>           (L,)                       MoE: token-level specialisation (see
                                                              moespec.specialisation.tokens)
specialisation/coactivation        (L, E, E)                  MoE: P(j selected | i selected)
specialisation/domain_share        (L, n_domains, E)          MoE: share of a domain's slots per expert
val_loss, val_bits_per_byte        ()                         final model
params_total, params_active        ()
tokens_per_s                       ()                         training throughput of this run
=================================  =========================  =========================================

Side folder ``model/``. Summary: ``val_loss``, ``val_perplexity``, ``val_bits_per_byte``,
``val_accuracy``, ``params_total``, ``params_active``, ``tokens_per_s``, ``steps``, ``tokens``,
``experts_implementation``, and for MoE models the final ``expert_load`` and ``router_entropy``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any, Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moespec.artifacts import DatasetSpec
from moespec.config import config_dict
from moespec.data.sources import BuiltinSource, Source, source_domains
from moespec.data.tokenizer import BPETokenizerConfig, TokenizerConfig
from moespec.errors import ConfigError, DataError
from moespec.models.lm import LMModelConfig
from moespec.stages.base import StageConfig

NAME = "lm"
SCHEMA_VERSION = 1

#: Per-layer token-level measures written under ``specialisation/`` (fields of LayerSpecialisation).
SPECIALISATION_MEASURES = (
    "mi_token",
    "nmi_token",
    "mi_domain",
    "nmi_domain",
    "cmi_domain_given_token",
    "cmi_null_mean",
    "cmi_null_std",
    "cmi_p_value",
    "vocab_specialisation",
    "vocab_specialisation_null",
    "n_token_ids",
)


class SpecialisationConfig(BaseModel):
    """Token-level specialisation of the final MoE model on validation tokens.

    Attributes
    ----------
    max_tokens : int
        Validation tokens analysed (the first ones, in window order); their routing is also
        recorded at every evaluation for router saturation.
    n_shuffles : int
        Permutations of the shuffled-domain null of I(expert; domain | token id).
    min_count : int
        Token ids seen fewer times are left out of vocabulary specialisation.
    seed : int
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(20000, ge=1)
    n_shuffles: int = Field(20, ge=1)
    min_count: int = Field(10, ge=1)
    seed: int = 0


class Config(StageConfig):
    """The ``lm`` section of an experiment (see the module docstring for what it writes).

    Attributes
    ----------
    data : list of Source
        Text sources, as in ``embed.data``.
    tokenizer : BPETokenizerConfig or HFTokenizerConfig
        ``{kind: bpe, vocab_size}`` (trained on the training split) or ``{kind: hf, name}``.
    model : LMModelConfig
    seq_len : int
        Tokens per training window.
    batch_size : int
        Windows per forward pass.
    grad_accumulation : int
        Batches per optimiser step.
    max_steps : int, optional
        Optimiser steps (default 1000 unless ``max_tokens`` is given).
    max_tokens : int, optional
        Token budget instead: ``ceil(max_tokens / (batch_size * grad_accumulation * seq_len))`` steps.
    lr, weight_decay : float
        AdamW; weight decay on weight matrices (embeddings included), not on norms and biases.
    betas : tuple of float
    warmup_steps : int
        Linear warm-up, then cosine decay to 0 at the last step.
    max_grad_norm : float, optional
    balance_loss_weight, z_loss_weight : float
        MoE aux losses (Switch load balancing, ST-MoE router z-loss).
    eval_every : int
        Optimiser steps between evaluations (and one at the end).
    validation_fraction : float
        Share of each domain's texts held out.
    checkpoint_every : int
    precision : {"auto", "float32", "bfloat16"}
        bf16 autocast for training passes (auto: on a GPU).
    specialisation : SpecialisationConfig
    seed : int
    """

    data: list[Source] = Field(default_factory=lambda: [BuiltinSource()])
    tokenizer: TokenizerConfig = BPETokenizerConfig()
    model: LMModelConfig = LMModelConfig()
    seq_len: int = Field(256, ge=2)
    batch_size: int = Field(8, ge=1)
    grad_accumulation: int = Field(1, ge=1)
    max_steps: Optional[int] = Field(None, ge=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    lr: float = Field(6e-4, gt=0.0)
    weight_decay: float = Field(0.1, ge=0.0)
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = Field(50, ge=0)
    max_grad_norm: Optional[float] = Field(1.0, gt=0.0)
    balance_loss_weight: float = Field(0.01, ge=0.0)
    z_loss_weight: float = Field(0.001, ge=0.0)
    eval_every: int = Field(100, ge=1)
    validation_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    checkpoint_every: int = Field(200, ge=1)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    specialisation: SpecialisationConfig = SpecialisationConfig()
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> "Config":
        problems = []
        if self.max_steps is not None and self.max_tokens is not None:
            problems.append("give max_steps or max_tokens, not both")
        if not self.data:
            problems.append("data: give at least one text source (e.g. [{kind: builtin}])")
        domains = [d for source in self.data for d in source_domains(source)]
        repeated = sorted({d for d in domains if domains.count(d) > 1})
        if repeated:
            problems.append(f"data: domain(s) {repeated} come from more than one source; give each its own 'domain'")
        if self.model.max_positions is not None and self.seq_len > self.model.max_positions:
            problems.append(f"seq_len {self.seq_len} is beyond model.max_positions {self.model.max_positions}")
        if (
            isinstance(self.tokenizer, BPETokenizerConfig)
            and self.model.vocab_size is not None
            and self.tokenizer.vocab_size > self.model.vocab_size
        ):
            problems.append(
                f"tokenizer.vocab_size {self.tokenizer.vocab_size} does not fit model.vocab_size "
                f"{self.model.vocab_size}"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def total_steps(self) -> int:
        """The optimiser-step budget."""
        if self.max_tokens is None:
            return self.max_steps or 1000
        return math.ceil(self.max_tokens / (self.batch_size * self.grad_accumulation * self.seq_len))


def inputs(cfg: Config) -> dict[str, str]:
    """lm reads no upstream artifact."""
    return {}


def schema(cfg: Config) -> dict[str, DatasetSpec]:
    moe = cfg.model.is_moe
    terms = ("lm", "balance", "z", "total") if moe else ("lm", "total")
    spec = {
        "steps/index": DatasetSpec(("n_steps",), "int"),
        "steps/lr": DatasetSpec(("n_steps",), "float"),
        "curves/step": DatasetSpec(("n_evals",), "int"),
        "curves/lr": DatasetSpec(("n_evals",), "float"),
        "domain_names": DatasetSpec(("n_domains",), "str"),
        "val/domain_loss": DatasetSpec(("n_domains",), "float"),
        "val/domain_bpb": DatasetSpec(("n_domains",), "float"),
        "val/texts": DatasetSpec(("n_val_texts",), "str"),
        "val/domain": DatasetSpec(("n_val_texts",), "int"),
        "val/text_id": DatasetSpec(("n_val_texts",), "str"),
        "curves/val_domain_loss": DatasetSpec(("n_evals", "n_domains"), "float"),
        "curves/expert_load": DatasetSpec(("n_evals", "L", "E"), "float", required=moe),
        "curves/router_entropy": DatasetSpec(("n_evals", "L"), "float", required=moe),
        "curves/router_saturation": DatasetSpec(("n_evals", "L"), "float", required=moe),
        "specialisation/coactivation": DatasetSpec(("L", "E", "E"), "float", required=moe),
        "specialisation/domain_share": DatasetSpec(("L", "n_domains", "E"), "float", required=moe),
    }
    for name in ("val_loss", "val_perplexity", "val_bits_per_byte", "val_accuracy"):
        spec[f"curves/{name}"] = DatasetSpec(("n_evals",), "float")
    for name in ("val_balance", "val_z"):
        spec[f"curves/{name}"] = DatasetSpec(("n_evals",), "float", required=moe)
    for term in terms:
        spec[f"steps/train/{term}"] = DatasetSpec(("n_steps",), "float")
        spec[f"curves/train/{term}"] = DatasetSpec(("n_evals",), "float")
    for measure in SPECIALISATION_MEASURES:
        spec[f"specialisation/{measure}"] = DatasetSpec(("L",), "float", required=moe)
    for name, kind in (
        ("val_loss", "float"),
        ("val_bits_per_byte", "float"),
        ("params_total", "int"),
        ("params_active", "int"),
        ("tokens_per_s", "float"),
    ):
        spec[name] = DatasetSpec((), kind)
    return spec


# --------------------------------------------------------------------------------------------------
# the recipe


def run(cfg: Config, inputs: dict[str, Any], out: Any) -> None:
    """Split, tokenise, pack, train through the shared loop; write curves, specialisation and the HF folder."""
    import torch

    from moespec.models.lm_training import LMObjective, make_optimizer
    from moespec.models.training import Checkpointer, autocast_dtype, fit

    data = prepare_data(cfg, out.log)
    device = torch.device(out.device)
    model = _build(cfg, data).to(device)
    total, active = _counts(model)
    out.log.info(
        "%s: %d blocks, d=%d, %s; %.2fM parameters (%.2fM active); %d train / %d validation windows of %d",
        type(model).__name__,
        cfg.model.num_layers,
        cfg.model.hidden_size,
        _describe(cfg, model),
        total / 1e6,
        active / 1e6,
        len(data.train),
        len(data.val),
        cfg.seq_len,
    )
    autocast = autocast_dtype(cfg.precision, device)
    objective = LMObjective(
        data.train,
        data.val,
        data.val_domain,
        data.val_bytes,
        len(data.domain_names),
        data.eot_id,
        cfg.batch_size,
        cfg.seed,
        device,
        cfg.balance_loss_weight,
        cfg.z_loss_weight,
        autocast,
        cfg.specialisation.max_tokens if cfg.model.is_moe else 0,
    )
    with _threads_for(cfg, active, device, out.log):
        implementation = _experts_implementation(cfg, model, objective, out)
        _add_dropout(cfg, model)
        optimizer = make_optimizer(model, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
        scheduler = make_scheduler(cfg, optimizer)
        checkpoint = Checkpointer(out.work_dir / "checkpoint.pt", {"config": config_dict(cfg)}, NAME)
        clock = _Clock(objective)
        torch.manual_seed(cfg.seed)  # dropout draws; a resumed run restores the generator from its checkpoint
        state = fit(
            model,
            optimizer,
            scheduler,
            objective,
            _loop(cfg),
            checkpoint=checkpoint,
            log=out.log,
            progress=clock.tick,
            on_evaluation=lambda record: _on_evaluation(record, objective, out, clock),
        )
        tokens_per_s = clock.tokens_per_s(cfg.batch_size * cfg.grad_accumulation * cfg.seq_len)
        if cfg.model.is_moe and objective.last_routing is None:
            objective.evaluate(model)  # resumed after the final evaluation: its routing, recomputed (eval is exact)
    _write_outputs(cfg, data, state, objective, (total, active), tokens_per_s, implementation, out)
    _save_model(model, data.tokenizer, out)
    checkpoint.remove()
    for path in out.work_dir.glob("routing-*.npy"):
        path.unlink()


def _loop(cfg: Config) -> Any:
    from moespec.models.training import LoopConfig

    return LoopConfig(
        epochs=None,
        max_steps=cfg.total_steps(),
        grad_accumulation=cfg.grad_accumulation,
        max_grad_norm=cfg.max_grad_norm,
        eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every,
    )


def make_scheduler(cfg: Config, optimizer: Any) -> Any:
    """Linear warm-up over ``warmup_steps``, cosine decay to 0 at the last step (``LambdaLR``)."""
    import torch

    from moespec.models.training import lr_schedule

    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule("cosine", cfg.warmup_steps, cfg.total_steps()))


# --------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class LMData:
    """The tokenised, packed splits of a run and what evaluation needs of them.

    Attributes
    ----------
    tokenizer : transformers tokenizer
    eot_id : int
    train, val : PackedTokens
    domain_names : list of str
    val_texts, val_text_id : list of str, length n_val_texts
    val_domain, val_bytes : ndarray of shape (n_val_texts,), int64
        Domain and UTF-8 bytes of each validation text.
    """

    tokenizer: Any
    eot_id: int
    train: Any
    val: Any
    domain_names: list[str]
    val_texts: list[str]
    val_domain: np.ndarray
    val_text_id: list[str]
    val_bytes: np.ndarray


def prepare_data(cfg: Config, log: Any) -> LMData:
    """Load texts, split them by text (stratified by domain, seeded), tokenise and pack both splits.

    Raises
    ------
    DataError
        A source is empty after filtering (``lm.data[i]``), or a split packs to no window.
    ConfigError
        The tokenizer's vocabulary does not fit ``lm.model.vocab_size``.
    """
    from moespec.data.packing import pack
    from moespec.data.splits import stratified_split
    from moespec.data.textset import concat
    from moespec.data.tokenizer import encode, load_tokenizer

    texts = concat([_load_source(i, source, log) for i, source in enumerate(cfg.data)])
    train_index, val_index = stratified_split(texts.domain, cfg.validation_fraction, cfg.seed)
    if not len(train_index) or not len(val_index):
        raise DataError(
            f"lm.data: {len(texts)} texts give {len(train_index)} training and {len(val_index)} "
            f"validation texts; each split needs at least one (more texts per domain)"
        )
    train_texts = [texts.texts[i] for i in train_index]
    val_texts = [texts.texts[i] for i in val_index]
    tokenizer, eot_id = load_tokenizer(cfg.tokenizer, train_texts)
    if cfg.model.vocab_size is not None and len(tokenizer) > cfg.model.vocab_size:
        raise ConfigError(
            f"lm.model.vocab_size: {cfg.model.vocab_size} is smaller than the tokenizer's vocabulary "
            f"({len(tokenizer)} tokens)"
        )
    train = pack(encode(tokenizer, train_texts), cfg.seq_len, eot_id, keep_tail=False)
    val = pack(encode(tokenizer, val_texts), cfg.seq_len, eot_id, keep_tail=True)
    if not len(train):
        raise DataError(
            f"lm.seq_len: the training split has {train.n_targets + 1} tokens, fewer than one window of "
            f"{cfg.seq_len + 1}; give more texts or a shorter seq_len"
        )
    log.info(
        "%d texts (%d domains): %d train, %d validation; tokenizer %s, %d tokens; %d train tokens",
        len(texts),
        len(texts.domain_names),
        len(train_index),
        len(val_index),
        cfg.tokenizer.kind,
        len(tokenizer),
        len(train) * cfg.seq_len,
    )
    return LMData(
        tokenizer=tokenizer,
        eot_id=eot_id,
        train=train,
        val=val,
        domain_names=texts.domain_names,
        val_texts=val_texts,
        val_domain=texts.domain[val_index],
        val_text_id=[texts.text_id[i] for i in val_index],
        val_bytes=np.array([len(t.encode("utf-8")) for t in val_texts], dtype=np.int64),
    )


def _load_source(index: int, source: Any, log: Any) -> Any:
    try:
        loaded = source.load(log)
    except DataError as e:
        raise DataError(f"lm.data[{index}]: {e}") from e
    if not len(loaded):
        raise DataError(f"lm.data[{index}]: the {source.kind} source gives no text after filtering")
    return loaded


# --------------------------------------------------------------------------------------------------
# model


def _build(cfg: Config, data: LMData) -> Any:
    from moespec.models.lm import build_model, hf_config

    vocab = cfg.model.vocab_size or len(data.tokenizer)
    positions = cfg.model.max_positions or cfg.seq_len
    return build_model(hf_config(cfg.model, vocab, positions, data.eot_id, cfg.balance_loss_weight), cfg.seed)


def _counts(model: Any) -> tuple[int, int]:
    from moespec.models.lm import parameter_counts

    return parameter_counts(model)


def _describe(cfg: Config, model: Any) -> str:
    if cfg.model.is_moe:
        return f"{cfg.model.num_experts} experts top-{cfg.model.top_k} in blocks {cfg.model.moe_layers()}"
    return f"dense twin matched on {cfg.model.dense_twin} parameters, FFN {model.config.intermediate_size}"


def _experts_implementation(cfg: Config, model: Any, objective: Any, out: Any) -> str:
    """Set the experts implementation: the configured one, or the fastest measured here (kept for resumes)."""
    import torch

    from moespec.models.lm import AUTO_CANDIDATES, choose_experts_implementation

    if not cfg.model.is_moe:
        return "none"
    record = out.work_dir / "experts_implementation.json"
    name = cfg.model.experts_implementation
    if name == "auto" and record.exists():
        name = json.loads(record.read_text())["chosen"]  # a resumed run keeps its arithmetic
    elif name == "auto":
        batch = objective.train[: min(cfg.batch_size, len(objective.train))].numpy()
        inputs, labels = objective._tensors(batch)
        candidates = AUTO_CANDIDATES.get(torch.device(out.device).type, AUTO_CANDIDATES["cpu"])
        name, seconds = choose_experts_implementation(model, inputs, labels, candidates)
        out.log.info(
            "experts implementation: %s (seconds per step: %s)",
            name,
            ", ".join(f"{k} {v:.4f}" for k, v in seconds.items()),
        )
        record.write_text(json.dumps({"chosen": name, "seconds": seconds}))
    model.set_experts_implementation(name)
    return name


def _threads_for(cfg: Config, params_active: int, device: Any, log: Any):
    """One CPU thread for training steps too small to share (:func:`moespec.models.training.threads_for_step`)."""
    from moespec.models.lm import flops_per_token
    from moespec.models.training import threads_for_step

    step_flops = (
        flops_per_token(params_active, cfg.model.num_layers, cfg.seq_len, cfg.model.hidden_size)
        * cfg.batch_size
        * cfg.seq_len
    )
    return threads_for_step(step_flops, device, log)


def _add_dropout(cfg: Config, model: Any) -> None:
    from moespec.models.lm import add_dropout

    add_dropout(model, cfg.model.dropout)


class _Clock:
    """Training throughput of this process: optimiser steps per second of training, evaluations left out."""

    def __init__(self, objective: Any) -> None:
        self.objective = objective
        self.start = time.perf_counter()
        self.eval_seconds = 0.0
        self.first_step: Optional[int] = None
        self.last_step = 0

    def tick(self, state: Any) -> None:
        if self.first_step is None:
            self.first_step = state.step - 1
        self.last_step = state.step

    def tokens_per_s(self, tokens_per_step: int) -> float:
        steps = self.last_step - (self.first_step or 0)
        seconds = time.perf_counter() - self.start - self.eval_seconds - self.objective.eval_seconds
        return tokens_per_step * steps / seconds if steps and seconds > 0 else float("nan")


def _on_evaluation(record: dict[str, Any], objective: Any, out: Any, clock: _Clock) -> None:
    """Log the evaluation and keep the routing of its validation tokens (router saturation)."""
    started = time.perf_counter()
    out.log.info(
        "step %d: train loss %.4f | val loss %.4f, ppl %.2f, bits/byte %.4f, accuracy %.4f%s",
        record["step"],
        record["train"].get("lm", math.nan),
        record["val_loss"],
        record["val_perplexity"],
        record["val_bits_per_byte"],
        record["val_accuracy"],
        f" | load {np.round(record['expert_load'], 3).tolist()}" if "expert_load" in record else "",
    )
    if objective.last_routing is not None:
        path = out.work_dir / f"routing-{record['step']:08d}.npy"
        tmp = path.with_name(path.name + ".tmp.npy")
        np.save(tmp, objective.last_routing.expert_index)
        tmp.replace(path)
    clock.eval_seconds += time.perf_counter() - started


# --------------------------------------------------------------------------------------------------
# outputs


def _write_outputs(
    cfg: Config,
    data: LMData,
    state: Any,
    objective: Any,
    counts: tuple[int, int],
    tokens_per_s: float,
    implementation: str,
    out: Any,
) -> None:
    history, steps = state.history, state.steps
    out.write("steps/index", np.array([s["step"] for s in steps], dtype=np.int64))
    out.write("steps/lr", np.array([s["lr"] for s in steps], dtype=np.float64))
    terms = ("lm", "balance", "z", "total") if cfg.model.is_moe else ("lm", "total")
    for term in terms:
        out.write(f"steps/train/{term}", np.array([s["train"][term] for s in steps], dtype=np.float64))
        out.write(f"curves/train/{term}", np.array([r["train"].get(term, np.nan) for r in history]))
    out.write("curves/step", np.array([r["step"] for r in history], dtype=np.int64))
    out.write("curves/lr", np.array([r["lr"] for r in history], dtype=np.float64))
    for name in ("val_loss", "val_perplexity", "val_bits_per_byte", "val_accuracy"):
        out.write(f"curves/{name}", np.array([r[name] for r in history], dtype=np.float64))
    out.write("curves/val_domain_loss", np.array([r["val_domain_loss"] for r in history], dtype=np.float64))
    final = history[-1]
    out.write("domain_names", list(data.domain_names))
    out.write("val/domain_loss", np.array(final["val_domain_loss"], dtype=np.float64))
    out.write("val/domain_bpb", np.array(final["val_domain_bits_per_byte"], dtype=np.float64))
    out.write("val/texts", list(data.val_texts))
    out.write("val/domain", np.asarray(data.val_domain, dtype=np.int64))
    out.write("val/text_id", list(data.val_text_id))
    if cfg.model.is_moe:
        _write_routing(cfg, history, objective, out)
    out.write("val_loss", np.float64(final["val_loss"]))
    out.write("val_bits_per_byte", np.float64(final["val_bits_per_byte"]))
    out.write("params_total", np.int64(counts[0]))
    out.write("params_active", np.int64(counts[1]))
    out.write("tokens_per_s", np.float64(tokens_per_s))
    out.attrs["experts_implementation"] = implementation
    out.attrs["model_folder"] = "model"
    out.summary.update(
        val_loss=round(final["val_loss"], 5),
        val_perplexity=round(final["val_perplexity"], 3),
        val_bits_per_byte=round(final["val_bits_per_byte"], 5),
        val_accuracy=round(final["val_accuracy"], 4),
        best_val_loss=round(state.best_val_loss, 5),
        params_total=counts[0],
        params_active=counts[1],
        tokens_per_s=round(tokens_per_s, 1),
        steps=state.step,
        tokens=state.step * cfg.batch_size * cfg.grad_accumulation * cfg.seq_len,
        model="moe" if cfg.model.is_moe else f"dense ({cfg.model.dense_twin}-matched)",
        experts_implementation=implementation,
    )
    if cfg.model.is_moe:
        out.summary.update(
            expert_load=np.round(final["expert_load"], 4).tolist(),
            router_entropy=np.round(final["router_entropy"], 4).tolist(),
        )


def _write_routing(cfg: Config, history: list[dict[str, Any]], objective: Any, out: Any) -> None:
    """Routing curves, router saturation against the final model, and token-level specialisation."""
    from moespec.specialisation import tokens as spec

    out.write("curves/expert_load", np.array([r["expert_load"] for r in history], dtype=np.float64))
    out.write("curves/router_entropy", np.array([r["router_entropy"] for r in history], dtype=np.float64))
    out.write("curves/val_balance", np.array([r["val_balance"] for r in history], dtype=np.float64))
    out.write("curves/val_z", np.array([r["val_z"] for r in history], dtype=np.float64))
    final = objective.last_routing.expert_index  # (n, L, k), the final weights
    n_layers = final.shape[1]
    saturation = np.full((len(history), n_layers), np.nan)
    for row, record in enumerate(history):
        path = out.work_dir / f"routing-{record['step']:08d}.npy"
        if path.exists():
            earlier = np.load(path)
            saturation[row] = [spec.router_saturation(earlier[:, layer], final[:, layer]) for layer in range(n_layers)]
    out.write("curves/router_saturation", saturation)
    routing = objective.last_routing
    n_experts, n_domains = cfg.model.num_experts, len(objective.domain_bytes)
    rng = np.random.default_rng(cfg.specialisation.seed)
    layers = [
        spec.layer_specialisation(
            routing.expert_index[:, layer, 0],
            routing.token_id,
            routing.domain,
            n_shuffles=cfg.specialisation.n_shuffles,
            min_count=cfg.specialisation.min_count,
            rng=rng,
        )
        for layer in range(n_layers)
    ]
    for measure in SPECIALISATION_MEASURES:
        out.write(f"specialisation/{measure}", np.array([getattr(layer, measure) for layer in layers], dtype=float))
    out.write(
        "specialisation/coactivation",
        np.stack([spec.coactivation(routing.expert_index[:, layer], n_experts) for layer in range(n_layers)]),
    )
    out.write(
        "specialisation/domain_share",
        np.stack(
            [
                spec.domain_expert_share(routing.expert_index[:, layer], routing.domain, n_domains, n_experts)
                for layer in range(n_layers)
            ]
        ),
    )
    out.summary.update(
        nmi_token=[round(layer.nmi_token, 4) for layer in layers],
        nmi_domain=[round(layer.nmi_domain, 4) for layer in layers],
        cmi_domain_given_token=[round(layer.cmi_domain_given_token, 5) for layer in layers],
        cmi_null=[round(layer.cmi_null_mean, 5) for layer in layers],
    )


def _save_model(model: Any, tokenizer: Any, out: Any) -> None:
    """The final weights and the tokenizer as a standard HF folder (``model/``)."""
    folder = out.side_file("model")
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
