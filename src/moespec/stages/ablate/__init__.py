"""The ablate stage: expert ablation and specialisation analysis, for our trained MoEs and pretrained HF MoEs.

Each selected expert of each MoE layer is removed in each mode (``mask``: the router logit is -inf
before the top-k, inputs re-route; ``zero``: routing kept, the expert's contribution removed;
``renormalise``: the expert leaves the selected set, the rest is renormalised), and the change of a
per-input metric is measured against the unablated model with paired bootstrap intervals, beside
control sets of random experts matched on load and a seed control. Routing statistics and
specialisation tables (load, importance, entropy, NMI and lift per class, domain, stratum or token)
come from the same unablated pass. Every dataset the stage writes is listed with its shape and
meaning in ``docs/artifacts/ablate.md``; :func:`schema` is what is checked.

Modules
-------
``__init__``
    The config (a tagged union of sources), the declared inputs, the schema and :func:`run`.
``common``
    What both sources share: index checks, the routing and comparison tables, the summary table,
    one writer of the tables, one seeded generator per comparison.
``trained``
    The model of the ``train`` stage on the rows it held out (batched E-way ablation).
``pretrained``
    A Hugging Face MoE on texts (router hooks; next-token loss or a frozen probe).
``lm``
    The MoE language model of the ``lm`` stage on its validation texts, through ``pretrained``.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moespec.artifacts import ArtifactReader, ArtifactWriter, DatasetSpec
from moespec.data.sources import BuiltinSource, Source, source_domains
from moespec.specialisation import metrics as spec
from moespec.stages.base import StageConfig

NAME = "ablate"
SCHEMA_VERSION = 1

ModeName = Literal["mask", "zero", "renormalise"]
#: Config mode -> mode of ``moespec.models.routing.Ablation`` (whose "drop" is the renormalising one).
LIBRARY_MODE = {"mask": "mask", "zero": "zero", "renormalise": "drop"}
GroupKey = Literal["class", "domain", "stratum", "token"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: A source whose inputs carry class labels (``by: class`` is possible).
    has_labels: ClassVar[bool] = True


class TrainedSource(_Section):
    """Ablate the model of the ``train`` stage (:mod:`moespec.stages.ablate.trained`).

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

    #: Group keys this source can provide besides ``domain`` and ``class``.
    extra_group_keys: ClassVar[tuple[str, ...]] = ("stratum",)
    #: Routed inputs are rows (not tokens with ids and positions).
    routes_tokens: ClassVar[bool] = False
    #: Random control sets per ablated expert by default: all run in the same batched pass.
    default_random_sets: ClassVar[int] = 5

    def inputs(self, by: list[str]) -> dict[str, str]:
        """``{"train": "train", "data": <train's input>}`` (+ ``"strata": "fiber"``)."""
        declared = {"train": "train", "data": self.input}
        if "stratum" in by:
            declared["strata"] = "fiber"
        return declared


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
    extra_group_keys: ClassVar[tuple[str, ...]] = ("token",)
    routes_tokens: ClassVar[bool] = True
    #: One random control set by default: each costs a pass over the data.
    default_random_sets: ClassVar[int] = 1
    model: PretrainedModel
    data: list[Source] = Field(default_factory=lambda: [BuiltinSource()])
    task: Literal["lm", "probe"] = "lm"
    max_length: int = Field(128, ge=2)
    batch_size: int = Field(8, ge=1)
    tokens_per_pass: int = Field(8192, ge=1)
    probe: ProbeConfig = ProbeConfig()

    def inputs(self, by: list[str]) -> dict[str, str]:
        return {}

    @property
    def metric(self) -> str:
        """The per-input metric: per-text next-token loss, or the probe's correctness."""
        return "nll" if self.task == "lm" else "accuracy"

    @model_validator(mode="after")
    def _distinct_domains(self) -> "PretrainedSource":
        if not self.data:
            raise ValueError("data: give at least one text source (e.g. [{kind: builtin}])")
        domains = [d for source in self.data for d in source_domains(source)]
        repeated = sorted({d for d in domains if domains.count(d) > 1})
        if repeated:
            raise ValueError(f"data: domain(s) {repeated} come from more than one source; give each its own 'domain'")
        return self


class LMSource(_Section):
    """Ablate the MoE language model of an ``lm`` artifact on its own validation texts.

    The ``lm`` stage saved a standard HF folder (``model/``) and its validation texts
    (``val/texts``, ``val/domain``); they go through the pretrained-model path unchanged
    (:mod:`moespec.stages.ablate.lm`): next-token loss per text, router hooks, batched masking.

    Attributes
    ----------
    max_length, batch_size, tokens_per_pass : int
        As for :class:`PretrainedSource`.
    dtype : {"auto", "float32", "bfloat16", "float16"}
    device : {"auto", "cpu", "cuda"}
    """

    kind: Literal["lm"] = "lm"
    extra_group_keys: ClassVar[tuple[str, ...]] = ("token",)
    routes_tokens: ClassVar[bool] = True
    default_random_sets: ClassVar[int] = 1
    #: Its texts carry domains only (no class labels).
    has_labels: ClassVar[bool] = False
    #: Next-token loss per text; no probe.
    task: ClassVar[str] = "lm"
    metric: ClassVar[str] = "nll"
    probe: ClassVar[ProbeConfig] = ProbeConfig()
    max_length: int = Field(256, ge=2)
    batch_size: int = Field(8, ge=1)
    tokens_per_pass: int = Field(8192, ge=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def inputs(self, by: list[str]) -> dict[str, str]:
        return {"lm": "lm"}


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
    source : TrainedSource, PretrainedSource or LMSource
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

    source: Annotated[Union[TrainedSource, PretrainedSource, LMSource], Field(discriminator="kind")] = TrainedSource()
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
        needs = {
            "token": "token ids, which only a pretrained source has",
            "stratum": "fiber strata, which only a trained source has",
        }
        for key in set(self.by) & set(needs) - set(self.source.extra_group_keys):
            raise ValueError(f"by: {key!r} needs {needs[key]}")
        if not self.source.has_labels and "class" in self.by:
            raise ValueError(
                "by: 'class' needs labels; an lm artifact's validation texts have domains only "
                "(e.g. by: [domain, token])"
            )
        return self

    @property
    def random_sets(self) -> int:
        if self.controls.random_sets is not None:
            return self.controls.random_sets
        return self.source.default_random_sets


def inputs(cfg: Config) -> dict[str, str]:
    """What the source reads: the train stage's model and its data (+ fiber strata); nothing for a hub model."""
    return cfg.source.inputs(list(cfg.by))


def schema(cfg: Config) -> dict[str, DatasetSpec]:
    pretrained = cfg.source.routes_tokens
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
            spec_[f"specialisation/{key}/{name}"] = DatasetSpec(
                ("L", f"G_{key}", "E"), "int" if name == "counts" else "float"
            )
        spec_[f"specialisation/{key}/nmi"] = DatasetSpec(("L",), "float")
        spec_[f"names/{key}"] = DatasetSpec((f"G_{key}",), "str")
    for mode in cfg.modes:
        # The metric depends on the trained model's kind, known only at run time: check the delta
        # of whichever metric is there through the per-input values, which every kind writes.
        spec_[f"ablation/{mode}/values"] = DatasetSpec(("A", "N"), "float")
    return spec_


def run(cfg: Config, inputs: dict[str, ArtifactReader], out: ArtifactWriter) -> None:
    """Ablate every selected expert in every mode; write routing, specialisation and ablation tables."""
    importlib.import_module(f"{__name__}.{cfg.source.kind}").run(cfg, inputs, out)
