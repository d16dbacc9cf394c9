"""MoE models trained on embedding rows: the data, the training objective, evaluation and saved models.

Shared by the ``train`` stage (which fits a model) and the ``ablate`` stage (which loads it, and
retrains it with other seeds for its seed control), so that neither reaches into the other. The
loop itself is :func:`moespec.models.training.fit`; :class:`RowObjective` is what it trains on:
shuffled batches of rows, one forward and backward pass per batch, and a validation pass that
measures the loss terms, accuracy and routing.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from moespec.errors import ConfigError, DataError
from moespec.models.training import epoch_order, row_batches

#: Version tag of the saved models (``best.pt``, ``final.pt``) the train stage writes.
MODEL_FORMAT = "moespec.train/2"
#: Formats whose model weights :func:`load_model` reads (the weights did not change between them).
MODEL_FORMATS = ("moespec.train/1", MODEL_FORMAT)


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


def load_training_data(model_cfg: Any, reader: Any, dataset: str) -> TrainingData:
    """Read the rows of ``dataset`` (``reduced`` or ``embeddings``) and the targets ``model_cfg`` trains on."""
    features = np.asarray(reader[dataset][()], dtype=np.float32)
    if features.ndim != 2 or len(features) == 0:
        raise DataError(f"train: input dataset {dataset!r} has shape {features.shape}; expected (N, D) with N > 0")
    bad_rows = np.flatnonzero(~np.isfinite(features).all(axis=1))
    if len(bad_rows):
        raise DataError(f"train: {len(bad_rows)} input rows hold NaN or inf (first: row {bad_rows[0]})")
    domain = reader.read("domain").astype(np.int64)
    label = reader.read("label").astype(np.int64)
    target = model_cfg.target
    if target in ("label", "domain_label") and (label < 0).any():
        raise DataError(
            f"train.model.{model_cfg.target_key}: {target!r} needs a label on every row, but "
            f"{int((label < 0).sum())} of {len(label)} input rows are unlabelled (label = -1); "
            f"use 'domain' or give every source labels"
        )
    names = {
        key: [str(n) for n in reader.read(key)] if key in reader else [] for key in ("domain_names", "label_names")
    }
    try:
        targets, n_classes, target_names = model_cfg.training_targets(
            domain, label, names["domain_names"], names["label_names"]
        )
    except ValueError as e:
        raise DataError(f"train.model.{model_cfg.target_key}: {e}") from e
    return TrainingData(features, domain, label, targets, n_classes, target_names)


def build_model(model_cfg: Any, data: TrainingData, seed: int) -> Any:
    """Build ``model_cfg``'s model for ``data``; a mismatch is a ConfigError naming ``train.model``."""
    try:
        return model_cfg.build(input_dim=data.features.shape[1], n_classes=data.n_classes, seed=seed)
    except ValueError as e:
        raise ConfigError(f"train.model: {e}") from e


# --------------------------------------------------------------------------------------------------
# the objective


class RowObjective:
    """Batches of shuffled training rows (see :class:`moespec.models.training.Objective`).

    Parameters
    ----------
    features : tensor of shape (n_samples, input_dim)
    targets : tensor of shape (n_samples,) or (n_samples, 2)
    train_rows, val_rows : tensor of int64
        Row indices of the two splits (``val_rows`` may be None when nothing is evaluated).
    batch_size, seed : int
        Rows per batch; the shuffle of epoch ``e`` comes from ``(seed, e)``.
    dtype : torch.dtype, optional
        Autocast dtype of the training forward passes (None: float32, no autocast).
    collapse : callable, optional
        ``collapse(expert_load) -> (collapsed, reasons)``, recorded at every evaluation.
    """

    def __init__(
        self,
        features: Any,
        targets: Any,
        train_rows: Any,
        val_rows: Any,
        *,
        batch_size: int,
        seed: int,
        dtype: Any = None,
        collapse: Any = None,
    ):
        self.features, self.targets = features, targets
        self.train_rows, self.val_rows = train_rows, val_rows
        self.batch_size, self.seed, self.dtype, self.collapse = batch_size, seed, dtype, collapse

    def batches(self, epoch: int) -> list[Any]:
        order = epoch_order(len(self.train_rows), self.seed, epoch).to(self.train_rows.device)
        return [self.train_rows[batch] for batch in row_batches(order, self.batch_size)]

    def train_batch(self, model: Any, rows: Any, scale: float) -> tuple[dict[str, float], float]:
        return train_batch(model, self.features[rows], self.targets[rows], scale, self.dtype), len(rows)

    def evaluate(self, model: Any) -> dict[str, Any]:
        metrics = self.evaluate_all(model)
        record = {
            "val_loss": metrics["loss"]["total"],
            "val": metrics["loss"],
            "val_accuracy": metrics["accuracy"],
            "expert_load": metrics["expert_load"],
            "routing_entropy": metrics["routing_entropy"],
        }
        if self.collapse is not None:
            record["collapsed"], record["collapse_reasons"] = self.collapse(metrics["expert_load"])
        return record

    def evaluate_all(self, model: Any) -> dict[str, Any]:
        """Everything :func:`evaluate` measures on the validation rows (outputs and routing per row included)."""
        return evaluate(
            model,
            self.features[self.val_rows],
            self.targets[self.val_rows],
            self.batch_size,
            train_features=self.features[self.train_rows],
            train_targets=self.targets[self.train_rows],
        )


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


def make_optimizer(model: Any, *, lr: float, weight_decay: float, kind: str) -> Any:
    """Fused Adam(W) over one flat buffer of the model's parameters (:mod:`moespec.models.optim`).

    On these small models the per-tensor bookkeeping of an optimiser step is a visible share of a
    training step. Same update, deterministic on CPU. Gradients are views of one buffer: zero them
    with ``optimizer.zero_grad()``, never by setting them to None.
    """
    from moespec.models.optim import flat_adam

    return flat_adam(model, lr=lr, weight_decay=weight_decay, kind=kind)


# --------------------------------------------------------------------------------------------------
# evaluation


def evaluate(
    model: Any, features: Any, targets: Any, batch_size: int, *, train_features: Any = None, train_targets: Any = None
) -> dict[str, Any]:
    """Loss terms, accuracy and routing of a model on held-out rows (eval mode, no gradient).

    Returns
    -------
    dict
        ``loss`` (term -> row-weighted mean over fixed batches), ``accuracy``, ``router_probs``
        (n, L, E), ``selected`` (n, L, E) bool, ``assignment`` (n, L) top-1 expert,
        ``expert_load`` (L, E) share of routed slots per expert (each row fills k slots),
        ``routing_entropy`` (L,), ``output`` (n, ...) the model output.
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
    slots = chosen.float().sum(dim=0)  # (L, E) routed slots per expert
    accuracy = ACCURACY[model.accuracy_kind](model, output, targets, train_features, train_targets, batch_size)
    return {
        "loss": {name: total / len(features) for name, total in sums.items()},
        "accuracy": accuracy,
        "accuracy_kind": model.accuracy_kind,
        "router_probs": router_probs.cpu().numpy(),
        "selected": chosen.cpu().numpy(),
        "assignment": router_probs.argmax(dim=-1).cpu().numpy(),
        "expert_load": (slots / slots.sum(dim=-1, keepdim=True).clamp_min(1)).cpu().numpy().astype(np.float64),
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


def argmax_accuracy(model: Any, output: Any, targets: Any, *_: Any) -> float:
    """Classifier: share of rows whose highest logit is the target class."""
    return float((output.argmax(dim=-1) == targets).float().mean())


def centroid_accuracy(
    model: Any, output: Any, targets: Any, train_features: Any, train_targets: Any, batch_size: int
) -> float:
    """Dictionary MoE: share of rows whose projection is nearest the centroid of its own pair key.

    The centroids are the mean projections of the training rows of each key; NaN without training rows.
    """
    import torch

    if train_features is None:
        return float("nan")
    with torch.no_grad():
        train_embedding = torch.cat(
            [
                model(train_features[rows])[0]
                for rows in row_batches(torch.arange(len(train_features), device=train_features.device), batch_size)
            ]
        )
    keys, key_id = torch.unique(
        torch.cat([train_targets, targets]).reshape(len(train_targets) + len(targets), -1), dim=0, return_inverse=True
    )
    train_id, val_id = key_id[: len(train_targets)], key_id[len(train_targets) :]
    centroids = torch.zeros(len(keys), train_embedding.shape[-1], device=output.device)
    centroids.index_add_(0, train_id, train_embedding)
    counts = torch.bincount(train_id, minlength=len(keys))
    centroids = centroids / counts.clamp_min(1).unsqueeze(-1)
    distances = torch.cdist(output, centroids).masked_fill(~(counts > 0), float("inf"))
    return float((distances.argmin(dim=-1) == val_id).float().mean())


#: The validation accuracy of each model (``model.accuracy_kind``).
ACCURACY = {"argmax": argmax_accuracy, "nearest_train_centroid": centroid_accuracy}


# --------------------------------------------------------------------------------------------------
# saved models


def save_model(path: Path, model_cfg: Any, stage_config: dict, data: TrainingData, weights: dict, **extra: Any) -> None:
    """Write a loadable model file (``best.pt`` / ``final.pt``): weights, configs and what rebuilding needs."""
    import torch

    torch.save(
        {
            "format": MODEL_FORMAT,
            "config": stage_config,
            "model_config": model_cfg.model_dump(mode="json"),
            "input_dim": int(data.features.shape[1]),
            "n_classes": data.n_classes,
            "target_names": data.target_names,
            "model": weights,
            **extra,
        },
        path,
    )


def load_model(path: Path | str, *, map_location: str = "cpu"):
    """Rebuild a trained model from a ``best.pt`` or ``final.pt`` of the train stage (eval mode).

    Returns
    -------
    model : torch.nn.Module
    checkpoint : dict
        The checkpoint (``config``, ``model_config``, ``input_dim``, ``n_classes``,
        ``target_names``, ``epoch``, ...).
    """
    import torch
    from pydantic import TypeAdapter

    from moespec.models import ModelConfig

    path = Path(path)
    checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    if not (
        isinstance(checkpoint, dict) and checkpoint.get("format") in MODEL_FORMATS and "model_config" in checkpoint
    ):
        raise ConfigError(f"{path}: not a model checkpoint of the moespec train stage")
    model_config = TypeAdapter(ModelConfig).validate_python(checkpoint["model_config"])
    model = model_config.build(input_dim=checkpoint["input_dim"], n_classes=checkpoint["n_classes"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint
