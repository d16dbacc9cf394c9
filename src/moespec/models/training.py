"""One training loop for every stage that trains: ``fit``, evaluation, checkpoints and resume.

The ``train`` stage (MoE models on embedding rows), the ablate stage's seed control (the same model
retrained with another seed), the ``lm`` stage (decoder language models) and the ``lora`` stage
(adapters over a base LM) all train through :func:`fit`. What differs between them is the
:class:`Objective`: which batches an epoch has, what one batch's forward and backward pass is, and
what an evaluation measures. What they share lives here once: gradient accumulation windows,
clipping, the optimiser and scheduler steps, evaluation every N steps or every epoch, keeping the
best weights, early stopping, and checkpoints that resume to bit-identical weights.

Determinism: the batches of epoch ``e`` must be a function of ``(seed, e)`` alone (see
:func:`epoch_order`), so resuming needs no data-loader state; dropout and other random draws come
from torch's global generator, whose state every checkpoint stores and restores. Checkpoints are
written only at optimiser-step boundaries, so no half-accumulated gradient is ever stored.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Protocol, Sequence, Union

import numpy as np

from moespec.errors import ConfigError

#: Version tag of the resumable checkpoints :class:`Checkpointer` writes.
CHECKPOINT_FORMAT = "moespec.loop/1"


class Objective(Protocol):
    """What a stage supplies to :func:`fit`."""

    def batches(self, epoch: int) -> Sequence[Any]:
        """The batches of one pass over the training data; deterministic in (seed, ``epoch``)."""

    def train_batch(self, model: Any, batch: Any, scale: float) -> tuple[dict[str, float], float]:
        """Forward and backward one batch, adding ``scale`` times its gradient to ``.grad``.

        Returns the batch's loss terms (``"total"`` is the one minimised) and its weight in the
        running means (rows, or tokens).
        """

    def evaluate(self, model: Any) -> dict[str, Any]:
        """Validation metrics of ``model``; must hold ``"val_loss"`` (lower is better)."""


@dataclass(frozen=True)
class LoopConfig:
    """How long to train and when to evaluate and checkpoint.

    Attributes
    ----------
    epochs : int, optional
        Passes over the training data; None: as many as ``max_steps`` needs.
    max_steps : int, optional
        Optimiser-step budget; training stops at whichever of ``epochs`` and ``max_steps`` ends first.
    grad_accumulation : int
        Batches per optimiser step (the last window of an epoch may be shorter; each batch's
        gradient is scaled by 1 / window length).
    max_grad_norm : float, optional
        Clip the global gradient norm before each optimiser step.
    eval_every : int or "epoch" or None
        Optimiser steps between evaluations, at the end of every epoch, or never. With a step
        interval, training also ends with an evaluation of the final weights.
    checkpoint_every : int
        Optimiser steps between resumable checkpoints (one is also written at every epoch end).
    patience : int, optional
        Stop after this many evaluations without a ``val_loss`` improvement of ``min_delta``.
    min_delta : float
    """

    epochs: Optional[int] = None
    max_steps: Optional[int] = None
    grad_accumulation: int = 1
    max_grad_norm: Optional[float] = None
    eval_every: Union[int, Literal["epoch"], None] = "epoch"
    checkpoint_every: int = 200
    patience: Optional[int] = None
    min_delta: float = 0.0

    def __post_init__(self) -> None:
        if self.epochs is None and self.max_steps is None:
            raise ValueError("LoopConfig: give epochs, max_steps or both")


@dataclass
class TrainState:
    """Where training is and what it has recorded: everything a checkpoint restores.

    Attributes
    ----------
    epoch : int
        Epochs completed.
    batch_in_epoch : int
        Batches of the current epoch already consumed.
    step : int
        Optimiser steps taken.
    history : list of dict
        One record per evaluation: ``step``, ``epoch``, ``lr``, ``train`` (term -> weighted mean
        since the previous evaluation), then what the objective's ``evaluate`` returned.
    steps : list of dict
        One record per optimiser step: ``step``, ``epoch`` (1-based, the pass it belongs to), ``lr``
        (used by that step), ``train`` (term -> weighted mean over its accumulation window).
    best_val_loss, best_step, best_epoch
        The evaluation with the lowest ``val_loss`` so far.
    best_state : dict of tensors, optional
        A CPU copy of the model's weights at that evaluation.
    """

    epoch: int = 0
    batch_in_epoch: int = 0
    step: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    since_eval: dict[str, float] = field(default_factory=dict)  # weighted term sums since the last evaluation
    since_eval_weight: float = 0.0
    window: dict[str, float] = field(default_factory=dict)  # weighted term sums of the open accumulation window
    window_weight: float = 0.0
    best_val_loss: float = math.inf
    best_step: int = 0
    best_epoch: int = 0
    best_state: Optional[dict[str, Any]] = None
    evaluations_without_improvement: int = 0
    stopped_early: bool = False


def fit(
    model: Any,
    optimizer: Any,
    scheduler: Any,
    objective: Objective,
    loop: LoopConfig,
    *,
    checkpoint: Optional["Checkpointer"] = None,
    log: Any = None,
    progress: Optional[Callable[[TrainState], None]] = None,
    on_evaluation: Optional[Callable[[dict[str, Any]], None]] = None,
) -> TrainState:
    """Train ``model`` on ``objective`` until the budget of ``loop`` is spent or early stopping.

    A checkpoint of this run found by ``checkpoint`` is resumed first. ``progress(state)`` is
    called after every optimiser step, ``on_evaluation(record)`` after every evaluation (default:
    one log line with the step, the train and the validation loss). Returns the final state; the
    model holds the last weights (``state.best_state`` the best ones).
    """
    if on_evaluation is None and log is not None:
        on_evaluation = partial(_log_evaluation, log)
    state = (checkpoint.resume(model, optimizer, scheduler) if checkpoint else None) or TrainState()
    if state.step and log is not None:
        log.info(
            "resumed from %s at epoch %d, batch %d (step %d)",
            checkpoint.path,
            state.epoch,
            state.batch_in_epoch,
            state.step,
        )
    save = (lambda: checkpoint.save(model, optimizer, scheduler, state)) if checkpoint else (lambda: None)
    while not _budget_spent(state, loop) and not state.stopped_early:
        batches = objective.batches(state.epoch)
        model.train()
        for index in range(state.batch_in_epoch, len(batches)):
            window_start = index // loop.grad_accumulation * loop.grad_accumulation
            window_end = min(len(batches), window_start + loop.grad_accumulation)
            terms, weight = objective.train_batch(model, batches[index], 1.0 / (window_end - window_start))
            _accumulate(state, terms, weight)
            state.batch_in_epoch = index + 1
            if index + 1 == window_end:
                _optimiser_step(model, optimizer, scheduler, loop, state)
                if isinstance(loop.eval_every, int) and state.step % loop.eval_every == 0:
                    _evaluate(model, scheduler, objective, loop, state, log, on_evaluation)
                    model.train()
                if state.step % loop.checkpoint_every == 0:
                    save()
                if progress is not None:
                    progress(state)
                if _budget_spent(state, loop) or state.stopped_early:
                    break
        if state.batch_in_epoch == len(batches):
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if loop.eval_every == "epoch":
                _evaluate(model, scheduler, objective, loop, state, log, on_evaluation)
            save()
    if isinstance(loop.eval_every, int) and (not state.history or state.history[-1]["step"] != state.step):
        _evaluate(model, scheduler, objective, loop, state, log, on_evaluation)
    return state


def _budget_spent(state: TrainState, loop: LoopConfig) -> bool:
    return (loop.epochs is not None and state.epoch >= loop.epochs) or (
        loop.max_steps is not None and state.step >= loop.max_steps
    )


def _accumulate(state: TrainState, terms: Mapping[str, float], weight: float) -> None:
    for name, value in terms.items():
        state.window[name] = state.window.get(name, 0.0) + value * weight
        state.since_eval[name] = state.since_eval.get(name, 0.0) + value * weight
    state.window_weight += weight
    state.since_eval_weight += weight


def _optimiser_step(model: Any, optimizer: Any, scheduler: Any, loop: LoopConfig, state: TrainState) -> None:
    import torch

    if loop.max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), loop.max_grad_norm)
    lr = float(scheduler.get_last_lr()[0])
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad()
    state.step += 1
    state.steps.append(
        {"step": state.step, "epoch": state.epoch + 1, "lr": lr, "train": _means(state.window, state.window_weight)}
    )
    state.window, state.window_weight = {}, 0.0


def _means(sums: Mapping[str, float], weight: float) -> dict[str, float]:
    return {name: total / max(weight, 1e-300) for name, total in sums.items()}


def _log_evaluation(log: Any, record: dict[str, Any]) -> None:
    log.info(
        "step %d (epoch %d): train loss %.4g | val loss %.4g",
        record["step"],
        record["epoch"],
        record["train"].get("total", math.nan),
        record["val_loss"],
    )


def _evaluate(
    model: Any,
    scheduler: Any,
    objective: Objective,
    loop: LoopConfig,
    state: TrainState,
    log: Any,
    on_evaluation: Optional[Callable[[dict[str, Any]], None]],
) -> None:
    """Evaluate, record, keep the best weights and decide early stopping."""
    metrics = objective.evaluate(model)
    record = {
        "step": state.step,
        "epoch": state.epoch,
        "lr": float(scheduler.get_last_lr()[0]),
        "train": _means(state.since_eval, state.since_eval_weight),
        **metrics,
    }
    state.history.append(record)
    state.since_eval, state.since_eval_weight = {}, 0.0
    if on_evaluation is not None:
        on_evaluation(record)
    if metrics["val_loss"] < state.best_val_loss - loop.min_delta:
        state.best_val_loss, state.best_step, state.best_epoch = float(metrics["val_loss"]), state.step, state.epoch
        state.best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        state.evaluations_without_improvement = 0
    else:
        state.evaluations_without_improvement += 1
    if (
        loop.patience is not None
        and state.evaluations_without_improvement >= loop.patience
        and not _budget_spent(state, loop)
    ):
        state.stopped_early = True
        if log is not None:
            log.info(
                "early stop at step %d (epoch %d): no validation improvement for %d evaluations "
                "(best at epoch %d, step %d)",
                state.step,
                state.epoch,
                loop.patience,
                state.best_epoch,
                state.best_step,
            )


# --------------------------------------------------------------------------------------------------
# batches and schedules


def epoch_order(n_rows: int, seed: int, epoch: int):
    """The shuffled row order of one epoch: a function of (seed, epoch) only, so resuming needs no RNG state."""
    import torch

    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n_rows, generator=generator)


def row_batches(order: Any, batch_size: int) -> list[Any]:
    """Consecutive batches of ``order``; a last batch of one row joins the previous one (pairs need 2)."""
    batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]
    if len(batches) > 1 and len(batches[-1]) < 2:
        batches[-2:] = [order[-(len(batches[-2]) + len(batches[-1])) :]]
    return batches


def lr_schedule(
    kind: str, warmup_steps: int, total_steps: int, *, step_every: int = 0, step_gamma: float = 0.1
) -> Callable[[int], float]:
    """Multiplier of the base learning rate after ``step`` optimiser steps (for ``LambdaLR``).

    Linear warm-up over ``warmup_steps``, then ``constant``, ``cosine`` decay to 0 at
    ``total_steps`` (Loshchilov & Hutter 2017, SGDR, eq. 5 without restarts), or ``step``:
    multiplied by ``step_gamma`` every ``step_every`` steps.
    """
    if kind not in ("constant", "cosine", "step"):
        raise ValueError(f"unknown learning-rate schedule {kind!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "cosine":
            progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
            return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
        if kind == "step":
            return step_gamma ** (step // max(1, step_every))
        return 1.0

    return factor


def autocast_dtype(precision: str, device: Any) -> Any:
    """The dtype of training forward passes under autocast; None for float32.

    ``auto`` is bfloat16 on a GPU and float32 elsewhere (CPU bfloat16 matmuls are slower than
    float32 ones on most CPUs without AMX).
    """
    import torch

    if precision == "auto":
        precision = "bfloat16" if torch.device(device).type == "cuda" else "float32"
    return torch.bfloat16 if precision == "bfloat16" else None


#: Training steps below this many FLOP run on one CPU thread (:func:`threads_for_step`).
SMALL_STEP_FLOPS = 2e9


@contextlib.contextmanager
def threads_for_step(step_flops: float, device: Any, log: Any = None):
    """One CPU thread for training steps too small to share (the thread count is restored afterwards).

    A step of a few hundred MFLOP per thread spends its time in OpenMP barriers: on a shared
    2-core machine a d=64, 2-block LM's step (0.8 GFLOP) took 100 ms on one thread and
    940-2,200 ms on two (docs/lm.md). Larger steps, and GPU steps, keep the threads they were given.
    """
    import torch

    threads = torch.get_num_threads()
    small = torch.device(device).type == "cpu" and threads > 1 and step_flops < SMALL_STEP_FLOPS
    if small:
        if log is not None:
            log.info(
                "training step of %.2g FLOP on the CPU: 1 thread instead of %d (barrier-bound)", step_flops, threads
            )
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if small:
            torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# checkpoints


class Checkpointer:
    """Resumable checkpoints of one training run: model, optimiser, scheduler, torch RNG and progress.

    Parameters
    ----------
    path : Path
        The checkpoint file (written as ``<path>.tmp``, then renamed).
    identity : dict
        What makes the run this run (its resolved config and input uids); a checkpoint whose
        identity differs is refused, naming the differing keys.
    section : str
        The config section named in messages (``train``, ``lm``, ...).
    """

    def __init__(self, path: Path, identity: Mapping[str, Any], section: str):
        self.path, self.identity, self.section = Path(path), dict(identity), section

    def save(self, model: Any, optimizer: Any, scheduler: Any, state: TrainState) -> None:
        import torch

        payload = {
            "format": CHECKPOINT_FORMAT,
            "identity": self.identity,
            "model": model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "torch_rng": torch.random.get_rng_state(),
            "state": _state_to_checkpoint(state),
        }
        if torch.cuda.is_available():
            payload["cuda_rng"] = torch.cuda.get_rng_state_all()
        tmp = self.path.with_name(self.path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, self.path)

    def resume(self, model: Any, optimizer: Any, scheduler: Any) -> Optional[TrainState]:
        """Restore everything from the checkpoint and return its state; None when there is none."""
        import torch

        if not self.path.exists():
            return None
        checkpoint = self._load()
        differences = differences_between(checkpoint.get("identity", {}), self.identity, self.section)
        if differences:
            raise ConfigError(
                f"{self.path}: checkpoint was written by a different run (differs in: "
                f"{', '.join(differences[:8])}); remove it or restore that config"
            )
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        torch.random.set_rng_state(checkpoint["torch_rng"])
        if "cuda_rng" in checkpoint and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(checkpoint["cuda_rng"])
        return _state_from_checkpoint(checkpoint["state"])

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)

    def _load(self) -> dict[str, Any]:
        import torch

        try:
            checkpoint = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a truncated or foreign file
            raise ConfigError(f"{self.path}: not a readable moespec checkpoint: {e}") from e
        found = checkpoint.get("format") if isinstance(checkpoint, dict) else None
        if found != CHECKPOINT_FORMAT:
            raise ConfigError(
                f"{self.path}: not a resumable moespec checkpoint (format {found!r}, expected "
                f"{CHECKPOINT_FORMAT!r}); remove it to start this task afresh"
            )
        return checkpoint


def differences_between(old: Any, new: Any, prefix: str) -> list[str]:
    """Dotted keys (with old -> new values) where two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        found = []
        for key in sorted(set(old) | set(new)):
            found += differences_between(old.get(key), new.get(key), f"{prefix}.{key}")
        return found
    return [] if old == new else [f"{prefix} ({old!r} -> {new!r})"]


def _state_to_checkpoint(state: TrainState) -> dict[str, Any]:
    """The state as what ``torch.load(weights_only=True)`` accepts (arrays become tensors)."""
    plain = {k: v for k, v in state.__dict__.items() if k != "best_state"}
    return {**_to_torch(plain), "best_state": state.best_state}


def _state_from_checkpoint(saved: dict[str, Any]) -> TrainState:
    best_state = saved.pop("best_state", None)
    return TrainState(**_to_numpy(saved), best_state=best_state)


def _to_torch(value: Any) -> Any:
    import torch

    if isinstance(value, dict):
        return {k: _to_torch(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_torch(v) for v in value]
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, np.generic):
        return value.item()
    return value


def _to_numpy(value: Any) -> Any:
    import torch

    if isinstance(value, dict):
        return {k: _to_numpy(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_to_numpy(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.numpy()
    return value
