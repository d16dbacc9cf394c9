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
curves/expert_load             (n_epochs, L, E)        share of the validation rows' routed slots
                                                       that go to expert e, per MoE layer (its load)
curves/routing_entropy         (n_epochs, L)           mean per-row routing entropy / log E
curves/collapsed               (n_epochs,) bool        a dead expert or one above collapse_threshold
                                                       (moespec.specialisation.metrics.collapse_report)
curves/step/index              (n_steps,) int64        optimiser steps (1-based)
curves/step/lr                 (n_steps,) float64      learning rate used by the step
curves/step/epoch              (n_steps,) int64        the epoch (1-based) the step belongs to
curves/step/train/<term>       (n_steps,) float64      mean of each loss term over the step's batches
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
dense/curves/val/total         (n_dense_epochs,)       the dense twin (``dense_baseline``): its validation
dense/curves/val_accuracy      (n_dense_epochs,)       loss and accuracy per epoch, its best validation
dense/best_val_loss, dense/val_accuracy  ()            loss and the held-out accuracy of its best weights
=============================  ======================  ==========================================

Side files: ``best.pt`` (the weights with the lowest validation loss) and ``final.pt`` (the last
weights with optimiser and scheduler states); load either with :func:`load_model`.
Summary: ``epochs_run``, ``best_epoch``, ``best_val_loss``, ``val_accuracy``, ``stopped_early``,
``collapse_warning``, ``expert_load``, ``routing_entropy``, ``params_total``, ``params_active``;
with ``dense_baseline``: ``dense_val_accuracy``, ``dense_best_val_loss``, ``dense_params_total``,
``dense_params_active``.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Literal, Optional

import numpy as np
from pydantic import Field

from moespec.artifacts import ArtifactReader, ArtifactWriter, DatasetSpec
from moespec.config import config_dict, config_yaml
from moespec.errors import DataError
from moespec.models import DictionaryMoEConfig, ModelConfig
from moespec.models.training import LoopConfig, lr_schedule
from moespec.specialisation.metrics import collapse_report
from moespec.stages.base import StageConfig

NAME = "train"
SCHEMA_VERSION = 1


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
        Warn when one expert takes more than this share of the validation rows' routed slots, or
        when an expert is dead (:func:`moespec.specialisation.metrics.collapse_report`).
    precision : {"auto", "float32", "bfloat16"}
        Training forward passes under bfloat16 autocast (weights, optimiser and losses stay
        float32) or in float32; ``auto`` is bfloat16 on a GPU and float32 on the CPU. Validation
        and the held-out outputs are always computed in float32.
    dense_baseline : bool
        Also train the model's dense twin (one expert, the MoE's active parameters; same data,
        optimiser, schedule and seed) and report it beside the MoE, so that "does the MoE help?"
        is answered in the same artifact.
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
    dense_baseline: bool = True
    seed: int = 0

    def loop(self) -> LoopConfig:
        """The shared training loop's settings: epochs, accumulation, clipping, evaluation per epoch."""
        return LoopConfig(
            epochs=self.epochs,
            grad_accumulation=self.grad_accumulation,
            max_grad_norm=self.max_grad_norm,
            eval_every="epoch",
            checkpoint_every=self.checkpoint_every,
            patience=self.patience,
            min_delta=self.min_delta,
        )

    def steps_per_epoch(self, n_train_rows: int) -> int:
        """Optimiser steps of one epoch over ``n_train_rows`` rows."""
        from moespec.models.training import row_batches

        return math.ceil(len(row_batches(np.arange(n_train_rows), self.batch_size)) / self.grad_accumulation)

    def scheduler(self, optimizer, n_train_rows: int):
        """The ``LambdaLR`` of ``schedule`` over the whole run (``epochs`` epochs of ``n_train_rows`` rows)."""
        import torch

        steps_per_epoch = self.steps_per_epoch(n_train_rows)
        factor = lr_schedule(
            self.schedule,
            self.warmup_steps,
            steps_per_epoch * self.epochs,
            step_every=self.step_epochs * steps_per_epoch,
            step_gamma=self.step_gamma,
        )
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    @property
    def dataset(self) -> str:
        """The input dataset: the reduced coordinates or the raw embeddings."""
        return "reduced" if self.input == "reduce" else "embeddings"


def inputs(cfg: Config) -> dict[str, str]:
    return {cfg.input: cfg.input}


def schema(cfg: Config) -> dict[str, DatasetSpec]:
    spec = {
        "curves/epoch": DatasetSpec(("n_epochs",), "int"),
        "curves/lr": DatasetSpec(("n_epochs",), "float"),
        "curves/val_accuracy": DatasetSpec(("n_epochs",), "float"),
        "curves/expert_load": DatasetSpec(("n_epochs", "L", "E"), "float"),
        "curves/routing_entropy": DatasetSpec(("n_epochs", "L"), "float"),
        "curves/collapsed": DatasetSpec(("n_epochs",), "bool"),
        "curves/step/index": DatasetSpec(("n_steps",), "int"),
        "curves/step/lr": DatasetSpec(("n_steps",), "float"),
        "curves/step/epoch": DatasetSpec(("n_steps",), "int"),
        "split/train_index": DatasetSpec(("n_train",), "int"),
        "split/val_index": DatasetSpec(("n_val",), "int"),
        "heldout/router_probs": DatasetSpec(("n_val", "L", "E"), "float"),
        "heldout/selected": DatasetSpec(("n_val", "L", "E"), "bool"),
        "heldout/assignment": DatasetSpec(("n_val", "L"), "int"),
        "heldout/domain": DatasetSpec(("n_val",), "int"),
        "heldout/label": DatasetSpec(("n_val",), "int"),
        "best_epoch": DatasetSpec((), "int"),
        "epochs_run": DatasetSpec((), "int"),
        "best_val_loss": DatasetSpec((), "float"),
        **cfg.model.heldout_schema(),
    }
    if cfg.dense_baseline:
        spec.update(
            {
                "dense/curves/val/total": DatasetSpec(("n_dense_epochs",), "float"),
                "dense/curves/val_accuracy": DatasetSpec(("n_dense_epochs",), "float"),
                "dense/best_val_loss": DatasetSpec((), "float"),
                "dense/val_accuracy": DatasetSpec((), "float"),
            }
        )
    for term in cfg.model.loss_terms:
        spec[f"curves/train/{term}"] = DatasetSpec(("n_epochs",), "float")
        spec[f"curves/val/{term}"] = DatasetSpec(("n_epochs",), "float")
        spec[f"curves/step/train/{term}"] = DatasetSpec(("n_steps",), "float")
    return spec


# --------------------------------------------------------------------------------------------------
# the recipe


def run(cfg: Config, inputs: dict[str, ArtifactReader], out: ArtifactWriter) -> None:
    """Train, checkpointing as it goes; write curves, checkpoints and held-out routing."""
    import torch

    from moespec.data.splits import stratified_split
    from moespec.models import rows
    from moespec.models.baseline import active_parameters
    from moespec.models.training import autocast_dtype

    reader = inputs[cfg.input]
    data = rows.load_training_data(cfg.model, reader, cfg.dataset)
    train_index, val_index = stratified_split(data.domain, cfg.validation_fraction, cfg.seed)
    _check_split(train_index, val_index)
    out.log.info(
        "train %s MoE on %d x %d %s rows (%d train, %d validation), target %s",
        cfg.model.kind,
        *data.features.shape,
        cfg.input,
        len(train_index),
        len(val_index),
        cfg.model.target,
    )
    device = torch.device(out.device)
    features, targets = torch.as_tensor(data.features, device=device), torch.as_tensor(data.targets, device=device)
    objective = rows.RowObjective(
        features,
        targets,
        torch.as_tensor(train_index, device=device),
        torch.as_tensor(val_index, device=device),
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        dtype=autocast_dtype(cfg.precision, device),
        collapse=partial(collapse_report, max_share=cfg.collapse_threshold),
    )
    identity = {"config": config_dict(cfg), "input_uid": reader.uid}
    model, optimizer, scheduler, state = _fit(cfg, cfg.model, data, objective, out, identity, "checkpoint.pt", "train")
    stage_config = identity["config"]
    rows.save_model(out.side_file("best.pt"), cfg.model, stage_config, data, state.best_state, epoch=state.best_epoch)
    rows.save_model(
        out.side_file("final.pt"),
        cfg.model,
        stage_config,
        data,
        model.state_dict(),
        epoch=state.epoch,
        optimizer=optimizer.state_dict(),
        scheduler=scheduler.state_dict(),
    )
    model.load_state_dict(state.best_state)  # the held-out outputs are those of the model that is kept
    heldout = objective.evaluate_all(model)
    _write_outputs(cfg, data, state, train_index, val_index, heldout, out)
    out.summary.update(params_total=sum(p.numel() for p in model.parameters()), params_active=active_parameters(model))
    if cfg.dense_baseline:
        twin_cfg = cfg.model.dense_twin(data.features.shape[1])
        out.log.info("dense baseline: the %s model with 1 expert and the MoE's active parameters", cfg.model.kind)
        dense, _, _, dense_state = _fit(
            cfg, twin_cfg, data, objective, out, identity, "dense_checkpoint.pt", "dense twin"
        )
        dense.load_state_dict(dense_state.best_state)
        _write_dense(dense_state, objective.evaluate_all(dense), dense, twin_cfg, out)
    for name in ("checkpoint.pt", "dense_checkpoint.pt"):
        (out.work_dir / name).unlink(missing_ok=True)  # the artifact now holds everything; nothing to resume


def _fit(
    cfg: Config, model_cfg, data, objective, out: ArtifactWriter, identity: dict, checkpoint_name: str, label: str
):
    """Build ``model_cfg``'s model and train it on ``objective`` with this config's optimiser, schedule and loop.

    ``checkpoint_name`` is its resumable checkpoint in the work folder; ``label`` names its progress bar.
    """
    import torch

    from moespec.models import rows
    from moespec.models.training import Checkpointer, fit

    model = rows.build_model(model_cfg, data, cfg.seed).to(torch.device(out.device))
    optimizer = rows.make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, kind=cfg.optimizer)
    n_train = len(objective.train_rows)
    scheduler = cfg.scheduler(optimizer, n_train)
    checkpoint = Checkpointer(out.work_dir / checkpoint_name, {**identity, "model": config_dict(model_cfg)}, NAME)
    bar = iter(out.progress(range(cfg.steps_per_epoch(n_train) * cfg.epochs), desc=f"{label} steps"))
    state = fit(
        model,
        optimizer,
        scheduler,
        objective,
        cfg.loop(),
        checkpoint=checkpoint,
        log=out.log,
        progress=lambda state: next(bar, None),
        on_evaluation=lambda record: _log_evaluation(cfg, record, out.log),
    )
    for _ in bar:  # close the bar (early stopping or a resumed run leaves steps in it)
        pass
    return model, optimizer, scheduler, state


def _write_dense(state, heldout: dict, model, twin_cfg, out: ArtifactWriter) -> None:
    """The dense twin's validation curve and held-out metrics, beside the MoE's."""
    from moespec.models.baseline import active_parameters

    out.write("dense/curves/val/total", np.array([r["val"]["total"] for r in state.history], dtype=np.float64))
    out.write("dense/curves/val_accuracy", np.array([r["val_accuracy"] for r in state.history], dtype=np.float64))
    out.write("dense/best_val_loss", np.float64(state.best_val_loss))
    out.write("dense/val_accuracy", np.float64(heldout["accuracy"]))
    params = sum(p.numel() for p in model.parameters())
    out.attrs["dense_model"] = config_yaml(twin_cfg)
    out.summary.update(
        dense_val_accuracy=round(heldout["accuracy"], 4),
        dense_best_val_loss=round(state.best_val_loss, 6),
        dense_params_total=params,
        dense_params_active=active_parameters(model),
    )


def _check_split(train_index: np.ndarray, val_index: np.ndarray) -> None:
    if len(train_index) < 2 or len(val_index) < 2:
        raise DataError(
            f"train: {len(train_index)} training and {len(val_index)} validation rows; "
            f"each needs at least 2 (more input rows or another validation_fraction)"
        )


def _log_evaluation(cfg: Config, record: dict, log) -> None:
    """One line per epoch (loss terms, accuracy, load, entropy); a warning where routing collapsed."""
    log.info(
        "epoch %d: train %s | val %s | val accuracy %.4f | load %s | entropy %s",
        record["epoch"],
        _fmt(record["train"]),
        _fmt(record["val"]),
        record["val_accuracy"],
        np.round(record["expert_load"], 3).tolist(),
        np.round(record["routing_entropy"], 3).tolist(),
    )
    if record["collapsed"]:
        log.warning(
            "routing collapse on validation rows after epoch %d: %s; consider a larger balance_loss_weight",
            record["epoch"],
            " | ".join(record["collapse_reasons"]),
        )


def _fmt(terms: dict[str, float]) -> str:
    return " ".join(f"{name} {value:.4g}" for name, value in terms.items())


# --------------------------------------------------------------------------------------------------
# outputs


def _write_outputs(
    cfg: Config, data, state, train_index: np.ndarray, val_index: np.ndarray, heldout: dict, out: ArtifactWriter
) -> None:
    history, steps = state.history, state.steps
    out.write("curves/epoch", np.array([r["epoch"] for r in history], dtype=np.int64))
    out.write("curves/lr", np.array([r["lr"] for r in history], dtype=np.float64))
    out.write("curves/step/index", np.array([r["step"] for r in steps], dtype=np.int64))
    out.write("curves/step/lr", np.array([r["lr"] for r in steps], dtype=np.float64))
    out.write("curves/step/epoch", np.array([r["epoch"] for r in steps], dtype=np.int64))
    for term in cfg.model.loss_terms:
        out.write(f"curves/train/{term}", np.array([r["train"][term] for r in history], dtype=np.float64))
        out.write(f"curves/val/{term}", np.array([r["val"][term] for r in history], dtype=np.float64))
        out.write(f"curves/step/train/{term}", np.array([r["train"][term] for r in steps], dtype=np.float64))
    out.write("curves/val_accuracy", np.array([r["val_accuracy"] for r in history], dtype=np.float64))
    out.write("curves/expert_load", np.stack([r["expert_load"] for r in history]).astype(np.float64))
    out.write("curves/routing_entropy", np.stack([r["routing_entropy"] for r in history]).astype(np.float64))
    out.write("curves/collapsed", np.array([r["collapsed"] for r in history], dtype=bool))
    out.write("split/train_index", train_index)
    out.write("split/val_index", val_index)
    out.write("heldout/router_probs", heldout["router_probs"].astype(np.float32))
    out.write("heldout/selected", heldout["selected"])
    out.write("heldout/assignment", heldout["assignment"].astype(np.int64))
    out.write("heldout/domain", data.domain[val_index])
    out.write("heldout/label", data.label[val_index])
    for name, value in cfg.model.heldout_outputs(heldout["output"], data.targets[val_index], data.target_names).items():
        out.write(name, value)
    out.write("best_epoch", np.int64(state.best_epoch))
    out.write("epochs_run", np.int64(state.epoch))
    out.write("best_val_loss", np.float64(state.best_val_loss))
    for key, value in {
        "model_kind": cfg.model.kind,
        "target": cfg.model.target,
        "input": cfg.input,
        "input_dim": int(data.features.shape[1]),
        "n_train": len(train_index),
        "n_val": len(val_index),
        "heldout_model": "best",
        "stopped_early": state.stopped_early,
        "val_accuracy_kind": heldout["accuracy_kind"],
    }.items():
        out.attrs[key] = value
    last = history[-1]
    out.summary.update(
        model=cfg.model.kind,
        final_train_loss={name: round(float(v), 4) for name, v in last["train"].items()},
        final_val_loss={name: round(float(v), 4) for name, v in last["val"].items()},
        epochs_run=state.epoch,
        best_epoch=state.best_epoch,
        best_val_loss=round(state.best_val_loss, 6),
        val_accuracy=round(heldout["accuracy"], 4),
        stopped_early=state.stopped_early,
        collapse_warning=any(r["collapsed"] for r in history),
        expert_load=np.round(heldout["expert_load"], 4).tolist(),
        routing_entropy=np.round(heldout["routing_entropy"], 4).tolist(),
    )
