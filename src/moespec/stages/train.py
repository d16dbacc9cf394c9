"""The train stage: fit an MoE model (``moespec.models``) on the reduced (or raw) embeddings.

The model is chosen by ``model.kind``: the dictionary-expert MoE (contrastive, positives chosen by
``model.positive_pairs``) or the top-k MoE classifier (cross-entropy on ``model.target``). Rows are
split into training and validation sets stratified by domain; training is seeded and deterministic
on CPU (the shuffling of epoch ``e`` comes from a generator seeded with ``(seed, e)``, the weights
from ``seed``), checkpoints every ``checkpoint_every`` optimiser steps into the task's work folder,
and a re-run of a preempted or failed task resumes from the last checkpoint to the same final
weights as an uninterrupted run.

Output:

=============================  ======================  ==========================================
dataset                        shape, dtype            meaning
=============================  ======================  ==========================================
curves/epoch                   (n_epochs,) int64       epochs run (1-based)
curves/lr                      (n_epochs,) float64     learning rate at the end of the epoch
curves/train/<term>            (n_epochs,) float64     mean of each loss term over the epoch
curves/val/<term>              (n_epochs,) float64     the same on the validation rows
curves/val_accuracy            (n_epochs,) float64     classifier: accuracy; dictionary: nearest
                                                       training-centroid accuracy of the pair key
curves/expert_load             (n_epochs, L, E)        share of validation rows whose top-1 expert
                                                       is e, per MoE layer
curves/routing_entropy         (n_epochs, L)           mean per-row routing entropy / log E
curves/collapsed               (n_epochs,) bool        a dead expert or one above collapse_threshold
split/train_index              (n_train,) int64        input rows used for training
split/val_index                (n_val,) int64          held-out input rows
heldout/router_probs           (n_val, L, E) float32   gate probabilities of the best model
heldout/selected               (n_val, L, E) bool      experts the router selected
heldout/assignment             (n_val, L) int64        top-1 expert
heldout/domain, heldout/label  (n_val,) int64          carried from the input
heldout/target                 (n_val,) int64          class id (classifier only)
heldout/prediction             (n_val,) int64          predicted class (classifier only)
heldout/embedding              (n_val, P) float32      projection (dictionary only)
target_names                   (n_classes,) str        classifier: names of the class ids
best_epoch, epochs_run         () int64
best_val_loss                  () float64
=============================  ======================  ==========================================

Side files: ``best.pt`` (the weights with the lowest validation loss) and ``final.pt`` (the last
weights with optimiser and scheduler states); load either with :func:`load_model`.
Summary: ``epochs_run``, ``best_epoch``, ``best_val_loss``, ``val_accuracy``, ``stopped_early``,
``collapse_warning``, ``expert_load``, ``routing_entropy``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field

from moespec.artifacts import DatasetSpec
from moespec.config import config_dict
from moespec.errors import ConfigError, DataError
from moespec.models import DictionaryMoEConfig, ModelConfig
from moespec.stages.base import StageConfig

NAME = "train"
SCHEMA_VERSION = 1

#: Version tag inside every checkpoint this stage writes (2: the optimiser state is over one flat
#: parameter buffer, see ``make_optimizer``; a resumable checkpoint must have this one).
CHECKPOINT_FORMAT = "moespec.train/2"
#: Formats whose model weights ``load_model`` reads (the weights did not change between them).
MODEL_FORMATS = ("moespec.train/1", CHECKPOINT_FORMAT)

#: Loss terms per model kind (``total`` is the one minimised).
LOSS_TERMS = {
    "dictionary": ("contrastive", "reconstruction", "balance", "total"),
    "topk": ("classification", "balance", "z", "total"),
}


class Config(StageConfig):
    """The ``train`` section of an experiment.

    Attributes
    ----------
    input : {"reduce", "embed"}
        Train on the reduced coordinates (default) or the raw embeddings.
    model : DictionaryMoEConfig or TopKMoEConfig
        The model, chosen by ``kind`` (see ``moespec.models``).
    optimizer : {"adam", "adamw"}
    lr, weight_decay : float
    schedule : {"constant", "cosine", "step"}
        Learning-rate schedule after ``warmup_steps`` linear warm-up steps: constant, cosine decay
        to 0 over the run, or multiplied by ``step_gamma`` every ``step_epochs`` epochs (the
        earlier pipeline's StepLR(30, 0.1)).
    batch_size : int
        Rows per forward pass (>= 2: the contrastive loss needs pairs).
    grad_accumulation : int
        Batches per optimiser step.
    epochs : int
        Maximum number of epochs.
    patience : int, optional
        Stop after this many epochs without a validation-loss improvement of ``min_delta``; None
        never stops early.
    validation_fraction : float
        Share of each domain's rows held out.
    max_grad_norm : float, optional
        Clip the gradient norm.
    checkpoint_every : int
        Optimiser steps between resumable checkpoints (one is also written after every epoch).
    collapse_threshold : float
        Warn when one expert is the top-1 choice of more than this share of validation rows, or
        when an expert is dead (:func:`moespec.models.routing.collapse_report`).
    precision : {"auto", "float32", "bfloat16"}
        Training forward passes under bfloat16 autocast (weights, optimiser and losses stay
        float32) or in float32; ``auto`` is bfloat16 on a GPU and float32 on the CPU. Validation
        and the held-out outputs are always computed in float32.
    seed : int
    """

    input: Literal["reduce", "embed"] = "reduce"
    model: ModelConfig = DictionaryMoEConfig()
    optimizer: Literal["adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    step_epochs: int = Field(30, ge=1)
    step_gamma: float = Field(0.1, gt=0.0, le=1.0)
    batch_size: int = Field(64, ge=2)
    grad_accumulation: int = Field(1, ge=1)
    epochs: int = Field(30, ge=1)
    patience: Optional[int] = Field(10, ge=1)
    min_delta: float = Field(0.0, ge=0.0)
    validation_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    max_grad_norm: Optional[float] = Field(None, gt=0.0)
    checkpoint_every: int = Field(200, ge=1)
    collapse_threshold: float = Field(0.9, gt=0.0, le=1.0)
    precision: Literal["auto", "float32", "bfloat16"] = "auto"
    seed: int = 0


def inputs(cfg: Config) -> dict[str, str]:
    return {cfg.input: cfg.input}


def schema(cfg: Config) -> dict[str, DatasetSpec]:
    kind = cfg.model.kind
    spec = {
        "curves/epoch": DatasetSpec(("n_epochs",), "int"),
        "curves/lr": DatasetSpec(("n_epochs",), "float"),
        "curves/val_accuracy": DatasetSpec(("n_epochs",), "float"),
        "curves/expert_load": DatasetSpec(("n_epochs", "L", "E"), "float"),
        "curves/routing_entropy": DatasetSpec(("n_epochs", "L"), "float"),
        "curves/collapsed": DatasetSpec(("n_epochs",), "bool"),
        "split/train_index": DatasetSpec(("n_train",), "int"),
        "split/val_index": DatasetSpec(("n_val",), "int"),
        "heldout/router_probs": DatasetSpec(("n_val", "L", "E"), "float"),
        "heldout/selected": DatasetSpec(("n_val", "L", "E"), "bool"),
        "heldout/assignment": DatasetSpec(("n_val", "L"), "int"),
        "heldout/domain": DatasetSpec(("n_val",), "int"),
        "heldout/label": DatasetSpec(("n_val",), "int"),
        "heldout/target": DatasetSpec(("n_val",), "int", required=kind == "topk"),
        "heldout/prediction": DatasetSpec(("n_val",), "int", required=kind == "topk"),
        "heldout/embedding": DatasetSpec(("n_val", "P"), "float", required=kind == "dictionary"),
        "target_names": DatasetSpec(("n_classes",), "str", required=kind == "topk"),
        "best_epoch": DatasetSpec((), "int"),
        "epochs_run": DatasetSpec((), "int"),
        "best_val_loss": DatasetSpec((), "float"),
    }
    for term in LOSS_TERMS[kind]:
        spec[f"curves/train/{term}"] = DatasetSpec(("n_epochs",), "float")
        spec[f"curves/val/{term}"] = DatasetSpec(("n_epochs",), "float")
    return spec


# --------------------------------------------------------------------------------------------------
# the recipe


def run(cfg: Config, inputs: dict[str, Any], out: Any) -> None:
    """Train, checkpointing as it goes; write curves, checkpoints and held-out routing."""
    import torch

    reader = inputs[cfg.input]
    data = load_training_data(cfg, reader)
    train_index, val_index = stratified_split(data.domain, cfg.validation_fraction, cfg.seed)
    _check_split(train_index, val_index)
    out.log.info("train %s MoE on %d x %d %s rows (%d train, %d validation), target %s",
                 cfg.model.kind, *data.features.shape, cfg.input, len(train_index), len(val_index), cfg.model.target)
    device = torch.device(out.device)
    model = _build(cfg, data).to(device)
    optimizer = make_optimizer(cfg, model)
    steps_per_epoch = math.ceil(len(row_batches(np.arange(len(train_index)), cfg.batch_size)) / cfg.grad_accumulation)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, partial(lr_factor, cfg, steps_per_epoch * cfg.epochs, steps_per_epoch))
    features = torch.as_tensor(data.features, device=device)
    targets = torch.as_tensor(data.targets, device=device)
    split = {"train": torch.as_tensor(train_index, device=device), "val": torch.as_tensor(val_index, device=device)}

    checkpoint_path = out.work_dir / "checkpoint.pt"
    identity = {"config": config_dict(cfg), "input_uid": reader.uid}
    state = TrainState()
    if checkpoint_path.exists():
        state = _resume(checkpoint_path, identity, model, optimizer, scheduler)
        out.log.info("resumed from %s at epoch %d, batch %d (step %d)", checkpoint_path, state.epoch,
                     state.batch_in_epoch, state.step)

    def save() -> None:
        _save_checkpoint(checkpoint_path, identity, model, optimizer, scheduler, state)

    while state.epoch < cfg.epochs and not state.stopped_early:
        _train_epoch(cfg, model, optimizer, scheduler, features, targets, split["train"], state, save)
        metrics = evaluate(model, features[split["val"]], targets[split["val"]], cfg.batch_size,
                           train_features=features[split["train"]], train_targets=targets[split["train"]])
        _end_epoch(cfg, model, scheduler, metrics, state, out.log)
        save()

    _write_checkpoints(cfg, data, model, optimizer, scheduler, state, out)
    _write_outputs(cfg, data, model, state, train_index, val_index, features, targets, split, out)
    checkpoint_path.unlink(missing_ok=True)  # the artifact now holds everything; nothing to resume


# --------------------------------------------------------------------------------------------------
# data


@dataclass(frozen=True)
class TrainingData:
    """The input rows and what the objective needs of them.

    Attributes
    ----------
    features : ndarray of shape (n_samples, input_dim), float32
    domain, label : ndarray of shape (n_samples,), int64
    targets : ndarray of shape (n_samples,) or (n_samples, 2), int64
        Class ids (classifier) or contrastive keys (dictionary; two columns for domain_label).
    n_classes : int or None
        Number of classes (classifier only).
    target_names : list of str
        Names of the class ids (classifier only).
    """

    features: np.ndarray
    domain: np.ndarray
    label: np.ndarray
    targets: np.ndarray
    n_classes: Optional[int]
    target_names: list[str]


def load_training_data(cfg: Config, reader: Any) -> TrainingData:
    """Read the input rows and build the targets that ``cfg.model`` trains on."""
    name = "reduced" if cfg.input == "reduce" else "embeddings"
    features = np.asarray(reader[name][()], dtype=np.float32)
    if features.ndim != 2 or len(features) == 0:
        raise DataError(f"train: input dataset {name!r} has shape {features.shape}; expected (N, D) with N > 0")
    bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad_rows):
        raise DataError(f"train: {len(bad_rows)} input rows hold NaN or inf (first: row {bad_rows[0]})")
    domain = reader.read("domain").astype(np.int64)
    label = reader.read("label").astype(np.int64)
    target = cfg.model.target
    key_name = "positive_pairs" if cfg.model.kind == "dictionary" else "target"
    if target in ("label", "domain_label") and (label < 0).any():
        raise DataError(f"train.model.{key_name}: {target!r} needs a label on every row, but "
                        f"{int((label < 0).sum())} of {len(label)} input rows are unlabelled (label = -1); "
                        f"use 'domain' or give every source labels")
    if cfg.model.kind == "dictionary":
        keys = {"label": label, "domain": domain, "domain_label": np.stack([domain, label], axis=1)}[target]
        return TrainingData(features, domain, label, keys, None, [])
    targets, names = _class_targets(target, domain, label, reader)
    if len(names) < 2:
        raise DataError(f"train.model.target: {target!r} gives {len(names)} class(es); a classifier needs >= 2")
    return TrainingData(features, domain, label, targets, len(names), names)


def _class_targets(target: str, domain: np.ndarray, label: np.ndarray, reader: Any) -> tuple[np.ndarray, list[str]]:
    domain_names = [str(n) for n in reader.read("domain_names")] if "domain_names" in reader else []
    label_names = [str(n) for n in reader.read("label_names")] if "label_names" in reader else []
    if target == "domain":
        names = domain_names or [f"domain {d}" for d in range(int(domain.max()) + 1)]
        return domain, names
    if target == "label":
        names = label_names or [f"label {c}" for c in range(int(label.max()) + 1)]
        return label, names
    # (domain, label) pairs that occur, numbered densely: label ids are never merged across domains.
    pairs, targets = np.unique(np.stack([domain, label], axis=1), axis=0, return_inverse=True)
    names = [f"{_name(domain_names, d)}/{_name(label_names, c)}" for d, c in pairs]
    return targets.reshape(-1).astype(np.int64), names


def _name(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


def stratified_split(domain: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of each domain's rows (at least one of two or more), seeded.

    Returns
    -------
    train_index, val_index : ndarray of int64, sorted
    """
    rng = np.random.default_rng(seed)
    train, val = [], []
    for value in np.unique(domain):
        rows = rng.permutation(np.flatnonzero(domain == value))
        n_val = min(max(int(round(fraction * len(rows))), 1), len(rows) - 1) if len(rows) >= 2 else 0
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)).astype(np.int64), np.sort(np.concatenate(val)).astype(np.int64)


def _check_split(train_index: np.ndarray, val_index: np.ndarray) -> None:
    if len(train_index) < 2 or len(val_index) < 2:
        raise DataError(f"train: {len(train_index)} training and {len(val_index)} validation rows; "
                        f"each needs at least 2 (more input rows or another validation_fraction)")


def _build(cfg: Config, data: TrainingData):
    try:
        return cfg.model.build(input_dim=data.features.shape[1], n_classes=data.n_classes, seed=cfg.seed)
    except ValueError as e:
        raise ConfigError(f"train.model: {e}") from e


# --------------------------------------------------------------------------------------------------
# optimisation


def make_optimizer(cfg: Config, model: Any):
    """The stage's optimiser: fused Adam(W) over one flat buffer of the model's parameters.

    On these small models the per-tensor bookkeeping of an optimiser step is a visible share of a
    training step (see ``moespec.models.optim``). Same update, deterministic on CPU. Gradients are
    views of one buffer: zero them with ``optimizer.zero_grad()``, never by setting them to None.
    """
    from moespec.models.optim import flat_adam

    return flat_adam(model, lr=cfg.lr, weight_decay=cfg.weight_decay, kind=cfg.optimizer)


def lr_factor(cfg: Config, total_steps: int, steps_per_epoch: int, step: int) -> float:
    """Multiplier of the base learning rate after ``step`` optimiser steps."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return cfg.step_gamma ** (step // (cfg.step_epochs * steps_per_epoch))
    return 1.0


def epoch_order(n_rows: int, seed: int, epoch: int):
    """The shuffled row order of one epoch; a function of (seed, epoch) only, so resuming needs no RNG state."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=generator)


def row_batches(order: Any, batch_size: int) -> list[Any]:
    """Consecutive batches of ``order``; a last batch of one row joins the previous one (pairs need 2)."""
    batches = [order[start:start + batch_size] for start in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2:] = [order[-(len(batches[-2]) + len(batches[-1])):]]
    return batches


@dataclass
class TrainState:
    """Where training is, and what it has recorded: everything a checkpoint must restore."""

    epoch: int = 0  # epochs completed
    batch_in_epoch: int = 0  # batches of the current epoch already consumed
    step: int = 0  # optimiser steps taken
    train_sums: dict[str, float] = field(default_factory=dict)  # loss-term sums over the current epoch
    train_rows: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)  # one record per completed epoch
    best_val_loss: float = math.inf
    best_epoch: int = 0
    best_state: Optional[dict[str, Any]] = None
    epochs_without_improvement: int = 0
    stopped_early: bool = False


def autocast_dtype(cfg: Config, device: Any) -> Any:
    """The dtype of training forward passes under autocast (``Config.precision``), None for float32."""
    import torch

    precision = cfg.precision
    if precision == "auto":
        precision = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return torch.bfloat16 if precision == "bfloat16" else None


def train_batch(model: Any, features: Any, targets: Any, scale: float, dtype: Any = None) -> dict[str, float]:
    """Forward and backward one batch (gradients accumulate); return its loss terms.

    ``dtype``: run the forward pass under autocast to this dtype (None: no autocast). Without
    autocast, a model with ``accumulate_gradients`` (the dictionary MoE) computes the same gradient
    without building an autograd graph.
    """
    import torch

    if dtype is None and hasattr(model, "accumulate_gradients"):
        terms = model.accumulate_gradients(features, targets, scale)
    else:
        with torch.autocast(features.device.type, dtype=dtype, enabled=dtype is not None):
            output, aux = model(features)
            terms = model.loss_terms(output, aux, targets)
        (terms["total"] * scale).backward()
    values = torch.stack([value.detach().float() for value in terms.values()]).tolist()  # one device sync
    return dict(zip(terms, values))


def _train_epoch(cfg: Config, model: Any, optimizer: Any, scheduler: Any, features: Any, targets: Any,
                 train_rows: Any, state: TrainState, save: Any) -> None:
    import torch

    model.train()
    batches = row_batches(epoch_order(len(train_rows), cfg.seed, state.epoch), cfg.batch_size)
    dtype = autocast_dtype(cfg, features.device)
    for index in range(state.batch_in_epoch, len(batches)):
        rows = train_rows[batches[index].to(train_rows.device)]
        window_end = min(len(batches), (index // cfg.grad_accumulation + 1) * cfg.grad_accumulation)
        window_size = window_end - (index // cfg.grad_accumulation) * cfg.grad_accumulation
        terms = train_batch(model, features[rows], targets[rows], 1.0 / window_size, dtype)
        for name, value in terms.items():
            state.train_sums[name] = state.train_sums.get(name, 0.0) + value * len(rows)
        state.train_rows += len(rows)
        state.batch_in_epoch = index + 1
        if index + 1 == window_end:
            if cfg.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            state.step += 1
            if state.step % cfg.checkpoint_every == 0:
                save()  # only at optimiser-step boundaries: no half-accumulated gradient to store


def _end_epoch(cfg: Config, model: Any, scheduler: Any, metrics: dict[str, Any], state: TrainState,
               log: Any) -> None:
    """Record the epoch, keep the best weights, decide early stopping, warn about collapse."""
    train = {name: total / max(state.train_rows, 1) for name, total in state.train_sums.items()}
    from moespec.models.routing import collapse_report

    collapsed, reasons = collapse_report(metrics["expert_load"], max_share=cfg.collapse_threshold)
    record = {"epoch": state.epoch + 1, "lr": float(scheduler.get_last_lr()[0]), "train": train,
              "val": metrics["loss"], "val_accuracy": metrics["accuracy"],
              "expert_load": metrics["expert_load"], "routing_entropy": metrics["routing_entropy"],
              "collapsed": collapsed}
    state.history.append(record)
    val_loss = metrics["loss"]["total"]
    log.info("epoch %d: train %s | val %s | val accuracy %.4f | load %s | entropy %s", record["epoch"],
             _fmt(train), _fmt(metrics["loss"]), metrics["accuracy"],
             np.round(metrics["expert_load"], 3).tolist(), np.round(metrics["routing_entropy"], 3).tolist())
    if collapsed:
        log.warning("routing collapse on validation rows: %s; consider a larger balance_loss_weight",
                    " | ".join(reasons))
    if val_loss < state.best_val_loss - cfg.min_delta:
        state.best_val_loss, state.best_epoch = val_loss, state.epoch + 1
        state.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state.epochs_without_improvement = 0
    else:
        state.epochs_without_improvement += 1
    state.epoch += 1
    state.batch_in_epoch, state.train_sums, state.train_rows = 0, {}, 0
    if cfg.patience is not None and state.epochs_without_improvement >= cfg.patience and state.epoch < cfg.epochs:
        state.stopped_early = True
        log.info("early stop after epoch %d: no validation improvement for %d epochs (best epoch %d)",
                 state.epoch, cfg.patience, state.best_epoch)


def _fmt(terms: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4g}" for name, value in terms.items())


# --------------------------------------------------------------------------------------------------
# evaluation


def evaluate(model: Any, features: Any, targets: Any, batch_size: int, *, train_features: Any = None,
             train_targets: Any = None) -> dict[str, Any]:
    """Loss terms, accuracy and routing of a model on held-out rows (eval mode, no gradient).

    Returns
    -------
    dict
        ``loss`` (term -> row-weighted mean over fixed batches), ``accuracy``, ``router_probs``
        (n, L, E), ``selected`` (n, L, E) bool, ``assignment`` (n, L), ``expert_load`` (L, E) share
        of rows per top-1 expert, ``routing_entropy`` (L,), ``output`` (n, ...) the model output.
    """
    import torch

    from moespec.models import routing_entropy

    model.eval()
    sums: dict[str, float] = {}
    outputs, probs, selected = [], [], []
    with torch.no_grad():
        for rows in row_batches(torch.arange(len(features), device=features.device), batch_size):
            output, aux = model(features[rows])
            for name, value in model.loss_terms(output, aux, targets[rows]).items():
                sums[name] = sums.get(name, 0.0) + float(value) * len(rows)
            batch_probs, batch_selected = _routing_by_row(aux)
            outputs.append(output)
            probs.append(batch_probs)
            selected.append(batch_selected)
    output, router_probs, chosen = torch.cat(outputs), torch.cat(probs), torch.cat(selected)
    assignment = router_probs.argmax(dim=-1)  # (n, L)
    n_experts = router_probs.shape[-1]
    load = torch.nn.functional.one_hot(assignment, n_experts).float().mean(dim=0)  # (L, E)
    accuracy = _accuracy(model, output, targets, train_features, train_targets, batch_size)
    return {
        "loss": {name: total / len(features) for name, total in sums.items()},
        "accuracy": accuracy,
        "router_probs": router_probs.cpu().numpy(),
        "selected": chosen.cpu().numpy(),
        "assignment": assignment.cpu().numpy(),
        "expert_load": load.cpu().numpy().astype(np.float64),
        "routing_entropy": routing_entropy(router_probs).mean(dim=0).cpu().numpy().astype(np.float64),
        "output": output.cpu().numpy(),
    }


def _routing_by_row(aux: dict[str, Any]) -> tuple[Any, Any]:
    """Router probabilities and the selected set as (batch, L, E), whatever the model's layer layout."""
    import torch

    probs, index = aux["router_probs"], aux["expert_index"]
    if probs.dim() == 2:  # one routing decision per row (dictionary MoE)
        probs, index = probs.unsqueeze(0), index.unsqueeze(0)
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, index, True)  # (L, B, E)
    return probs.transpose(0, 1), selected.transpose(0, 1)


def _accuracy(model: Any, output: Any, targets: Any, train_features: Any, train_targets: Any,
              batch_size: int) -> float:
    """Classifier: argmax accuracy. Dictionary: nearest training-centroid accuracy of the pair key."""
    import torch

    from moespec.models import TopKMoEClassifier

    if isinstance(model, TopKMoEClassifier):
        return float((output.argmax(dim=-1) == targets).float().mean())
    if train_features is None:
        return float("nan")
    with torch.no_grad():
        train_embedding = torch.cat([model(train_features[rows])[0] for rows in
                                     row_batches(torch.arange(len(train_features), device=train_features.device),
                                              batch_size)])
    keys, key_id = torch.unique(torch.cat([train_targets, targets]).reshape(len(train_targets) + len(targets), -1),
                                dim=0, return_inverse=True)
    train_id, val_id = key_id[:len(train_targets)], key_id[len(train_targets):]
    centroids = torch.zeros(len(keys), train_embedding.shape[-1], device=output.device)
    centroids.index_add_(0, train_id, train_embedding)
    counts = torch.bincount(train_id, minlength=len(keys)).clamp_min(1).unsqueeze(-1)
    centroids = centroids / counts
    present = torch.bincount(train_id, minlength=len(keys)) > 0
    distances = torch.cdist(output, centroids).masked_fill(~present, float("inf"))
    return float((distances.argmin(dim=-1) == val_id).float().mean())


# --------------------------------------------------------------------------------------------------
# checkpoints


def _save_checkpoint(path: Path, identity: dict[str, Any], model: Any, optimizer: Any, scheduler: Any,
                     state: TrainState) -> None:
    """Write a resumable checkpoint atomically (tmp file, then rename)."""
    import torch

    payload = {
        "format": CHECKPOINT_FORMAT,
        **identity,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "torch_rng": torch.random.get_rng_state(),
        "state": _state_dict(state),
    }
    tmp = path.with_name(path.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _state_dict(state: TrainState) -> dict[str, Any]:
    plain = dict(state.__dict__)
    plain["history"] = [{**record, "expert_load": record["expert_load"].tolist(),
                         "routing_entropy": record["routing_entropy"].tolist()} for record in state.history]
    return plain


def _resume(path: Path, identity: dict[str, Any], model: Any, optimizer: Any, scheduler: Any) -> TrainState:
    """Restore model, optimiser, scheduler and progress from ``path``, which must be this task's."""
    import torch

    checkpoint = _load(path)
    check_checkpoint_identity(checkpoint, identity, path)
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    scheduler.load_state_dict(checkpoint["scheduler"])
    torch.random.set_rng_state(checkpoint["torch_rng"])
    state = TrainState(**checkpoint["state"])
    state.history = [{**record, "expert_load": np.asarray(record["expert_load"]),
                      "routing_entropy": np.asarray(record["routing_entropy"])} for record in state.history]
    return state


def _load(path: Path) -> dict[str, Any]:
    import torch

    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a truncated or foreign file
        raise ConfigError(f"{path}: not a readable moespec train checkpoint: {e}") from e
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{path}: not a moespec train checkpoint (format "
                          f"{checkpoint.get('format') if isinstance(checkpoint, dict) else None!r}, "
                          f"expected {CHECKPOINT_FORMAT!r})")
    return checkpoint


def check_checkpoint_identity(checkpoint: dict[str, Any], identity: dict[str, Any], path: Path) -> None:
    """Raise ConfigError, naming the differing keys, when a checkpoint belongs to another config or input."""
    differences = _differences(checkpoint.get("config", {}), identity["config"])
    if differences:
        raise ConfigError(f"{path}: checkpoint was written by a different train config "
                          f"(differs in: {', '.join(differences[:8])}); remove it or restore that config")
    if checkpoint.get("input_uid") != identity["input_uid"]:
        raise ConfigError(f"{path}: checkpoint was trained on input {checkpoint.get('input_uid')!r}, "
                          f"this task reads {identity['input_uid']!r}")


def _differences(old: Any, new: Any, prefix: str = "train") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += _differences(old.get(key), new.get(key), f"{prefix}.{key}")
        return found
    return [] if old == new else [f"{prefix} ({old!r} -> {new!r})"]


def load_model(path: Path | str, *, map_location: str = "cpu"):
    """Rebuild a trained model from a ``best.pt`` or ``final.pt`` of this stage (eval mode).

    Returns
    -------
    model : torch.nn.Module
    checkpoint : dict
        The checkpoint (``config``, ``model_config``, ``input_dim``, ``n_classes``,
        ``target_names``, ``epoch``, ...).
    """
    import torch
    from pydantic import TypeAdapter

    path = Path(path)
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not (isinstance(checkpoint, dict) and checkpoint.get("format") in MODEL_FORMATS
            and "model_config" in checkpoint):
        raise ConfigError(f"{path}: not a model checkpoint of the moespec train stage")
    model_config = TypeAdapter(ModelConfig).validate_python(checkpoint["model_config"])
    model = model_config.build(input_dim=checkpoint["input_dim"], n_classes=checkpoint["n_classes"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def _write_checkpoints(cfg: Config, data: TrainingData, model: Any, optimizer: Any, scheduler: Any,
                       state: TrainState, out: Any) -> None:
    import torch

    common = {"format": CHECKPOINT_FORMAT, "config": config_dict(cfg), "model_config": config_dict(cfg.model),
              "input_dim": int(data.features.shape[1]), "n_classes": data.n_classes,
              "target_names": data.target_names}
    torch.save({**common, "epoch": state.best_epoch, "model": state.best_state}, out.side_file("best.pt"))
    torch.save({**common, "epoch": state.epoch, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict()}, out.side_file("final.pt"))


# --------------------------------------------------------------------------------------------------
# outputs


def _write_outputs(cfg: Config, data: TrainingData, model: Any, state: TrainState, train_index: np.ndarray,
                   val_index: np.ndarray, features: Any, targets: Any, split: dict[str, Any], out: Any) -> None:
    history = state.history
    out.write("curves/epoch", np.array([r["epoch"] for r in history], dtype=np.int64))
    out.write("curves/lr", np.array([r["lr"] for r in history], dtype=np.float64))
    for term in LOSS_TERMS[cfg.model.kind]:
        out.write(f"curves/train/{term}", np.array([r["train"][term] for r in history], dtype=np.float64))
        out.write(f"curves/val/{term}", np.array([r["val"][term] for r in history], dtype=np.float64))
    out.write("curves/val_accuracy", np.array([r["val_accuracy"] for r in history], dtype=np.float64))
    out.write("curves/expert_load", np.stack([r["expert_load"] for r in history]).astype(np.float64))
    out.write("curves/routing_entropy", np.stack([r["routing_entropy"] for r in history]).astype(np.float64))
    out.write("curves/collapsed", np.array([r["collapsed"] for r in history], dtype=bool))
    out.write("split/train_index", train_index)
    out.write("split/val_index", val_index)

    # Held-out routing of the model that is kept: the best one (final.pt is already written).
    model.load_state_dict(state.best_state)
    heldout = evaluate(model, features[split["val"]], targets[split["val"]], cfg.batch_size,
                       train_features=features[split["train"]], train_targets=targets[split["train"]])
    out.write("heldout/router_probs", heldout["router_probs"].astype(np.float32))
    out.write("heldout/selected", heldout["selected"])
    out.write("heldout/assignment", heldout["assignment"].astype(np.int64))
    out.write("heldout/domain", data.domain[val_index])
    out.write("heldout/label", data.label[val_index])
    if cfg.model.kind == "topk":
        out.write("heldout/target", data.targets[val_index])
        out.write("heldout/prediction", heldout["output"].argmax(axis=-1).astype(np.int64))
        out.write("target_names", data.target_names)
    else:
        out.write("heldout/embedding", heldout["output"].astype(np.float32))
    out.write("best_epoch", np.int64(state.best_epoch))
    out.write("epochs_run", np.int64(state.epoch))
    out.write("best_val_loss", np.float64(state.best_val_loss))
    for key, value in {"model_kind": cfg.model.kind, "target": cfg.model.target, "input": cfg.input,
                       "input_dim": int(data.features.shape[1]), "n_train": len(train_index),
                       "n_val": len(val_index), "heldout_model": "best", "stopped_early": state.stopped_early,
                       "val_accuracy_kind": "argmax" if cfg.model.kind == "topk" else "nearest_train_centroid"}.items():
        out.attrs[key] = value
    collapsed = any(r["collapsed"] for r in history)
    last = history[-1]
    out.summary.update(
        model=cfg.model.kind,
        final_train_loss={name: round(float(v), 4) for name, v in last["train"].items()},
        final_val_loss={name: round(float(v), 4) for name, v in last["val"].items()},
        epochs_run=state.epoch, best_epoch=state.best_epoch, best_val_loss=round(state.best_val_loss, 6),
        val_accuracy=round(heldout["accuracy"], 4), stopped_early=state.stopped_early,
        collapse_warning=collapsed, expert_load=np.round(heldout["expert_load"], 4).tolist(),
        routing_entropy=np.round(heldout["routing_entropy"], 4).tolist())
