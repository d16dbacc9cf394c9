"""The ablate stage on the model of the ``train`` stage, evaluated on the rows it held out (or all rows).

Every ablation of one MoE layer (all single experts and the random control sets) runs in one
batched pass of the model library (``Ablation`` masks with a leading ablation axis): the
computation before the ablated layer, and the expert outputs of that layer, are shared by all of
them. The seed control retrains the same model config with other seeds on the same split through
the shared training loop (:func:`moespec.models.training.fit`), for the epochs of the compared
checkpoint.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import numpy as np

from moespec.artifacts import ArtifactReader, ArtifactWriter
from moespec.errors import ConfigError, DataError
from moespec.models import rows as row_models
from moespec.specialisation import ablation as tables_
from moespec.specialisation import metrics as spec
from moespec.specialisation.ablation import AblationPlan, Groups
from moespec.stages.ablate import common


def run(cfg: Any, inputs: dict[str, ArtifactReader], out: ArtifactWriter) -> None:
    import torch

    from moespec.stages import train

    train_reader, data_reader = inputs["train"], inputs["data"]
    model, checkpoint = row_models.load_model(train_reader.path.parent / f"{cfg.source.checkpoint}.pt")
    train_cfg = train.Config.model_validate(checkpoint["config"])  # the config the weights were trained with
    if train_cfg.input != cfg.source.input:
        raise ConfigError(
            f"ablate.source.input: the train stage read {train_cfg.input!r}, this says "
            f"{cfg.source.input!r}; set ablate.source.input: {train_cfg.input}"
        )
    data = row_models.load_training_data(train_cfg.model, data_reader, train_cfg.dataset)
    rows = (
        train_reader.read("split/val_index") if cfg.source.split == "heldout" else np.arange(len(data.features))
    ).astype(np.int64)
    kind, metric = train_cfg.model.kind, train_cfg.model.ablation_metric
    groups = _groups(cfg, data, data_reader, rows, inputs.get("strata"), train_cfg.model)
    model = model.to(torch.device(out.device))
    features = torch.as_tensor(data.features[rows], device=out.device)
    layers, experts = common.check_indices(cfg, model.n_moe_layers, model.n_experts)
    out.log.info(
        "ablate the %s MoE of train %s (%s.pt, epoch %s) on %d %s rows: %d MoE layer(s) x %d experts, modes %s",
        kind,
        train_reader.uid,
        cfg.source.checkpoint,
        checkpoint.get("epoch"),
        len(rows),
        cfg.source.split,
        model.n_moe_layers,
        model.n_experts,
        ", ".join(cfg.modes),
    )

    baseline = trained_pass(model, features, None, cfg.batch_size)
    tables: dict[str, Any] = {"eval/row": rows, "routing/row": rows, **common.group_tables(groups)}
    routing_tables, routing, plan = common.routing_analysis(
        cfg,
        baseline["probs"][0],
        baseline["expert_index"][0],
        groups,
        [f"layer {i}" for i in range(model.n_moe_layers)],
        layers,
        experts,
    )
    tables.update(routing_tables)
    targets = data.targets[rows]
    base_values = METRIC_VALUES[kind](baseline, targets)[0]
    tables.update(common.baseline_tables(cfg, metric, base_values, groups))
    results, extra = {}, {}
    for mode in cfg.modes:
        outcome = ablated_passes(model, features, plan, common.LIBRARY_MODE[mode], cfg.batch_size, model.n_moe_layers)
        results[mode] = common.comparison(
            cfg, mode, metric, base_values, METRIC_VALUES[kind](outcome, targets), plan, groups
        )
        tables.update(results[mode])
        change, changed = routing_change(f"ablation/{mode}", outcome, baseline, plan, groups)
        tables.update(change)
        if "embedding" in outcome:  # the dictionary MoE: losses of the whole evaluated set
            found, harm = dictionary_extras(cfg, mode, model, outcome, baseline, targets, plan, groups)
            tables.update(found)
            if mode == cfg.modes[0]:
                extra = {**harm, "assignment_changed": changed}
    seed_tables, seed_summary = _seed_control(
        cfg, train_cfg, data, train_reader, checkpoint, features, rows, groups, base_values, metric
    )
    tables.update(seed_tables)
    common.write_tables(out, tables)
    out.attrs["source"], out.attrs["model_kind"] = "trained", kind
    common.summarise(
        cfg,
        out,
        plan,
        routing,
        results,
        metric,
        groups,
        float(tables[f"baseline/{metric}"]),
        {"source": "trained", "model": kind, "n_eval": len(rows), **seed_summary},
        extra,
    )


# --------------------------------------------------------------------------------------------------
# groups


def _groups(
    cfg: Any, data: Any, data_reader: ArtifactReader, rows: np.ndarray, strata: Optional[ArtifactReader], model_cfg: Any
) -> Groups:
    """Group codes of the evaluated rows: domain always, then the other keys of ``cfg.by``."""
    codes, names = {}, {}
    for key in ["domain", *(k for k in cfg.by if k != "domain")]:
        if key == "domain":
            codes[key], names[key] = data.domain[rows], _names(data_reader, "domain_names")
        elif key == "class" and data.n_classes is not None:  # a classifier: its own target classes
            codes[key], names[key] = data.targets[rows], list(data.target_names)
        elif key == "class":
            unlabelled = int((data.label[rows] < 0).sum())
            if unlabelled:
                raise DataError(
                    f"ablate.by: 'class' needs a label on every evaluated row, but {unlabelled} of "
                    f"{len(rows)} are unlabelled; remove 'class' from ablate.by or label the data"
                )
            codes[key], names[key] = data.label[rows], _names(data_reader, "label_names")
        elif key == "stratum":
            codes[key], names[key] = _strata(strata, len(data.features), rows)
    names = {key: _cover(names[key], codes[key], key) for key in codes}
    return Groups(codes, codes, names)


def _names(reader: ArtifactReader, name: str) -> list[str]:
    return [str(n) for n in reader.read(name)] if name in reader else []


def _strata(strata: Optional[ArtifactReader], n_rows: int, rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
    if strata is None or "strata/labels" not in strata:
        raise DataError("ablate.by: 'stratum' needs strata/labels from the fiber stage, which its artifact lacks")
    labels = strata.read("strata/labels").astype(np.int64)
    if len(labels) != n_rows:
        raise DataError(
            f"ablate.by: 'stratum': the fiber artifact labels {len(labels)} rows but the data has "
            f"{n_rows}; run fiber on the same data as train"
        )
    return labels[rows], [f"stratum {s}" for s in range(int(labels.max()) + 1)]


def _cover(names: list[str], codes: np.ndarray, key: str) -> list[str]:
    """Names for every code that occurs (codes beyond the names table get a generic name)."""
    needed = int(codes.max()) + 1 if len(codes) else 0
    return list(names) + [f"{key} {i}" for i in range(len(names), needed)]


# --------------------------------------------------------------------------------------------------
# passes


def trained_pass(model: Any, features: Any, ablation: Any, batch_size: int) -> dict[str, np.ndarray]:
    """Outputs and routing of a trained model, with a leading ablation axis (size 1 without an ablation).

    Returns
    -------
    dict
        ``probs`` (A, N, L, E), ``expert_index`` (A, N, L, k), ``selected`` (A, N, L, E);
        classifier: ``prediction`` (A, N); dictionary MoE: ``reconstruction`` (A, N) the model's
        loss term, ``mixture_reconstruction`` (A, N), ``embedding`` (A, N, P), ``assignment`` (A, N).
    """
    import torch

    outputs_of = PASS_OUTPUTS[model.accuracy_kind]
    parts: list[dict[str, np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = features[start : start + batch_size]
            output, aux = model(batch, ablation)
            probs, index, result = outputs_of(model, batch, output, aux)
            parts.append({**_selection(probs, index), **result})
    return {name: np.concatenate([p[name] for p in parts], axis=1) for name in parts[0]}


def _classifier_outputs(model: Any, inputs: Any, output: Any, aux: dict[str, Any]) -> tuple[Any, Any, dict]:
    probs, index = aux["router_probs"], aux["expert_index"]  # (L, [A,] B, E), (L, [A,] B, k)
    if probs.dim() == 3:
        probs, index, output = probs.unsqueeze(1), index.unsqueeze(1), output.unsqueeze(0)
    probs, index = probs.permute(1, 2, 0, 3), index.permute(1, 2, 0, 3)  # (A, B, L, .)
    return probs, index, {"prediction": output.argmax(dim=-1).cpu().numpy()}


def _dictionary_outputs(model: Any, inputs: Any, output: Any, aux: dict[str, Any]) -> tuple[Any, Any, dict]:
    import torch

    probs, index, weights = aux["router_probs"], aux["expert_index"], aux["combine_weights"]  # (A, B, .)
    if probs.dim() == 2:
        probs, index, weights, output = (t.unsqueeze(0) for t in (probs, index, weights, output))
    reconstruction = (weights * aux["reconstruction_error"]).sum(-1)  # (A, B) the model's loss term
    # ||x - sum_e w_e D_e z_e||^2: the error of the mixture itself. Unlike the loss term, it does
    # not fall when a "zero" ablation leaves weights that no longer sum to one.
    atoms = torch.einsum("bem,edm->bed", aux["codes"], model.experts.dictionary)  # (B, E, d)
    mixture_error = (inputs - torch.einsum("...be,bed->...bd", weights, atoms)).pow(2).sum(-1)  # (A, B)
    probs, index = probs.unsqueeze(2), index.unsqueeze(2)  # one routing decision: L = 1
    return (
        probs,
        index,
        {
            "reconstruction": reconstruction.cpu().numpy().astype(np.float64),
            "mixture_reconstruction": mixture_error.cpu().numpy().astype(np.float64),
            "embedding": output.cpu().numpy(),
            "assignment": index[..., 0, 0].cpu().numpy(),
        },
    )


#: Per-batch outputs of each model (keyed by ``model.accuracy_kind``, which names the model family).
PASS_OUTPUTS = {"argmax": _classifier_outputs, "nearest_train_centroid": _dictionary_outputs}

#: Per-input metric (M, N) of each model kind: correct (0/1) for a classifier, the reconstruction
#: loss term for the dictionary MoE.
METRIC_VALUES = {
    "topk": lambda outcome, targets: (outcome["prediction"] == targets).astype(np.float64),
    "dictionary": lambda outcome, targets: outcome["reconstruction"],
}


def _selection(probs: Any, index: Any) -> dict[str, np.ndarray]:
    probs_np, index_np = probs.float().cpu().numpy(), index.cpu().numpy()
    selected = np.zeros(probs_np.shape, dtype=bool)
    np.put_along_axis(selected, index_np, True, axis=-1)
    # A masked expert can fill a top-k slot at probability 0 when fewer than k experts remain.
    selected &= probs_np > 0
    return {"probs": probs_np, "expert_index": index_np, "selected": selected}


def ablated_passes(
    model: Any, features: Any, plan: AblationPlan, mode: str, batch_size: int, n_layers: int
) -> dict[str, np.ndarray]:
    """Every planned ablation of a trained model: one batched pass per MoE layer.

    All ablations of a layer (its single experts and control sets) are rows of one ``Ablation``
    mask of shape (M, 1, E): the model computes everything before that layer, and that layer's
    expert outputs, once for all of them.
    """
    import torch

    from moespec.models import Ablation

    results: dict[str, np.ndarray] = {}
    for layer in np.unique(plan.layer):
        rows = np.flatnonzero(plan.layer == layer)
        masks = torch.as_tensor(plan.masks[rows], device=features.device).unsqueeze(1)  # (M, 1, E)
        ablation = Ablation(masks, mode, int(layer) if n_layers > 1 else None)
        for name, values in trained_pass(model, features, ablation, batch_size).items():
            if name not in results:
                results[name] = np.zeros((len(plan.layer), *values.shape[1:]), dtype=values.dtype)
            results[name][rows] = values
    return results


def routing_change(
    prefix: str, outcome: dict, baseline: dict, plan: AblationPlan, groups: Groups
) -> tuple[dict[str, Any], Optional[np.ndarray]]:
    """Slot shares after each single ablation; with one routing decision, the share of inputs that changed expert.

    Returns the tables and that share (A,) (None for a top-k classifier).
    """
    counts = outcome["selected"][: plan.n_single].sum(axis=1).astype(np.float64)  # (A, L, E)
    tables: dict[str, Any] = {f"{prefix}/load": counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1)}
    if "assignment" not in outcome:
        return tables, None
    assignment = outcome["assignment"][: plan.n_single]
    changed = (assignment != baseline["assignment"][0]).astype(np.float64)
    tables[f"{prefix}/assignment"] = assignment.astype(np.int64)
    tables[f"{prefix}/assignment_changed"] = changed.mean(axis=1)
    for key, codes in groups.eval.items():
        tables[f"{prefix}/assignment_changed_{key}"] = spec.group_means(changed, codes, groups.size(key))
    return tables, changed.mean(axis=1)


def dictionary_extras(
    cfg: Any,
    mode: str,
    model: Any,
    outcome: dict,
    baseline: dict,
    targets: np.ndarray,
    plan: AblationPlan,
    groups: Groups,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Dictionary MoE: contrastive loss over all pairs of evaluated rows, and the mixture's reconstruction error.

    Returns the tables and the harm columns of the summary table.
    """
    import torch

    from moespec.models import contrastive_margin_loss, positive_pair_mask

    positive = positive_pair_mask(torch.as_tensor(targets))

    def loss(embedding: np.ndarray) -> float:
        return float(contrastive_margin_loss(torch.as_tensor(embedding), positive, model.margin))

    base = loss(baseline["embedding"][0])
    ablated = np.array([loss(embedding) for embedding in outcome["embedding"][: plan.n_single]])
    tables: dict[str, Any] = {"baseline/contrastive": np.float64(base)} if mode == cfg.modes[0] else {}
    tables[f"ablation/{mode}/contrastive"] = ablated
    tables[f"ablation/{mode}/delta_contrastive"] = ablated - base
    prefix = f"ablation/{mode}"
    tables.update(
        tables_.comparison_tables(
            prefix,
            "mixture_reconstruction",
            baseline["mixture_reconstruction"][0],
            outcome["mixture_reconstruction"][: plan.n_single],
            groups,
            rng=common.comparison_rng(cfg.seed, prefix, "mixture"),
            n_resamples=cfg.bootstrap,
            confidence=cfg.confidence,
        )
    )
    return tables, {
        "mixture_reconstruction_increase": tables[f"{prefix}/delta_mixture_reconstruction"],
        "contrastive_increase": ablated - base,
    }


# --------------------------------------------------------------------------------------------------
# the seed control


def _seed_control(
    cfg: Any,
    train_cfg: Any,
    data: Any,
    train_reader: ArtifactReader,
    checkpoint: dict,
    features: Any,
    rows: np.ndarray,
    groups: Groups,
    base_values: np.ndarray,
    metric: str,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """No ablation, another seed: the same model config retrained with other seeds on the same split."""
    seeds = cfg.controls.retrain_seeds if cfg.controls.retrain_seeds is not None else [train_cfg.seed + 1]
    if train_cfg.seed in seeds:
        raise ConfigError(
            f"ablate.controls.retrain_seeds: {train_cfg.seed} is the seed the compared model was "
            f"trained with; list other seeds"
        )
    if not seeds:
        return {}, {"seed_control": "off (controls.retrain_seeds: [])"}
    epochs = int(checkpoint.get("epoch") or train_cfg.epochs)
    train_index = train_reader.read("split/train_index").astype(np.int64)
    values = []
    for seed in seeds:
        other = retrain(train_cfg, data, train_index, seed, epochs, features.device)
        outcome = trained_pass(other, features, None, cfg.batch_size)
        values.append(METRIC_VALUES[train_cfg.model.kind](outcome, data.targets[rows])[0])
    return common.seed_control_tables(cfg, seeds, np.stack(values), base_values, metric, groups)


def retrain(train_cfg: Any, data: Any, train_index: np.ndarray, seed: int, epochs: int, device: Any) -> Any:
    """The train stage's recipe (model, optimiser, schedule, batch order) with another seed, for ``epochs`` epochs.

    It trains for the epochs of the compared checkpoint rather than choosing the best epoch on
    validation data, so that the control has seen the same amount of training.
    """
    import torch

    from moespec.models.training import autocast_dtype, fit

    model = row_models.build_model(train_cfg.model, data, seed).to(device)
    optimizer = row_models.make_optimizer(
        model, lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, kind=train_cfg.optimizer
    )
    scheduler = train_cfg.scheduler(optimizer, len(train_index))
    objective = row_models.RowObjective(
        torch.as_tensor(data.features[train_index], device=device),
        torch.as_tensor(data.targets[train_index], device=device),
        torch.arange(len(train_index), device=device),
        None,
        batch_size=train_cfg.batch_size,
        seed=seed,
        dtype=autocast_dtype(train_cfg.precision, device),
    )
    loop = dataclasses.replace(train_cfg.loop(), epochs=epochs, eval_every=None, patience=None)
    fit(model, optimizer, scheduler, objective, loop)
    return model.eval()
