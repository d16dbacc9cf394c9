"""Model configs: pydantic models that validate a model's settings and build it.

This module imports no torch (configs are loaded on laptops without the compute extra); ``build``
imports the model modules when called.

``ModelConfig`` is a tagged union on ``kind``; a stage config holds one and calls
``cfg.build(input_dim=..., n_classes=..., seed=...)``. Building draws every initial weight from a
``torch.Generator`` seeded with ``seed``; the global RNG is neither read nor advanced.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

import numpy as np

from pydantic import BaseModel, ConfigDict, Field, model_validator

#: Non-linearity of the FFN experts (SwiGLU as Mixtral, or a plain GELU/ReLU two-matrix FFN).
Activation = Literal["swiglu", "gelu", "relu"]

#: What makes two samples a positive pair (dictionary MoE) or what the classifier predicts (top-k).
#: "domain_label" pairs (domain, label): label ids of different datasets are different classes.
TargetKey = Literal["label", "domain", "domain_label"]

PositiveInt = Annotated[int, Field(ge=1)]
NonNegativeFloat = Annotated[float, Field(ge=0.0)]

#: The earlier pipeline's seven sparsity levels (docs/moe.md, "The earlier pipeline (dictionary-expert MoE)").
DEFAULT_SPARSITY_LEVELS = (8, 12, 16, 20, 24, 28, 32)


class _ModelConfigBase(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Expected input width; None takes it from the data. Set, it must match the data at build time.
    input_dim: PositiveInt | None = None

    def _input_dim(self, input_dim: int) -> int:
        if self.input_dim is not None and self.input_dim != input_dim:
            raise ValueError(f"{self.kind} model expects input dimension {self.input_dim}, the data has {input_dim}")
        return input_dim


def default_sparsity_levels(n_experts: int, code_dim: int) -> list[int]:
    """``n_experts`` levels evenly spaced from min(8, code_dim) to code_dim (8, 12, ..., 32 for 7 and 32)."""
    low = min(8, code_dim)
    if n_experts == 1:
        return [code_dim]
    return [round(low + (code_dim - low) * i / (n_experts - 1)) for i in range(n_experts)]


class DictionaryMoEConfig(_ModelConfigBase):
    """The dictionary-expert (LISTA) MoE; see ``moespec.models.dictionary``.

    Defaults follow the earlier pipeline (7 experts, query 128, code 32, 5 layers, sparsity 8..32,
    projection 32 -> 64, margin 1.0, balance weight 0.01) except where it was degenerate: routing
    is trainable ("soft"), the reconstruction loss is on (weight 0.1, see below), the balance weight
    is 0.3, and positives are same (domain, label).
    """

    kind: Literal["dictionary"] = "dictionary"
    n_experts: PositiveInt = 7
    query_dim: PositiveInt = 128
    code_dim: PositiveInt = 32
    n_layers: PositiveInt = 5
    sparsity_levels: list[PositiveInt] | None = Field(
        default=None, description="k_e per expert; default evenly spaced from 8 to code_dim"
    )
    shrinkage: Literal["topk", "soft"] = "topk"
    soft_threshold_init: Annotated[float, Field(gt=0.0)] = 0.1
    routing: Literal["soft", "straight_through"] = "soft"
    projection_hidden: PositiveInt = 32
    projection_dim: PositiveInt = 64
    margin: Annotated[float, Field(gt=0.0)] = 1.0
    positive_pairs: TargetKey = "domain_label"
    contrastive_weight: NonNegativeFloat = 1.0
    # Weighted by the routing, the reconstruction term also pushes the gate towards the experts with
    # the most atoms (k = 32 always reconstructs better than k = 8), which starves the sparse ones. On
    # MiniLM embeddings of the built-in corpus (6 domains, 2,400 texts, PCA 64; bench/dictionary_experts.py,
    # 4 seeds) 1.0 left 2-3 of 7 experts below 2 % of held-out traffic (loads 0, 0, 0.02, ...), 0.1 kept
    # every expert above 7 % and raised held-out accuracy (0.80 vs 0.77); the dictionaries are still
    # trained (Adam rescales their gradient, which only this term provides).
    reconstruction_weight: NonNegativeFloat = 0.1
    # Not the 0.01 of Switch: that value assumes token-level batches of thousands. On the demo
    # (1,200 texts, batch 64, soft routing) 0.01 left 4 of 7 experts dead (63 % on one); 0.3 kept
    # all 7 in use (largest 24 %) at the same held-out accuracy (0.41 vs 0.43); 1.0 cost accuracy.
    balance_loss_weight: NonNegativeFloat = 0.3

    @model_validator(mode="before")
    @classmethod
    def _fill_sparsity_levels(cls, data: Any) -> Any:
        # Filled before validation so that the stored (and hashed) config states the levels it uses.
        if isinstance(data, dict) and data.get("sparsity_levels") is None:
            n_experts, code_dim = data.get("n_experts", 7), data.get("code_dim", 32)
            if isinstance(n_experts, int) and isinstance(code_dim, int) and n_experts >= 1 and code_dim >= 1:
                data = {**data, "sparsity_levels": default_sparsity_levels(n_experts, code_dim)}
        return data

    @model_validator(mode="after")
    def _check_sparsity_levels(self) -> DictionaryMoEConfig:
        levels = self.sparsity_levels or []
        if len(levels) != self.n_experts:
            raise ValueError(f"sparsity_levels must have n_experts={self.n_experts} entries, got {len(levels)}")
        too_large = [k for k in levels if k > self.code_dim]
        if too_large:
            raise ValueError(f"sparsity_levels must be <= code_dim={self.code_dim}, got {too_large}")
        return self

    def build(self, *, input_dim: int, n_classes: int | None = None, seed: int = 0):
        """Build the ``DictionaryMoE`` (``n_classes`` is unused: the model is trained contrastively)."""
        import torch

        from moespec.models.dictionary import DictionaryMoE

        model = DictionaryMoE(
            input_dim=self._input_dim(input_dim),
            sparsity_levels=list(self.sparsity_levels or []),
            query_dim=self.query_dim,
            code_dim=self.code_dim,
            n_layers=self.n_layers,
            shrinkage=self.shrinkage,
            soft_threshold_init=self.soft_threshold_init,
            routing=self.routing,
            projection_hidden=self.projection_hidden,
            projection_dim=self.projection_dim,
            margin=self.margin,
            contrastive_weight=self.contrastive_weight,
            reconstruction_weight=self.reconstruction_weight,
            balance_loss_weight=self.balance_loss_weight,
        )
        model.reset_parameters(torch.Generator().manual_seed(seed))
        return model

    #: Loss terms of ``loss_terms`` (``total`` is the one minimised).
    loss_terms: ClassVar[tuple[str, ...]] = ("contrastive", "reconstruction", "balance", "total")
    #: The config key that names the training target (for messages).
    target_key: ClassVar[str] = "positive_pairs"
    #: The per-input metric of an ablation: the model's reconstruction loss term.
    ablation_metric: ClassVar[str] = "reconstruction"

    @property
    def target(self) -> TargetKey:
        """The sample key the training objective needs (here: what defines positive pairs)."""
        return self.positive_pairs

    def training_targets(
        self, domain: np.ndarray, label: np.ndarray, domain_names: list[str], label_names: list[str]
    ) -> tuple[np.ndarray, None, list[str]]:
        """Contrastive keys per row (two columns for ``domain_label``); no classes."""
        keys = {"label": label, "domain": domain, "domain_label": np.stack([domain, label], axis=1)}
        return keys[self.positive_pairs], None, []

    def heldout_schema(self) -> dict[str, Any]:
        from moespec.artifacts import DatasetSpec

        return {"heldout/embedding": DatasetSpec(("n_val", "P"), "float")}

    def heldout_outputs(self, output: np.ndarray, targets: np.ndarray, target_names: list[str]) -> dict[str, Any]:
        """What the train stage writes of the held-out rows beyond their routing: the projections."""
        return {"heldout/embedding": output.astype(np.float32)}

    def active_parameter_count(self, input_dim: int) -> int:
        """Parameters that can change one input's output (``moespec.models.baseline.active_parameters``
        of the built model, computed without building it)."""
        return _dictionary_active(self, input_dim, self.code_dim, self.n_experts)

    def dense_twin(self, input_dim: int) -> DictionaryMoEConfig:
        """One expert whose code width gives the nearest active parameter count to this MoE's.

        The twin keeps the experts' kind (unrolled LISTA, the same shrinkage) and its sparsity ratio:
        its one sparsity level is the mean of this config's levels, scaled to the twin's code width.
        """
        target = self.active_parameter_count(input_dim)
        width = min(
            range(1, 16 * self.code_dim * self.n_experts + 1),
            key=lambda m: abs(_dictionary_active(self, input_dim, m, 1) - target),
        )
        levels = self.sparsity_levels or []
        level = max(1, min(width, round(sum(levels) / len(levels) / self.code_dim * width)))
        return self.model_copy(update={"n_experts": 1, "code_dim": width, "sparsity_levels": [level]})


class TopKMoEConfig(_ModelConfigBase):
    """The top-k MoE classifier ("TinyMoE"); see ``moespec.models.topk``.

    ``renormalize`` None picks the convention that lets the router learn: Mixtral renormalisation
    for top_k >= 2, Switch raw probabilities for top_k = 1.
    """

    kind: Literal["topk"] = "topk"
    n_experts: PositiveInt = 4
    top_k: PositiveInt = 2
    renormalize: bool | None = None
    hidden_dim: PositiveInt = 64
    ffn_dim: PositiveInt = 128
    n_layers: PositiveInt = 1
    activation: Activation = "swiglu"
    shared_expert: bool = False
    shared_expert_dim: PositiveInt | None = Field(default=None, description="default: ffn_dim")
    router_init_std: Annotated[float, Field(gt=0.0)] = 0.02
    balance_loss_weight: NonNegativeFloat = 0.01
    z_loss_weight: NonNegativeFloat = 0.001
    target: TargetKey = "label"

    @model_validator(mode="after")
    def _check_routing(self) -> TopKMoEConfig:
        if self.top_k > self.n_experts:
            raise ValueError(f"top_k must be <= n_experts={self.n_experts}, got {self.top_k}")
        if self.top_k == 1 and self.renormalize:
            raise ValueError(
                "renormalize=true with top_k=1 makes every routing weight 1, so the router gets no "
                "gradient from the task loss; leave renormalize unset (Switch weights) or use top_k >= 2"
            )
        if self.shared_expert_dim is not None and not self.shared_expert:
            raise ValueError("shared_expert_dim is set but shared_expert is false")
        return self

    loss_terms: ClassVar[tuple[str, ...]] = ("classification", "balance", "z", "total")
    target_key: ClassVar[str] = "target"
    #: The per-input metric of an ablation: correct (1) or not (0).
    ablation_metric: ClassVar[str] = "accuracy"

    def training_targets(
        self, domain: np.ndarray, label: np.ndarray, domain_names: list[str], label_names: list[str]
    ) -> tuple[np.ndarray, int, list[str]]:
        """Class id per row, the number of classes and their names.

        ``domain_label`` numbers the (domain, label) pairs that occur densely: label ids of
        different domains are never merged.
        """
        if self.target == "domain":
            targets, names = domain, domain_names or [f"domain {d}" for d in range(int(domain.max()) + 1)]
        elif self.target == "label":
            targets, names = label, label_names or [f"label {c}" for c in range(int(label.max()) + 1)]
        else:
            pairs, inverse = np.unique(np.stack([domain, label], axis=1), axis=0, return_inverse=True)
            targets = inverse.reshape(-1).astype(np.int64)
            names = [f"{_name(domain_names, d)}/{_name(label_names, c)}" for d, c in pairs]
        if len(names) < 2:
            raise ValueError(f"{self.target!r} gives {len(names)} class(es); a classifier needs >= 2")
        return targets, len(names), names

    def heldout_schema(self) -> dict[str, Any]:
        from moespec.artifacts import DatasetSpec

        return {
            "heldout/target": DatasetSpec(("n_val",), "int"),
            "heldout/prediction": DatasetSpec(("n_val",), "int"),
            "target_names": DatasetSpec(("n_classes",), "str"),
        }

    def heldout_outputs(self, output: np.ndarray, targets: np.ndarray, target_names: list[str]) -> dict[str, Any]:
        """What the train stage writes of the held-out rows beyond their routing: targets and predictions."""
        return {
            "heldout/target": targets,
            "heldout/prediction": output.argmax(axis=-1).astype(np.int64),
            "target_names": list(target_names),
        }

    @property
    def renormalizes(self) -> bool:
        """The routing convention in effect (resolves ``renormalize=None``)."""
        return self.top_k > 1 if self.renormalize is None else self.renormalize

    def active_parameter_count(self, input_dim: int, n_classes: int) -> int:
        """Parameters that can change one input's output (``moespec.models.baseline.active_parameters``
        of the built model, computed without building it)."""
        return _topk_active(self, input_dim, n_classes, self.ffn_dim, self.n_experts, self.top_k)

    def dense_twin(self, input_dim: int) -> TopKMoEConfig:
        """One expert of width ``k ffn_dim`` plus the router's parameters, rounded to a whole unit.

        A unit of FFN width costs ``3 H`` (SwiGLU) or ``2 H`` parameters, so the counts agree to
        within half of that per layer; the shared expert, norms and head are kept as they are.
        """
        per_unit = (3 if self.activation == "swiglu" else 2) * self.hidden_dim
        width = round((self.top_k * per_unit * self.ffn_dim + self.hidden_dim * self.n_experts) / per_unit)
        return self.model_copy(
            update={
                "n_experts": 1,
                "top_k": 1,
                "renormalize": None,
                "ffn_dim": width,
                "shared_expert_dim": self.shared_expert_dim or (self.ffn_dim if self.shared_expert else None),
            }
        )

    def build(self, *, input_dim: int, n_classes: int | None = None, seed: int = 0):
        """Build the ``TopKMoEClassifier`` for ``n_classes`` classes."""
        import torch

        from moespec.models.topk import TopKMoEClassifier

        if n_classes is None or n_classes < 2:
            raise ValueError(f"the top-k classifier needs n_classes >= 2, got {n_classes}")
        model = TopKMoEClassifier(
            input_dim=self._input_dim(input_dim),
            n_classes=n_classes,
            hidden_dim=self.hidden_dim,
            ffn_dim=self.ffn_dim,
            n_layers=self.n_layers,
            n_experts=self.n_experts,
            top_k=self.top_k,
            renormalize=self.renormalizes,
            activation=self.activation,
            shared_expert_dim=(self.shared_expert_dim or self.ffn_dim) if self.shared_expert else None,
            router_init_std=self.router_init_std,
            balance_loss_weight=self.balance_loss_weight,
            z_loss_weight=self.z_loss_weight,
        )
        model.reset_parameters(torch.Generator().manual_seed(seed))
        return model


def _name(names: list[str], index: int) -> str:
    return names[index] if 0 <= index < len(names) else str(index)


def _dictionary_active(cfg: DictionaryMoEConfig, input_dim: int, code_dim: int, n_experts: int) -> int:
    """Active parameters of a dictionary MoE of ``n_experts`` experts of width ``code_dim``."""
    d, m, layers = input_dim, code_dim, cfg.n_layers
    expert = layers * m * d + layers * m * m + d * m + (layers * m if cfg.shrinkage == "soft" else 0)
    head = (
        m * cfg.projection_hidden
        + cfg.projection_hidden
        + cfg.projection_hidden * cfg.projection_dim
        + cfg.projection_dim
    )
    if n_experts == 1:
        return expert + head  # a one-expert gate is constant
    gate = d * cfg.query_dim + cfg.query_dim + n_experts * cfg.query_dim
    used = n_experts if cfg.routing == "soft" else 1
    return gate + used * expert + head


def _topk_active(cfg: TopKMoEConfig, input_dim: int, n_classes: int, ffn_dim: int, n_experts: int, top_k: int) -> int:
    """Active parameters of a top-k classifier with ``n_experts`` experts of width ``ffn_dim``."""
    h = cfg.hidden_dim
    per_unit = (3 if cfg.activation == "swiglu" else 2) * h
    shared = per_unit * (cfg.shared_expert_dim or cfg.ffn_dim) if cfg.shared_expert else 0
    router = h * n_experts if n_experts > 1 else 0  # a one-expert router is constant
    layer = 2 * h + router + top_k * per_unit * ffn_dim + shared  # pre-norm LayerNorm weight and bias
    return input_dim * h + h + cfg.n_layers * layer + 2 * h + h * n_classes + n_classes


#: Either model, chosen by ``kind``.
ModelConfig = Annotated[Union[DictionaryMoEConfig, TopKMoEConfig], Field(discriminator="kind")]
