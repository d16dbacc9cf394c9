"""The ablate stage: expert ablation and specialisation analysis, for our trained MoEs and pretrained HF MoEs.

Sources (``source.kind``):

``trained``
    The model of the ``train`` stage (``best.pt`` or ``final.pt``), evaluated on the rows it held
    out (or all rows) of the data it was trained on (the ``reduce`` or ``embed`` artifact, declared
    as input ``data``; strata come from ``fiber`` when ``by`` lists ``stratum``). Every ablation of
    one MoE layer (all single experts and the random control sets) runs in one batched pass of
    the model library (``Ablation`` masks with a leading ablation axis): the computation before
    the ablated layer, and the expert outputs of that layer, are shared by all of them.
``pretrained``
    A Hugging Face MoE (Mixtral family, Qwen2-MoE, OLMoE, Switch encoders; see
    :mod:`moespec.embedding.hf_moe`) on texts from the same sources as ``embed``. ``task: lm``
    measures next-token loss per text; ``task: probe`` fits one logistic-regression probe on the
    pooled last hidden states of the unablated model (training rows) and keeps it frozen while
    experts are ablated (test rows). Router logits are captured by hooks; ablations patch the
    routing in a hook; the blocks before an ablated layer are computed once per batch and
    replayed; several ablations run in one pass as copies of the batch (``tokens_per_pass``).

Ablation modes (``modes``), per expert and per MoE layer (research/moe.md section 3.5):
``mask`` (the router logit is -inf before the top-k: inputs re-route; the default), ``zero``
(routing kept, the expert's contribution removed), ``renormalise`` (the expert leaves the selected
set without re-routing; the rest is renormalised when the router renormalises).

Controls: ``controls.random_sets`` random expert sets per ablated expert, drawn from the other
experts of the layer with total load matched to that expert's (the same metrics, under
``controls/random``); and "no ablation, another seed": for a trained model the same model
config retrained with another seed on the same split, for a probe the probe refitted on a
seeded bootstrap resample of its training rows (under ``controls/seed``); a pretrained LM has no
such control (one set of weights), which the summary says.

Every difference is ``ablated - baseline``, with a paired, group-stratified percentile bootstrap
interval over evaluated inputs (``bootstrap`` resamples at ``confidence``).

Output. ``N`` evaluated inputs (held-out rows; every text for ``lm``; the probe's test texts),
``T`` routed inputs (the evaluated rows of a trained model; every real token of every text of a
pretrained one), ``L`` MoE layers, ``E`` experts, ``k`` experts per input, ``A`` single-expert
ablations, ``R`` control sets, ``S`` seed controls, ``G`` groups of a key (``domain`` always, and
``class`` / ``stratum`` as listed in ``by``). ``<m>`` is a mode and ``<metric>`` the per-input
metric: ``accuracy`` (classifier, probe; correct 0/1), ``nll`` (lm; per-text mean next-token loss,
averaged per token through the weights ``eval/n_tokens``) or ``reconstruction`` (dictionary MoE:
its reconstruction loss term, sum_e w_e ||x - D_e z_e||^2; under ``zero`` the weights no longer
sum to one and this term falls by construction, so read ``mixture_reconstruction`` and
``contrastive`` there).

=============================================  ===============  =========================================
dataset                                        shape            meaning
=============================================  ===============  =========================================
eval/row                                       (N,) int         input row / text evaluated
eval/<key>                                     (N,) int         group codes of the evaluated inputs
eval/n_tokens                                  (N,) int         lm: next-token targets per text
names/<key>                                    (G,) str         names of the codes
routing/probs                                  (T, L, E) f32    router probabilities (unablated)
routing/expert_index                           (T, L, k) int    selected experts, best first
routing/entropy                                (T, L) f32       routing entropy / log E
routing/row                                    (T,) int         input row / text of each routed input
routing/token_id, routing/position             (T,) int         pretrained: token id and position
experts/load, experts/importance               (L, E)           share of routed slots; mean probability
experts/dead                                   (L, E) bool      load share < dead_threshold / E
experts/entropy                                (L, E)           mean entropy of the inputs whose top-1 is e
layers/name                                    (L,) str         router module, or "layer i"
layers/load_cv, layers/entropy_mean            (L,)             CV of the load; mean normalised entropy
layers/router_information                      (L,)             H(mean p) - mean H(p), nats
layers/entropy_histogram                       (L, n_bins) int  on [0, 1], edges in entropy_bin_edges
layers/entropy_quantiles                       (L, 5)           at 0.05, 0.25, 0.5, 0.75, 0.95
specialisation/<key>/counts                    (L, G, E) int    routed slots of group g to expert e
specialisation/<key>/share                     (L, G, E)        S[g, e]; rows sum to 1
specialisation/<key>/lift_uniform, lift_load   (L, G, E)        S * E; S / load
specialisation/<key>/mutual_information, nmi   (L,)             I(group; expert slot) in nats; NMI
specialisation/token/<name>                    (L,)             pretrained, ``by: [token, ...]``:
                                                                consistency (vocabulary mean),
                                                                consistency_weighted (per occurrence),
                                                                consistency_shuffled (token ids shuffled),
                                                                mutual_information, nmi (with token id),
                                                                repetition (same top-1 as the previous
                                                                token); n_token_ids () counted ids
ablations/layer, ablations/expert              (A,) int         the single-expert ablations
baseline/values                                (N,)             per-input metric, unablated
baseline/<metric>[_<key>][_low|_high]          () / (G,)        its mean and bootstrap bounds
ablation/<m>/values                            (A, N)           per-input metric under each ablation
ablation/<m>/<metric>[_<key>]                  (A,) / (A, G)    its means
ablation/<m>/delta_<metric>[_<key>][_low|...]  (A,) / (A, G)    ablated - baseline, paired bounds
ablation/<m>/load                              (A, L, E)        trained: slot shares after the ablation
ablation/<m>/assignment[_changed[_<key>]]      (A, N) / ...     dictionary: top-1 expert after the
                                                                ablation; share of inputs that changed
ablation/<m>/[delta_]contrastive               (A,)             dictionary: contrastive loss over all
baseline/contrastive                           ()               pairs of evaluated rows
ablation/<m>/[delta_]mixture_reconstruction*   as <metric>      dictionary: ||x - sum_e w_e D_e z_e||^2
controls/random/experts, layer, target, load   (R, E), (R,)     control sets, their layer, the single
                                                                ablation they match, their load
controls/random/<m>/<metric>..., delta_...     (R, ...)         as ablation/<m>
controls/seed/seeds, values                    (S,), (S, N)     seed control ("another seed")
controls/seed/<metric>..., delta_...           (S, ...)         as ablation/<m>
=============================================  ===============  =========================================

Root attributes: ``source``, ``metric``; trained: ``model_kind``; pretrained: ``model_name``,
``model_revision``, ``model_commit``, ``model_class``, ``task``, ``device``, ``dtype``.

Summary (``summary.json``): ``source``, ``model``, ``modes``, ``metric``, ``baseline``, ``n_eval``
(pretrained: ``task``, ``n_tokens``), the seed control (``seed_control_delta``: the metric of
each other-seed model, or refitted probe, minus this one's; or a ``seed_control`` note),
per-layer ``routing_entropy``, ``load_cv``, ``nmi_<key>`` (and ``token_consistency``,
``token_consistency_shuffled``), the count of ``dead_experts``, ``collapsed`` and
``collapse_reasons`` (:func:`moespec.models.routing.collapse_report`), and
``experts``: the per-expert table of the first mode, column-wise (one entry per single
ablation): ``layer``, ``expert``, ``utilisation`` (load), ``importance``, ``entropy``, the harm
``<metric>_drop`` (accuracy) or ``<metric>_increase`` (losses) so that positive always means the
ablation hurt, the group hurt most (``max_class_drop`` and ``max_class``; ``max_domain_*`` without
classes; None when no group is hurt), ``control_mean`` (mean harm of its matched-load control
sets), dictionary extras, and the harm under each further mode. The same table is logged.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moespec.analysis import ablation as tables_
from moespec.analysis import specialisation as spec
from moespec.analysis.ablation import AblationPlan, Groups
from moespec.artifacts import DatasetSpec
from moespec.data.sources import BuiltinSource, Source, load_texts, source_domains
from moespec.errors import ConfigError, DataError
from moespec.stages.base import StageConfig

NAME = "ablate"
SCHEMA_VERSION = 1

ModeName = Literal["mask", "zero", "renormalise"]
#: Config mode -> mode of ``moespec.models.routing.Ablation`` (whose "drop" is the renormalising one).
LIBRARY_MODE = {"mask": "mask", "zero": "zero", "renormalise": "drop"}
GroupKey = Literal["class", "domain", "stratum", "token"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrainedSource(_Section):
    """Ablate the model of the ``train`` stage.

    Attributes
    ----------
    checkpoint : {"best", "final"}
        ``best.pt`` (lowest validation loss) or ``final.pt``.
    input : {"reduce", "embed"}
        The artifact train read (``train.input``); declared as this stage's ``data`` input.
    split : {"heldout", "all"}
        Evaluate on the rows train held out, or on every row.
    """

    kind: Literal["trained"] = "trained"
    checkpoint: Literal["best", "final"] = "best"
    input: Literal["reduce", "embed"] = "reduce"
    split: Literal["heldout", "all"] = "heldout"


class PretrainedModel(_Section):
    """A pretrained HF MoE: hub name or local folder, revision, compute dtype and device."""

    name: str
    revision: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    trust_remote_code: bool = False


class ProbeConfig(_Section):
    """The frozen linear probe of ``task: probe`` (scikit-learn logistic regression on standardised states).

    Attributes
    ----------
    test_fraction : float
        Share of each class's texts held out for evaluation (the probe never sees them).
    pooling : {"mean", "last", "cls"}
        Pooling of the last hidden states (padding-aware, :mod:`moespec.embedding.pooling`).
    c : float
        Inverse L2 regularisation strength.
    max_iter : int
    """

    test_fraction: float = Field(0.3, gt=0.0, lt=1.0)
    pooling: Literal["mean", "last", "cls"] = "mean"
    c: float = Field(1.0, gt=0.0)
    max_iter: int = Field(1000, ge=1)


class PretrainedSource(_Section):
    """Ablate a pretrained HF MoE on texts.

    Attributes
    ----------
    model : PretrainedModel
    data : list of Source
        Text sources as in ``embed.data`` (built-in corpus, HF datasets, local files).
    task : {"lm", "probe"}
        Next-token loss per text and domain, or a frozen linear probe on the labels.
    max_length, batch_size : int
        Tokens per text (longer texts are truncated) and texts per batch.
    tokens_per_pass : int
        Upper bound of batch x sequence x copies in one batched ablation pass. With ``task: lm``
        the logits of that many tokens are held at once (x vocabulary x 4 bytes, twice for a
        bfloat16 model: 8192 tokens of a 32k vocabulary take about 2 GiB).
    probe : ProbeConfig
    """

    kind: Literal["pretrained"] = "pretrained"
    model: PretrainedModel
    data: list[Source] = Field(default_factory=lambda: [BuiltinSource()])
    task: Literal["lm", "probe"] = "lm"
    max_length: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)
    tokens_per_pass: int = Field(8192, ge=1)
    probe: ProbeConfig = ProbeConfig()

    @model_validator(mode="after")
    def _distinct_domains(self) -> "PretrainedSource":
        if not self.data:
            raise ValueError("data: give at least one text source (e.g. [{kind: builtin}])")
        domains = [d for source in self.data for d in source_domains(source)]
        repeated = sorted({d for d in domains if domains.count(d) > 1})
        if repeated:
            raise ValueError(f"data: domain(s) {repeated} come from more than one source; give each its own 'domain'")
        return self


class Controls(_Section):
    """Controls of the ablation deltas.

    Attributes
    ----------
    random_sets : int, optional
        Random expert sets of matched load per ablated expert; None: 5 for a trained model (all
        in the same batched pass), 1 for a pretrained model (each costs a pass over the data).
    retrain_seeds : list of int, optional
        Trained models: seeds of the retrained comparison models (None: the train seed + 1;
        [] for none). Pretrained probes: seeds of the bootstrap-refitted probes (None: seed + 1).
    """

    random_sets: Optional[int] = Field(None, ge=0)
    retrain_seeds: Optional[list[int]] = None


class Config(StageConfig):
    """The ``ablate`` section of an experiment (see the module docstring for what it writes).

    Attributes
    ----------
    source : TrainedSource or PretrainedSource
        Chosen by ``kind``.
    modes : list of {"mask", "zero", "renormalise"}
        Interventions to run (the summary's table is for the first).
    experts : list of int, optional
        Experts ablated one at a time (default: all).
    layers : list of int, optional
        MoE layers whose experts are ablated (default: all).
    by : list of {"class", "domain", "stratum", "token"}
        Groupings of the metrics and specialisation tables (``domain`` is always included).
        ``class`` needs labels (the classifier's target classes for a top-k classifier),
        ``stratum`` the fiber stage (trained only), ``token`` token ids (pretrained only).
    bootstrap : int
        Bootstrap resamples of the confidence intervals (0: none).
    confidence : float
    batch_size : int
        Rows per forward pass of a trained model.
    entropy_bins : int
    min_token_count : int
        Token ids seen fewer times are left out of the token consistency.
    dead_threshold : float
        An expert is dead when its load is below ``dead_threshold / E``.
    controls : Controls
    seed : int
        Seeds the bootstrap, the control sets and the shuffled-token baseline.
    """

    source: Annotated[Union[TrainedSource, PretrainedSource], Field(discriminator="kind")] = TrainedSource()
    modes: list[ModeName] = Field(default_factory=lambda: ["mask"])
    experts: Optional[list[Annotated[int, Field(ge=0)]]] = None
    layers: Optional[list[Annotated[int, Field(ge=0)]]] = None
    by: list[GroupKey] = Field(default_factory=lambda: ["class", "domain"])
    bootstrap: int = Field(1000, ge=0)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    batch_size: int = Field(256, ge=1)
    entropy_bins: int = Field(20, ge=1)
    min_token_count: int = Field(5, ge=1)
    dead_threshold: float = Field(0.1, gt=0.0, lt=1.0)
    controls: Controls = Controls()
    seed: int = 0

    @field_validator("modes", "experts", "layers", "by")
    @classmethod
    def _distinct(cls, value: Optional[list[Any]]) -> Optional[list[Any]]:
        if value is not None and (not value or len(set(value)) != len(value)):
            raise ValueError("must list at least one value, each once")
        return value

    @model_validator(mode="after")
    def _keys_fit_source(self) -> "Config":
        kind = self.source.kind
        if kind == "trained" and "token" in self.by:
            raise ValueError("by: 'token' needs token ids, which only a pretrained source has")
        if kind == "pretrained" and "stratum" in self.by:
            raise ValueError("by: 'stratum' needs fiber strata, which only a trained source has")
        return self

    @property
    def random_sets(self) -> int:
        if self.controls.random_sets is not None:
            return self.controls.random_sets
        return 5 if self.source.kind == "trained" else 1


def inputs(cfg: Config) -> dict[str, str]:
    """``{"train": "train", "data": <train's input>}`` (+ ``"strata": "fiber"``); none for a pretrained model."""
    if cfg.source.kind == "pretrained":
        return {}
    declared = {"train": "train", "data": cfg.source.input}
    if "stratum" in cfg.by:
        declared["strata"] = "fiber"
    return declared


def metric_name(cfg: Config, model_kind: str | None = None) -> str:
    """The per-input metric of the ablation tables."""
    if cfg.source.kind == "pretrained":
        return "nll" if cfg.source.task == "lm" else "accuracy"
    return "reconstruction" if model_kind == "dictionary" else "accuracy"


def schema(cfg: Config) -> dict[str, DatasetSpec]:
    pretrained = cfg.source.kind == "pretrained"
    spec_ = {
        "eval/row": DatasetSpec(("N",), "int"),
        "eval/domain": DatasetSpec(("N",), "int"),
        "names/domain": DatasetSpec(("G_domain",), "str"),
        "routing/probs": DatasetSpec(("T", "L", "E"), "float"),
        "routing/expert_index": DatasetSpec(("T", "L", "k"), "int"),
        "routing/entropy": DatasetSpec(("T", "L"), "float"),
        "routing/row": DatasetSpec(("T",), "int"),
        "routing/token_id": DatasetSpec(("T",), "int", required=pretrained),
        "experts/load": DatasetSpec(("L", "E"), "float"),
        "experts/importance": DatasetSpec(("L", "E"), "float"),
        "experts/dead": DatasetSpec(("L", "E"), "bool"),
        "experts/entropy": DatasetSpec(("L", "E"), "float"),
        "layers/name": DatasetSpec(("L",), "str"),
        "layers/load_cv": DatasetSpec(("L",), "float"),
        "layers/entropy_mean": DatasetSpec(("L",), "float"),
        "layers/router_information": DatasetSpec(("L",), "float"),
        "layers/entropy_histogram": DatasetSpec(("L", "n_bins"), "int"),
        "layers/entropy_quantiles": DatasetSpec(("L", len(spec.ENTROPY_QUANTILES)), "float"),
        "ablations/layer": DatasetSpec(("A",), "int"),
        "ablations/expert": DatasetSpec(("A",), "int"),
        "controls/random/experts": DatasetSpec(("R", "E"), "bool", required=False),
    }
    for key in cfg.by:
        if key == "token":
            for name in ("consistency", "consistency_shuffled", "mutual_information", "nmi"):
                spec_[f"specialisation/token/{name}"] = DatasetSpec(("L",), "float")
            continue
        for name in ("counts", "share", "lift_uniform", "lift_load"):
            spec_[f"specialisation/{key}/{name}"] = DatasetSpec(("L", f"G_{key}", "E"),
                                                               "int" if name == "counts" else "float")
        spec_[f"specialisation/{key}/nmi"] = DatasetSpec(("L",), "float")
        spec_[f"names/{key}"] = DatasetSpec((f"G_{key}",), "str")
    for mode in cfg.modes:
        # The metric depends on the trained model's kind, known only at run time: check the delta
        # of whichever metric is there through the per-input values, which every kind writes.
        spec_[f"ablation/{mode}/values"] = DatasetSpec(("A", "N"), "float")
    return spec_


def run(cfg: Config, inputs: dict[str, Any], out: Any) -> None:
    """Ablate every selected expert in every mode; write routing, specialisation and ablation tables."""
    if cfg.source.kind == "trained":
        _run_trained(cfg, inputs, out)
    else:
        _run_pretrained(cfg, out)


# --------------------------------------------------------------------------------------------------
# shared by both sources


def _check_indices(cfg: Config, n_layers: int, n_experts: int) -> tuple[list[int], list[int]]:
    """The MoE layers and experts to ablate; ConfigError naming any that does not exist."""
    problems = [f"ablate.experts: expert {expert} does not exist; the model has {n_experts} experts "
                f"(0..{n_experts - 1}) per MoE layer" for expert in cfg.experts or [] if expert >= n_experts]
    problems += [f"ablate.layers: MoE layer {layer} does not exist; the model has {n_layers} MoE layer(s) "
                 f"(0..{n_layers - 1})" for layer in cfg.layers or [] if layer >= n_layers]
    if problems:
        raise ConfigError(problems)
    return list(cfg.layers or range(n_layers)), list(cfg.experts or range(n_experts))


def _write(out: Any, tables: dict[str, Any]) -> None:
    for name, value in tables.items():
        out.write(name, value)


def _write_groups(out: Any, groups: Groups) -> None:
    for key, names in groups.names.items():
        if names:
            out.write(f"names/{key}", list(names))
        else:
            import h5py

            out.create_dataset(f"names/{key}", (0,), h5py.string_dtype())
    for key, codes in groups.eval.items():
        out.write(f"eval/{key}", codes.astype(np.int64))


def _analyse_routing(cfg: Config, out: Any, probs: np.ndarray, expert_index: np.ndarray, groups: Groups,
                     layer_names: list[str], layers: list[int], experts: list[int],
                     token_ids: Optional[np.ndarray] = None, sequence: Optional[np.ndarray] = None
                     ) -> tuple[dict[str, np.ndarray], AblationPlan]:
    """Write routing and specialisation tables; plan the ablations (control sets matched to the load)."""
    routing = tables_.routing_tables(probs, expert_index, groups, entropy_bins=cfg.entropy_bins,
                                     dead_threshold=cfg.dead_threshold)
    if "token" in cfg.by:
        routing.update(tables_.token_tables(expert_index[..., 0], token_ids, sequence, probs.shape[-1],
                                            min_count=cfg.min_token_count, rng=np.random.default_rng([cfg.seed, 2])))
    out.write("routing/probs", probs.astype(np.float32))
    out.write("routing/expert_index", expert_index.astype(np.int64))
    out.write("layers/name", layer_names)
    _write(out, routing)
    plan = tables_.plan_ablations(layers, experts, routing["experts/load"], cfg.random_sets,
                                  np.random.default_rng([cfg.seed, 1]))
    _write(out, tables_.plan_tables(plan, routing["experts/load"]))
    return routing, plan


def _compare(cfg: Config, out: Any, mode: str, metric: str, baseline: np.ndarray, values: np.ndarray,
             plan: AblationPlan, groups: Groups, rng: np.random.Generator,
             weights: Optional[np.ndarray] = None) -> dict[str, np.ndarray]:
    """Write the single ablations and the control sets of one mode; returns their tables."""
    settings = {"rng": rng, "n_resamples": cfg.bootstrap, "confidence": cfg.confidence, "weights": weights}
    single, controls = values[:plan.n_single], values[plan.n_single:]
    out.write(f"ablation/{mode}/values", single.astype(np.float64))
    result = tables_.comparison_tables(f"ablation/{mode}", metric, baseline, single, groups, **settings)
    if len(controls):
        result.update(tables_.comparison_tables(f"controls/random/{mode}", metric, baseline, controls, groups,
                                                **settings))
    _write(out, result)
    return result


def _finish(cfg: Config, out: Any, plan: AblationPlan, routing: dict, results: dict, metric: str,
            groups: Groups, baseline: float, summary: dict, extra: Optional[dict] = None) -> None:
    """The per-expert table (log and summary) and the layer headline numbers."""
    table = tables_.expert_table(plan, routing, results, list(cfg.modes), metric, groups.names,
                                 higher_is_better=metric == "accuracy", extra=extra)
    out.log.info("per-expert ablation (mode %s; %s %.4f without ablation; positive = the ablation hurt)\n%s",
                 cfg.modes[0], metric, baseline, tables_.format_table(table))
    out.attrs["metric"] = metric
    from moespec.models.routing import collapse_report

    collapsed, reasons = collapse_report(routing["experts/load"], cfg.dead_threshold)
    out.summary.update(modes=list(cfg.modes), metric=metric, baseline=tables_.rounded(baseline), **summary,
                       experts=table, **tables_.layer_summary(routing), collapsed=collapsed, collapse_reasons=reasons)


# --------------------------------------------------------------------------------------------------
# trained models


def _run_trained(cfg: Config, inputs: dict[str, Any], out: Any) -> None:
    import torch

    from moespec.stages import train

    train_reader, data_reader = inputs["train"], inputs["data"]
    model, checkpoint = train.load_model(train_reader.path.parent / f"{cfg.source.checkpoint}.pt")
    train_cfg = train.Config.model_validate(checkpoint["config"])  # the config the weights were trained with
    if train_cfg.input != cfg.source.input:
        raise ConfigError(f"ablate.source.input: the train stage read {train_cfg.input!r}, this says "
                          f"{cfg.source.input!r}; set ablate.source.input: {train_cfg.input}")
    data = train.load_training_data(train_cfg, data_reader)
    rows = (train_reader.read("split/val_index") if cfg.source.split == "heldout"
            else np.arange(len(data.features))).astype(np.int64)
    kind = train_cfg.model.kind
    groups = _trained_groups(cfg, data, data_reader, rows, inputs.get("strata"), kind)
    model = model.to(torch.device(out.device))
    features = torch.as_tensor(data.features[rows], device=out.device)
    n_layers = len(model.moe_layers) if kind == "topk" else 1
    layers, experts = _check_indices(cfg, n_layers, model.n_experts)
    out.log.info("ablate the %s MoE of train %s (%s.pt, epoch %s) on %d %s rows: %d MoE layer(s) x %d experts, "
                 "modes %s", kind, train_reader.uid, cfg.source.checkpoint, checkpoint.get("epoch"), len(rows),
                 cfg.source.split, n_layers, model.n_experts, ", ".join(cfg.modes))

    baseline = trained_pass(model, features, None, cfg.batch_size)
    out.write("eval/row", rows)
    out.write("routing/row", rows)
    _write_groups(out, groups)
    routing, plan = _analyse_routing(cfg, out, baseline["probs"][0], baseline["expert_index"][0], groups,
                                     [f"layer {i}" for i in range(n_layers)], layers, experts)
    rng = np.random.default_rng(cfg.seed)
    metric, targets = metric_name(cfg, kind), data.targets[rows]
    base_values = _trained_values(kind, baseline, targets)[0]
    out.write("baseline/values", base_values)
    baseline_tables = tables_.baseline_tables(metric, base_values, groups, rng=rng, n_resamples=cfg.bootstrap,
                                              confidence=cfg.confidence)
    _write(out, baseline_tables)
    results, extra = {}, {}
    for mode in cfg.modes:
        outcome = ablated_passes(model, features, plan, LIBRARY_MODE[mode], cfg.batch_size, n_layers)
        results[mode] = _compare(cfg, out, mode, metric, base_values, _trained_values(kind, outcome, targets), plan,
                                 groups, rng)
        changed = _write_routing_change(out, f"ablation/{mode}", outcome, baseline, plan, groups)
        if kind == "dictionary":
            found = _dictionary_extras(cfg, out, mode, model, outcome, baseline, targets, plan, groups, rng)
            if mode == cfg.modes[0]:
                extra = {**found, "assignment_changed": changed}
    seed = _seed_control(cfg, train_cfg, data, train_reader, checkpoint, features, rows, groups, base_values, metric,
                         rng, out)
    out.attrs["source"], out.attrs["model_kind"] = "trained", kind
    _finish(cfg, out, plan, routing, results, metric, groups, float(baseline_tables[f"baseline/{metric}"]),
            {"source": "trained", "model": kind, "n_eval": len(rows), **seed}, extra)


def _trained_groups(cfg: Config, data: Any, data_reader: Any, rows: np.ndarray, strata: Any, kind: str) -> Groups:
    """Group codes of the evaluated rows: domain always, then the other keys of ``cfg.by``."""
    codes, names = {}, {}
    for key in ["domain", *(k for k in cfg.by if k != "domain")]:
        if key == "domain":
            codes[key], names[key] = data.domain[rows], _names(data_reader, "domain_names")
        elif key == "class" and kind == "topk":
            codes[key], names[key] = data.targets[rows], list(data.target_names)
        elif key == "class":
            unlabelled = int((data.label[rows] < 0).sum())
            if unlabelled:
                raise DataError(f"ablate.by: 'class' needs a label on every evaluated row, but {unlabelled} of "
                                f"{len(rows)} are unlabelled; remove 'class' from ablate.by or label the data")
            codes[key], names[key] = data.label[rows], _names(data_reader, "label_names")
        elif key == "stratum":
            codes[key], names[key] = _strata(strata, len(data.features), rows)
    names = {key: _cover(names[key], codes[key], key) for key in codes}
    return Groups(codes, codes, names)


def _names(reader: Any, name: str) -> list[str]:
    return [str(n) for n in reader.read(name)] if name in reader else []


def _strata(strata: Any, n_rows: int, rows: np.ndarray) -> tuple[np.ndarray, list[str]]:
    if strata is None or "strata/labels" not in strata:
        raise DataError("ablate.by: 'stratum' needs strata/labels from the fiber stage, which its artifact lacks")
    labels = strata.read("strata/labels").astype(np.int64)
    if len(labels) != n_rows:
        raise DataError(f"ablate.by: 'stratum': the fiber artifact labels {len(labels)} rows but the data has "
                        f"{n_rows}; run fiber on the same data as train")
    return labels[rows], [f"stratum {s}" for s in range(int(labels.max()) + 1)]


def _cover(names: list[str], codes: np.ndarray, key: str) -> list[str]:
    """Names for every code that occurs (codes beyond the names table get a generic name)."""
    needed = int(codes.max()) + 1 if len(codes) else 0
    return list(names) + [f"{key} {i}" for i in range(len(names), needed)]


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

    parts: list[dict[str, np.ndarray]] = []
    with torch.no_grad():
        for start in range(0, len(features), batch_size):
            batch = features[start:start + batch_size]
            output, aux = model(batch, ablation)
            parts.append(_pass_outputs(model, batch, output, aux))
    return {name: np.concatenate([p[name] for p in parts], axis=1) for name in parts[0]}


def _pass_outputs(model: Any, inputs: Any, output: Any, aux: dict[str, Any]) -> dict[str, np.ndarray]:
    import torch

    from moespec.models import TopKMoEClassifier

    if isinstance(model, TopKMoEClassifier):
        probs, index = aux["router_probs"], aux["expert_index"]  # (L, [A,] B, E), (L, [A,] B, k)
        if probs.dim() == 3:
            probs, index, output = probs.unsqueeze(1), index.unsqueeze(1), output.unsqueeze(0)
        probs, index = probs.permute(1, 2, 0, 3), index.permute(1, 2, 0, 3)  # (A, B, L, .)
        result = {"prediction": output.argmax(dim=-1).cpu().numpy()}
    else:
        probs, index, weights = aux["router_probs"], aux["expert_index"], aux["combine_weights"]  # (A, B, .)
        if probs.dim() == 2:
            probs, index, weights, output = (t.unsqueeze(0) for t in (probs, index, weights, output))
        reconstruction = (weights * aux["reconstruction_error"]).sum(-1)  # (A, B) the model's loss term
        # ||x - sum_e w_e D_e z_e||^2: the error of the mixture itself. Unlike the loss term, it does
        # not fall when a "zero" ablation leaves weights that no longer sum to one.
        atoms = torch.einsum("bem,edm->bed", aux["codes"], model.experts.dictionary)  # (B, E, d)
        mixture_error = (inputs - torch.einsum("...be,bed->...bd", weights, atoms)).pow(2).sum(-1)  # (A, B)
        probs, index = probs.unsqueeze(2), index.unsqueeze(2)  # one routing decision: L = 1
        result = {"reconstruction": reconstruction.cpu().numpy().astype(np.float64),
                  "mixture_reconstruction": mixture_error.cpu().numpy().astype(np.float64),
                  "embedding": output.cpu().numpy(), "assignment": index[..., 0, 0].cpu().numpy()}
    probs_np, index_np = probs.float().cpu().numpy(), index.cpu().numpy()
    selected = np.zeros(probs_np.shape, dtype=bool)
    np.put_along_axis(selected, index_np, True, axis=-1)
    # A masked expert can fill a top-k slot at probability 0 when fewer than k experts remain.
    selected &= probs_np > 0
    return {"probs": probs_np, "expert_index": index_np, "selected": selected, **result}


def ablated_passes(model: Any, features: Any, plan: AblationPlan, mode: str, batch_size: int,
                   n_layers: int) -> dict[str, np.ndarray]:
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


def _trained_values(kind: str, outcome: dict[str, np.ndarray], targets: np.ndarray) -> np.ndarray:
    """Per-input metric (M, N): correct (0/1) for a classifier, the reconstruction loss term for the dictionary MoE."""
    if kind == "topk":
        return (outcome["prediction"] == targets).astype(np.float64)
    return outcome["reconstruction"]


def _write_routing_change(out: Any, prefix: str, outcome: dict, baseline: dict, plan: AblationPlan,
                          groups: Groups) -> Optional[np.ndarray]:
    """Slot shares after each single ablation; with one routing decision, the share of inputs that changed expert.

    Returns that share (A,), or None for a top-k classifier.
    """
    counts = outcome["selected"][:plan.n_single].sum(axis=1).astype(np.float64)  # (A, L, E)
    out.write(f"{prefix}/load", counts / np.maximum(counts.sum(axis=-1, keepdims=True), 1))
    if "assignment" not in outcome:
        return None
    assignment = outcome["assignment"][:plan.n_single]
    changed = (assignment != baseline["assignment"][0]).astype(np.float64)
    out.write(f"{prefix}/assignment", assignment.astype(np.int64))
    out.write(f"{prefix}/assignment_changed", changed.mean(axis=1))
    for key, codes in groups.eval.items():
        out.write(f"{prefix}/assignment_changed_{key}", spec.group_means(changed, codes, groups.size(key)))
    return changed.mean(axis=1)


def _dictionary_extras(cfg: Config, out: Any, mode: str, model: Any, outcome: dict, baseline: dict,
                       targets: np.ndarray, plan: AblationPlan, groups: Groups,
                       rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Dictionary MoE: contrastive loss over all pairs of evaluated rows, and the mixture's reconstruction error."""
    import torch

    from moespec.models import contrastive_margin_loss, positive_pair_mask

    positive = positive_pair_mask(torch.as_tensor(targets))
    def loss(embedding: np.ndarray) -> float:
        return float(contrastive_margin_loss(torch.as_tensor(embedding), positive, model.margin))

    base = loss(baseline["embedding"][0])
    ablated = np.array([loss(embedding) for embedding in outcome["embedding"][:plan.n_single]])
    if mode == cfg.modes[0]:
        out.write("baseline/contrastive", np.float64(base))
    out.write(f"ablation/{mode}/contrastive", ablated)
    out.write(f"ablation/{mode}/delta_contrastive", ablated - base)
    mixture = tables_.comparison_tables(f"ablation/{mode}", "mixture_reconstruction",
                                        baseline["mixture_reconstruction"][0],
                                        outcome["mixture_reconstruction"][:plan.n_single], groups, rng=rng,
                                        n_resamples=cfg.bootstrap, confidence=cfg.confidence)
    _write(out, mixture)
    return {"mixture_reconstruction_increase": mixture[f"ablation/{mode}/delta_mixture_reconstruction"],
            "contrastive_increase": ablated - base}


def _seed_control(cfg: Config, train_cfg: Any, data: Any, train_reader: Any, checkpoint: dict, features: Any,
                  rows: np.ndarray, groups: Groups, base_values: np.ndarray, metric: str, rng: np.random.Generator,
                  out: Any) -> dict:
    """No ablation, another seed: the same model config retrained with other seeds on the same split."""
    seeds = cfg.controls.retrain_seeds if cfg.controls.retrain_seeds is not None else [train_cfg.seed + 1]
    if train_cfg.seed in seeds:
        raise ConfigError(f"ablate.controls.retrain_seeds: {train_cfg.seed} is the seed the compared model was "
                          f"trained with; list other seeds")
    if not seeds:
        return {"seed_control": "off (controls.retrain_seeds: [])"}
    epochs = int(checkpoint.get("epoch") or train_cfg.epochs)
    train_index = train_reader.read("split/train_index").astype(np.int64)
    values = []
    for seed in seeds:
        other = retrain(train_cfg, data, train_index, seed, epochs, features.device)
        out.log.info("seed control: retrained the %s model with seed %d for %d epoch(s) (those of the compared "
                     "checkpoint)", train_cfg.model.kind, seed, epochs)
        outcome = trained_pass(other, features, None, cfg.batch_size)
        values.append(_trained_values(train_cfg.model.kind, outcome, data.targets[rows])[0])
    return _write_seed_control(cfg, out, seeds, np.stack(values), base_values, metric, groups, rng)


def _write_seed_control(cfg: Config, out: Any, seeds: list[int], values: np.ndarray, base_values: np.ndarray,
                        metric: str, groups: Groups, rng: np.random.Generator) -> dict:
    out.write("controls/seed/seeds", np.array(seeds, dtype=np.int64))
    out.write("controls/seed/values", values)
    result = tables_.comparison_tables("controls/seed", metric, base_values, values, groups, rng=rng,
                                       n_resamples=cfg.bootstrap, confidence=cfg.confidence)
    _write(out, result)
    return {"seed_control_delta": [tables_.rounded(v) for v in result[f"controls/seed/delta_{metric}"]]}


def retrain(train_cfg: Any, data: Any, train_index: np.ndarray, seed: int, epochs: int, device: Any) -> Any:
    """The train stage's recipe (model, optimiser, schedule, batch order) with another seed, for ``epochs`` epochs.

    It trains for the epochs of the compared checkpoint rather than choosing the best epoch on
    validation data, so that the control has seen the same amount of training.
    """
    import torch

    from moespec.stages import train

    model = train_cfg.model.build(input_dim=data.features.shape[1], n_classes=data.n_classes, seed=seed).to(device)
    optimizer = train.make_optimizer(train_cfg, model)
    features = torch.as_tensor(data.features[train_index], device=device)
    targets = torch.as_tensor(data.targets[train_index], device=device)
    accumulation = train_cfg.grad_accumulation
    steps_per_epoch = math.ceil(len(train.row_batches(np.arange(len(train_index)), train_cfg.batch_size)) / accumulation)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: train.lr_factor(
        train_cfg, steps_per_epoch * train_cfg.epochs, steps_per_epoch, step))
    dtype = train.autocast_dtype(train_cfg, device)
    model.train()
    for epoch in range(epochs):
        batches = train.row_batches(train.epoch_order(len(train_index), seed, epoch).numpy(), train_cfg.batch_size)
        for index, batch in enumerate(batches):
            window_start = index // accumulation * accumulation
            window_end = min(len(batches), window_start + accumulation)
            rows = torch.as_tensor(batch, device=device)
            train.train_batch(model, features[rows], targets[rows], 1.0 / (window_end - window_start), dtype)
            if index + 1 == window_end:
                if train_cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
    return model.eval()


# --------------------------------------------------------------------------------------------------
# pretrained HF models


def _run_pretrained(cfg: Config, out: Any) -> None:
    from moespec.embedding import hf_moe

    src = cfg.source
    device = _resolve_device(src.model.device, out.device)
    loaded = hf_moe.load_moe_model(src.model.name, task=src.task, revision=src.model.revision,
                                   dtype=src.model.dtype, device=device,
                                   trust_remote_code=src.model.trust_remote_code, log=out.log)
    texts = load_texts(src.data, out.log)
    if len(texts) == 0:
        raise DataError("ablate.source.data: the sources gave no texts")
    sites = loaded.sites
    if len({site.n_experts for site in sites}) > 1:
        raise ConfigError(f"ablate.source.model.name: the MoE layers have different numbers of experts "
                          f"{sorted({s.n_experts for s in sites})}, which this stage does not support")
    layers, experts = _check_indices(cfg, len(sites), sites[0].n_experts)
    text_codes, names = _text_groups(cfg, texts)
    train_rows, eval_rows = _probe_split(cfg, texts)
    out.log.info("ablate %s (%d MoE layers x %d experts, top-%d) on %d texts (%d evaluated), task %s, modes %s",
                 src.model.name, len(sites), sites[0].n_experts, sites[0].top_k, len(texts), len(eval_rows),
                 src.task, ", ".join(cfg.modes))
    measure = _measure(src)

    def run(rows: np.ndarray, probe: Any = None, **settings: Any) -> Any:
        return hf_moe.run_texts(loaded, [texts.texts[r] for r in rows],
                                measure if probe is None else _probed(measure, probe), max_length=src.max_length,
                                batch_size=src.batch_size, tokens_per_pass=src.tokens_per_pass,
                                progress=lambda batches, total: out.progress(batches, total=total, desc="ablate"),
                                **settings)

    # Pass 1: unablated routing of every token (and the states the probe is fitted on).
    first = run(np.arange(len(texts)), record_routing=True)
    tokens = first.routing
    groups = Groups({k: v[eval_rows] for k, v in text_codes.items()},
                    {k: v[tokens.text] for k, v in text_codes.items()}, names)
    out.write("eval/row", eval_rows)
    for name, values in [("row", tokens.text), ("token_id", tokens.token_id), ("position", tokens.position)]:
        out.write(f"routing/{name}", values)
    _write_groups(out, groups)
    routing, plan = _analyse_routing(cfg, out, tokens.probs, tokens.expert_index, groups, [s.name for s in sites],
                                     layers, experts, tokens.token_id, tokens.text)

    # Pass 2: the evaluated texts, unablated and under every ablation (the probe frozen).
    probe = fit_probe(first.base[train_rows], texts.label[train_rows], src.probe, cfg.seed) \
        if src.task == "probe" else None
    second = run(eval_rows, probe, masks=plan.masks, layers=plan.layer,
                 modes=tuple(LIBRARY_MODE[m] for m in cfg.modes))
    ablated = dict(zip(cfg.modes, (second.ablated[LIBRARY_MODE[m]] for m in cfg.modes)))
    metric, weights = metric_name(cfg), None
    if src.task == "lm":
        weights = second.n_tokens.astype(np.float64)
        base_values = _per_token(second.base, second.n_tokens)
        values = {m: _per_token(v, second.n_tokens) for m, v in ablated.items()}
        out.write("eval/n_tokens", second.n_tokens)
    else:
        labels = texts.label[eval_rows]
        base_values = (second.base == labels).astype(np.float64)
        values = {m: (v == labels).astype(np.float64) for m, v in ablated.items()}
    rng = np.random.default_rng(cfg.seed)
    out.write("baseline/values", base_values)
    baseline_tables = tables_.baseline_tables(metric, base_values, groups, rng=rng, n_resamples=cfg.bootstrap,
                                              confidence=cfg.confidence, weights=weights)
    _write(out, baseline_tables)
    results = {mode: _compare(cfg, out, mode, metric, base_values, values[mode], plan, groups, rng, weights)
               for mode in cfg.modes}
    seed = _probe_seed_control(cfg, first.base, train_rows, texts, eval_rows, groups, base_values, rng, out)
    for key, value in {"source": "pretrained", "model_name": src.model.name, "model_revision": src.model.revision or "",
                       "model_commit": loaded.commit, "model_class": type(loaded.model).__name__, "task": src.task,
                       "device": device, "dtype": str(loaded.dtype).removeprefix("torch.")}.items():
        out.attrs[key] = value
    _finish(cfg, out, plan, routing, results, metric, groups, float(baseline_tables[f"baseline/{metric}"]),
            {"source": "pretrained", "model": src.model.name, "task": src.task, "n_eval": len(eval_rows),
             "n_tokens": int(len(tokens.text)), **seed})


def _resolve_device(requested: str, default: str) -> str:
    import torch

    device = default if requested == "auto" else requested
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"ablate.source.model.device: {requested!r} asks for a GPU but torch sees none; use 'auto' "
                          f"or 'cpu'")
    return device


def _text_groups(cfg: Config, texts: Any) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    codes, names = {"domain": texts.domain}, {"domain": list(texts.domain_names)}
    if "class" in cfg.by:
        _check_labels(texts, "by: 'class'")
        codes["class"], names["class"] = texts.label, list(texts.label_names)
    return codes, names


def _check_labels(texts: Any, what: str) -> None:
    unlabelled = int((texts.label < 0).sum())
    if unlabelled:
        raise DataError(f"ablate.source: {what} needs a label on every text, but {unlabelled} of {len(texts)} texts "
                        f"are unlabelled; give every source a label_field (or leave 'class' out of ablate.by)")


def _probe_split(cfg: Config, texts: Any) -> tuple[np.ndarray, np.ndarray]:
    """Probe: a class-stratified train/test split of the texts; LM: every text is evaluated."""
    if cfg.source.task == "lm":
        return np.zeros(0, dtype=np.int64), np.arange(len(texts), dtype=np.int64)
    from moespec.stages.train import stratified_split

    _check_labels(texts, "task 'probe'")
    return stratified_split(texts.label, cfg.source.probe.test_fraction, cfg.seed)


def _measure(src: PretrainedSource):
    from functools import partial

    from moespec.embedding import hf_moe

    return hf_moe.next_token_loss if src.task == "lm" else partial(hf_moe.pooled_state, pooling=src.probe.pooling)


def _probed(measure: Any, probe: Any):
    """The probe's class prediction of each text, from the pooled state ``measure`` returns."""
    return lambda model, batch: probe.predict(measure(model, batch))


def _per_token(nll_sums: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """Per-text mean next-token loss (0 for a text without targets, which then has weight 0)."""
    return np.where(n_tokens > 0, nll_sums / np.maximum(n_tokens, 1), 0.0)


def fit_probe(states: np.ndarray, labels: np.ndarray, probe_cfg: ProbeConfig, seed: int) -> Any:
    """A standardising logistic-regression probe, fitted once and then frozen."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(labels)) < 2:
        raise DataError(f"ablate.source: the probe's training texts hold {len(np.unique(labels))} class(es); "
                        f"it needs 2 or more")
    probe = make_pipeline(StandardScaler(), LogisticRegression(C=probe_cfg.c, max_iter=probe_cfg.max_iter,
                                                               random_state=seed))
    return probe.fit(states, labels)


def _probe_seed_control(cfg: Config, states: np.ndarray, train_rows: np.ndarray, texts: Any, eval_rows: np.ndarray,
                        groups: Groups, base_values: np.ndarray, rng: np.random.Generator, out: Any) -> dict:
    """Probe: refit on seeded bootstrap resamples of its training texts. LM: not applicable."""
    if cfg.source.task == "lm":
        return {"seed_control": "not applicable: a pretrained LM has one set of weights and a deterministic loss"}
    seeds = cfg.controls.retrain_seeds if cfg.controls.retrain_seeds is not None else [cfg.seed + 1]
    if not seeds:
        return {"seed_control": "off (controls.retrain_seeds: [])"}
    labels = texts.label[eval_rows]
    values = []
    for seed in seeds:
        resample = np.random.default_rng(seed).choice(train_rows, size=len(train_rows), replace=True)
        other = fit_probe(states[resample], texts.label[resample], cfg.source.probe, seed)
        values.append((other.predict(states[eval_rows]) == labels).astype(np.float64))
    return _write_seed_control(cfg, out, seeds, np.stack(values), base_values, "accuracy", groups, rng)
