"""The route stage: routers over the lora stage's domain adapters, judged on the same held-out texts.

Reads the ``lora`` artifact (its adapters, and through its config the base model, the texts and the
split) and evaluates every router of ``routers`` on the lora split's test texts:

``keyword``
    Rules from the config: the first rule with a keyword in the text picks its domain, else the
    default domain (:class:`moespec.models.text_routers.KeywordRouter`).
``learned``
    Logistic regression on the frozen base model's mean-pooled hidden state after block
    ``layer``, fitted on the lora split's training texts; one forward pass that stops at that block.
``oracle``
    The text's true domain.
``base``
    No adapter.
``merge``
    One adapter, the uniform average of every domain's update ``ΔW`` (PEFT ``add_weighted_adapter``
    with ``combination_type="cat"``, weights 1/n: the concatenated factors give exactly
    ``sum_i ΔW_i / n``).

Routing is hard (one adapter per text). Each text's summed NLL is computed once under every
adapter, the base and the merge; a router's loss on a text is the entry of its choice. Why a stage of
its own: routers are cheap to change and the adapters are not; with routers in their own section,
a new router or bootstrap setting reuses the trained adapters (their uid does not change).

Output (``M`` models = the adapters in domain order, then ``base``, then ``merge`` when asked;
``R`` routers; ``T`` test texts; ``D`` domains):

=============================  ==================  =============================================
dataset                        shape, dtype        meaning
=============================  ==================  =============================================
domain_names                   (D,) str
model_names                    (M,) str            adapter domains, ``base``, ``merge``
router_names, router_kinds     (R,) str
text_id, text_domain           (T,) str, int64     the test texts
text_tokens                    (T,) int64          predicted tokens of each text
text_nll                       (M, T) float64      summed NLL of each text under each model
loss_matrix[_low,_high]        (M, D) float64      token-weighted loss per model and domain
router_choice                  (R, T) int64        model chosen for each text (index into model_names)
router_domain                  (R, T) int64        domain chosen (-1: base and merge choose none)
router_confidence              (R, T) float64      probability of the choice (NaN: none)
router_domain_loss[_low,_high] (R, D) float64      loss per domain under the router's choices
router_domain_perplexity       (R, D) float64      exp of the loss (bounds: exp of the loss bounds)
router_loss[_low,_high]        (R,) float64        over all test texts
router_domain_gain[_low,_high] (R, D) float64      gain recovered per domain
router_domain_delta[...]       (R, D) float64      loss minus the base's on the same texts (paired)
gain_recovered[_low,_high]     (R,) float64        over all test texts
router_accuracy                (R,) float64        share of texts routed to their domain (NaN: none)
router_domain_accuracy         (R, D) float64
confusion                      (R, D, D) int64     true domain x chosen domain
calibration_error              (R,) float64        expected calibration error (NaN: no choice)
routing_seconds_per_text       (R,) float64        wall time of the routing decision per text
=============================  ==================  =============================================

Attributes: ``base_forward_seconds_per_text`` (one full forward pass of the base per text, timed in
the same run), ``confidence``, ``n_resamples``. Summary: ``router_accuracy``, ``gain_recovered``,
``router_loss``, ``calibration_error``, ``routing_seconds_per_text`` (each ``{router: value}``, for
the routers where it is defined: ``base`` and ``merge`` choose no domain, so have no accuracy),
``routing_cost_vs_base_forward``, ``own_adapter_best`` (per domain: is the domain's adapter the
best model for it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moespec.artifacts import ArtifactReader, ArtifactWriter, DatasetSpec
from moespec.errors import ArtifactError, ConfigError
from moespec.stages.base import StageConfig

NAME = "route"
SCHEMA_VERSION = 1


class _Router(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    #: Name of the router in tables and figures (default: its kind).
    name: Optional[str] = None

    #: Whether the model needs the uniform merge of the adapters as an extra column.
    uses_merge: ClassVar[bool] = False

    @property
    def label(self) -> str:
        return self.name or self.kind  # type: ignore[attr-defined]

    def named_domains(self) -> list[tuple[str, list[str]]]:
        """``(key, domain names)`` this router's config names, checked against ``lora.data``."""
        return []

    def decide(self, ctx: "RoutingContext") -> "_Decision":
        """This router's choice for every test text."""
        raise NotImplementedError


class KeywordRouterConfig(_Router):
    """Keyword rules: ``rules`` maps a domain to its keywords (first rule that matches wins)."""

    kind: Literal["keyword"] = "keyword"
    rules: dict[str, list[str]] = Field(min_length=1)
    default: Optional[str] = None
    case_sensitive: bool = False

    @model_validator(mode="after")
    def _has_default(self) -> "KeywordRouterConfig":
        if self.default is None:
            raise ValueError(
                "default: a keyword router needs a default domain for texts that match no rule "
                "(e.g. default: reasoning)"
            )
        return self

    def named_domains(self) -> list[tuple[str, list[str]]]:
        return [("rules", list(self.rules)), ("default", [self.default])]

    def decide(self, ctx: "RoutingContext") -> "_Decision":
        from moespec.models.text_routers import KeywordRouter

        keyword = KeywordRouter(self.rules, self.default, ctx.lora_cfg.domains, self.case_sensitive).fit()
        started = time.perf_counter()
        chosen = keyword.predict([ctx.texts.texts[i] for i in ctx.test])
        seconds = (time.perf_counter() - started) / max(len(ctx.test), 1)
        return _Decision(chosen, chosen, np.ones(len(ctx.test)), seconds)


class LearnedRouterConfig(_Router):
    """A classifier on the base model's mean-pooled hidden state after block ``layer`` (1-based).

    ``C`` is the inverse L2 strength of the logistic regression; ``max_train_texts`` caps the
    training texts per domain (a seeded draw).
    """

    kind: Literal["learned"] = "learned"
    layer: int = Field(2, ge=1)
    C: float = Field(1.0, gt=0.0)
    max_iter: int = Field(1000, ge=1)
    max_train_texts: Optional[int] = Field(None, ge=1)

    def decide(self, ctx: "RoutingContext") -> "_Decision":
        return _learned(self, ctx)


class OracleRouterConfig(_Router):
    """Always the true domain's adapter."""

    kind: Literal["oracle"] = "oracle"

    def decide(self, ctx: "RoutingContext") -> "_Decision":
        true = ctx.texts.domain[ctx.test]
        return _Decision(true.copy(), true.copy(), np.ones(len(true)), 0.0)


class BaseRouterConfig(_Router):
    """No adapter: the base model."""

    kind: Literal["base"] = "base"

    def decide(self, ctx: "RoutingContext") -> "_Decision":
        return _fixed(len(ctx.lora_cfg.domains), len(ctx.test))  # column D: the base


class MergeRouterConfig(_Router):
    """The uniform merge of every adapter."""

    kind: Literal["merge"] = "merge"
    uses_merge: ClassVar[bool] = True

    def decide(self, ctx: "RoutingContext") -> "_Decision":
        return _fixed(len(ctx.lora_cfg.domains) + 1, len(ctx.test))  # column D + 1: the merge


Router = Annotated[
    Union[KeywordRouterConfig, LearnedRouterConfig, OracleRouterConfig, BaseRouterConfig, MergeRouterConfig],
    Field(discriminator="kind"),
]


def _default_routers() -> list[Any]:
    return [OracleRouterConfig(), BaseRouterConfig(), LearnedRouterConfig()]


class Config(StageConfig):
    """The ``route`` section of an experiment (see the module docstring for what it writes).

    Attributes
    ----------
    routers : list of Router
        Must hold a ``base`` and an ``oracle`` router (the two ends of the gain recovered).
    batch_size : int
        Texts per forward pass.
    bootstrap : int
        Bootstrap resamples of the test texts (0: no intervals).
    confidence : float
        Coverage of the intervals.
    calibration_bins : int
        Equal-width confidence bins of the expected calibration error.
    seed : int
        Bootstrap and the learned routers' draws.
    """

    routers: list[Router] = Field(default_factory=_default_routers, min_length=2)
    batch_size: int = Field(16, ge=1)
    bootstrap: int = Field(1000, ge=0)
    confidence: float = Field(0.95, gt=0.0, lt=1.0)
    calibration_bins: int = Field(15, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _routers(self) -> "Config":
        labels = [r.label for r in self.routers]
        repeated = sorted({name for name in labels if labels.count(name) > 1})
        if repeated:
            raise ValueError(f"route.routers: names {repeated} are used twice; give each router its own name")
        kinds = {r.kind for r in self.routers}
        missing = [k for k in ("base", "oracle") if k not in kinds]
        if missing:
            raise ValueError(
                f"route.routers: gain recovered needs a base and an oracle router; add "
                f"{', '.join(f'{{kind: {k}}}' for k in missing)}"
            )
        return self


def inputs(cfg: Config) -> dict[str, str]:
    return {"lora": "lora"}


def experiment_problems(experiment: Any) -> list[str]:
    """Checks against the lora section: keyword rules and default name domains that exist."""
    lora_cfg = getattr(experiment, "lora", None)
    if lora_cfg is None:
        return []
    domains = lora_cfg.domains
    problems = []
    for index, router in enumerate(experiment.route.routers):
        for key, names in router.named_domains():
            unknown = [name for name in names if name not in domains]
            if unknown:
                problems.append(
                    f"route.routers[{index}].{key}: domain(s) {unknown} are not domains of lora.data "
                    f"({', '.join(domains)})"
                )
    return problems


def schema(cfg: Config) -> dict[str, DatasetSpec]:
    spec = {
        "domain_names": DatasetSpec(("D",), "str"),
        "model_names": DatasetSpec(("M",), "str"),
        "router_names": DatasetSpec(("R",), "str"),
        "router_kinds": DatasetSpec(("R",), "str"),
        "text_id": DatasetSpec(("T",), "str"),
        "text_domain": DatasetSpec(("T",), "int"),
        "text_tokens": DatasetSpec(("T",), "int"),
        "text_nll": DatasetSpec(("M", "T"), "float"),
        "router_choice": DatasetSpec(("R", "T"), "int"),
        "router_domain": DatasetSpec(("R", "T"), "int"),
        "router_confidence": DatasetSpec(("R", "T"), "float"),
        "router_domain_perplexity": DatasetSpec(("R", "D"), "float"),
        "router_accuracy": DatasetSpec(("R",), "float"),
        "router_domain_accuracy": DatasetSpec(("R", "D"), "float"),
        "confusion": DatasetSpec(("R", "D", "D"), "int"),
        "calibration_error": DatasetSpec(("R",), "float"),
        "routing_seconds_per_text": DatasetSpec(("R",), "float"),
    }
    for name, shape in (
        ("loss_matrix", ("M", "D")),
        ("router_domain_loss", ("R", "D")),
        ("router_loss", ("R",)),
        ("router_domain_gain", ("R", "D")),
        ("gain_recovered", ("R",)),
        ("router_domain_delta", ("R", "D")),
        ("router_domain_perplexity", ("R", "D")),
    ):
        for suffix in ("", "_low", "_high"):
            spec[name + suffix] = DatasetSpec(shape, "float")
    return spec


# --------------------------------------------------------------------------------------------------
# the recipe


def run(cfg: Config, inputs: dict[str, ArtifactReader], out: ArtifactWriter) -> None:
    """Score every text under every model, route with every router, and write the comparison."""
    from moespec.stages import lora

    reader = inputs["lora"]
    lora_cfg = lora.Config.model_validate(reader.config)
    texts = lora.domain_texts(lora_cfg, out.log)
    train, _, test = lora.text_splits(texts.domain, lora_cfg)
    if lora.split_digest(texts.text_id, test) != reader.attrs.get("split_digest"):
        raise ArtifactError(
            f"{reader.path}: the test texts recomputed from the lora config differ from those the "
            f"adapters were trained around (data sources changed since?)"
        )
    base, tokenizer = lora.load_base(
        lora_cfg,
        str(reader.attrs["base_path"]),
        out.device,
        out.log,
        str(reader.attrs.get("experts_implementation", "")),
    )
    model, model_names = _load_adapters(reader, base, any(r.uses_merge for r in cfg.routers))
    test_texts = [texts.texts[i] for i in test]
    tokens = _tokenize(tokenizer, test_texts, lora_cfg.max_length)
    with lora.threads_for(lora_cfg, sum(p.numel() for p in base.parameters()), out.device, out.log):
        nll, n_tokens, base_seconds = _score_models(model, model_names, tokens, cfg.batch_size, out)
        ctx = RoutingContext(model, tokenizer, texts, train, test, lora_cfg, cfg, out)
        decisions = [router.decide(ctx) for router in cfg.routers]
    domain = texts.domain[test]
    n_domains = len(lora_cfg.domains)
    _write(
        cfg,
        out,
        lora_cfg.domains,
        model_names,
        [texts.text_id[i] for i in test],
        domain,
        n_tokens,
        nll,
        decisions,
        n_domains,
        base_seconds,
    )


def _tokenize(tokenizer: Any, texts: list[str], max_length: int) -> Any:
    from moespec.models.adapters import tokenize_texts

    return tokenize_texts(tokenizer, texts, max_length)


def _load_adapters(reader: ArtifactReader, base: Any, merge: bool) -> tuple[Any, list[str]]:
    """Every domain's adapter on one PeftModel (named ``domain_<i>``), plus the uniform merge if asked."""
    from peft import PeftModel

    folders = reader.read("adapter_folder")
    order = np.argsort(reader.read("adapter_domain"))
    names = [f"domain_{i}" for i in range(len(order))]
    model = None
    for name, row in zip(names, order):
        folder = str(reader.path.parent / folders[row])
        if model is None:
            model = PeftModel.from_pretrained(base, folder, adapter_name=name)
        else:
            model.load_adapter(folder, adapter_name=name)
    model_names = [str(n) for n in np.asarray(reader.read("adapter_name"))[order]] + ["base"]
    if merge:
        model.add_weighted_adapter(names, [1.0 / len(names)] * len(names), "merge", combination_type="cat")
        model_names.append("merge")
    return model.eval(), model_names


def _score_models(
    model: Any, model_names: list[str], tokens: Any, batch_size: int, out: ArtifactWriter
) -> tuple[np.ndarray, np.ndarray, float]:
    """Summed NLL (M, T) of every test text under every model, tokens (T,), base seconds per text."""
    from moespec.models.adapters import text_nll

    rows = []
    for index, name in enumerate(model_names):
        if name == "base":
            started = time.perf_counter()
            with model.disable_adapter():
                nll, n_tokens = text_nll(model, tokens, batch_size, out.device)
            base_seconds = (time.perf_counter() - started) / max(len(tokens), 1)
        else:
            model.set_adapter("merge" if name == "merge" else f"domain_{index}")
            nll, n_tokens = text_nll(model, tokens, batch_size, out.device)
        rows.append(nll)
        out.log.info(
            "route: %s: test loss %.4f over %d tokens", name, nll.sum() / max(n_tokens.sum(), 1), n_tokens.sum()
        )
    return np.stack(rows), n_tokens, base_seconds


class _Decision:
    """One router's choices: model column, domain (-1: none) and confidence per text; seconds per text."""

    def __init__(self, choice: np.ndarray, domain: np.ndarray, confidence: np.ndarray, seconds: float):
        self.choice, self.domain, self.confidence, self.seconds = choice, domain, confidence, seconds


@dataclass(frozen=True)
class RoutingContext:
    """What a router may use: the model with its adapters, the texts and their splits, the configs."""

    model: Any
    tokenizer: Any
    texts: Any
    train: np.ndarray
    test: np.ndarray
    lora_cfg: Any
    cfg: Config
    out: ArtifactWriter


def _fixed(column: int, n_test: int) -> _Decision:
    """The same model column for every text, no domain chosen (the base, the merge)."""
    return _Decision(np.full(n_test, column), np.full(n_test, -1), np.full(n_test, np.nan), 0.0)


def _learned(router: LearnedRouterConfig, ctx: RoutingContext) -> _Decision:
    """Fit the classifier on the training texts' pooled states (adapters off), route the test texts."""
    from moespec.models.adapters import decoder_blocks, pooled_hidden
    from moespec.models.text_routers import LearnedRouter

    model, tokenizer, texts, train, test = ctx.model, ctx.tokenizer, ctx.texts, ctx.train, ctx.test
    lora_cfg, cfg, out = ctx.lora_cfg, ctx.cfg, ctx.out

    n_blocks = len(decoder_blocks(model.get_base_model()))
    if router.layer > n_blocks:
        raise ConfigError(
            f"route.routers: learned router {router.label!r}: layer {router.layer} is above the "
            f"{n_blocks} blocks of the base model {lora_cfg.base.name!r}"
        )
    fit_rows = _capped(train, texts.domain, router.max_train_texts, cfg.seed)
    encode = lambda rows: _tokenize(tokenizer, [texts.texts[i] for i in rows], lora_cfg.max_length)  # noqa: E731
    test_tokens = encode(test)  # tokenised outside the timing, as for the base forward pass it is compared to
    with model.disable_adapter():
        classifier = LearnedRouter(C=router.C, max_iter=router.max_iter, random_state=cfg.seed)
        classifier.fit(
            pooled_hidden(model, encode(fit_rows), router.layer, cfg.batch_size, out.device), texts.domain[fit_rows]
        )
        started = time.perf_counter()
        features = pooled_hidden(model, test_tokens, router.layer, cfg.batch_size, out.device)
        probs = classifier.predict_proba(features)  # (T, n_classes)
        seconds = (time.perf_counter() - started) / max(len(test), 1)
    chosen = classifier.classes_[probs.argmax(axis=1)]
    out.log.info("route: learned router %s on block %d: %d training texts", router.label, router.layer, len(fit_rows))
    return _Decision(chosen, chosen, probs.max(axis=1), seconds)


def _capped(rows: np.ndarray, domain: np.ndarray, cap: Optional[int], seed: int) -> np.ndarray:
    """At most ``cap`` rows per domain, a seeded draw (all rows when ``cap`` is None)."""
    if cap is None:
        return rows
    rng = np.random.default_rng(seed)
    kept = [rng.permutation(rows[domain[rows] == d])[:cap] for d in np.unique(domain[rows])]
    return np.sort(np.concatenate(kept))


# --------------------------------------------------------------------------------------------------
# outputs


def _write(
    cfg: Config,
    out: ArtifactWriter,
    domains: list[str],
    model_names: list[str],
    text_id: list[str],
    domain: np.ndarray,
    n_tokens: np.ndarray,
    nll: np.ndarray,
    decisions: list[_Decision],
    n_domains: int,
    base_seconds: float,
) -> None:
    from moespec.specialisation.adapter_routing import confusion_counts, expected_calibration_error, router_losses

    kinds = [r.kind for r in cfg.routers]
    names = [r.label for r in cfg.routers]
    choice = np.stack([d.choice for d in decisions])  # (R, T)
    routed_nll = np.take_along_axis(nll, choice, axis=0)  # (R, T): each text's NLL under each router's choice
    rng = np.random.default_rng(cfg.seed)
    losses = router_losses(
        routed_nll,
        n_tokens,
        domain,
        n_domains,
        kinds.index("base"),
        kinds.index("oracle"),
        rng=rng,
        n_resamples=cfg.bootstrap,
        confidence=cfg.confidence,
    )
    # The loss matrix reuses the same bootstrap; its rows are models, so its gains are not used.
    matrix = router_losses(
        nll, n_tokens, domain, n_domains, n_domains, 0, rng=rng, n_resamples=cfg.bootstrap, confidence=cfg.confidence
    )
    chosen_domain = np.stack([d.domain for d in decisions])
    routes = np.array([k not in ("base", "merge") for k in kinds])
    correct = chosen_domain == domain[None, :]
    accuracy = np.where(routes, correct.mean(axis=1), np.nan)
    domain_accuracy = np.array(
        [
            [correct[r, domain == d].mean() if routes[r] and (domain == d).any() else np.nan for d in range(n_domains)]
            for r in range(len(kinds))
        ]
    )
    confusion = np.stack(
        [
            confusion_counts(domain, chosen_domain[r], n_domains)
            if routes[r]
            else np.zeros((n_domains, n_domains), np.int64)
            for r in range(len(kinds))
        ]
    )
    confidence = np.stack([d.confidence for d in decisions])
    ece = np.array(
        [
            expected_calibration_error(confidence[r], correct[r], cfg.calibration_bins) if routes[r] else np.nan
            for r in range(len(kinds))
        ]
    )
    seconds = np.array([d.seconds for d in decisions])
    arrays = {
        "domain_names": domains,
        "model_names": model_names,
        "router_names": names,
        "router_kinds": kinds,
        "text_id": text_id,
        "text_domain": domain,
        "text_tokens": n_tokens,
        "text_nll": nll,
        "loss_matrix": matrix.domain_loss,
        "loss_matrix_low": matrix.domain_loss_low,
        "loss_matrix_high": matrix.domain_loss_high,
        "router_choice": choice,
        "router_domain": chosen_domain,
        "router_confidence": confidence,
        "router_accuracy": accuracy,
        "router_domain_accuracy": domain_accuracy,
        "confusion": confusion,
        "calibration_error": ece,
        "routing_seconds_per_text": seconds,
        **_loss_arrays(losses),
    }
    for name, values in arrays.items():
        out.write(name, np.asarray(values, dtype=object) if isinstance(values, list) else values)
    out.attrs["base_forward_seconds_per_text"] = base_seconds
    out.attrs["confidence"], out.attrs["n_resamples"] = cfg.confidence, cfg.bootstrap
    own_best = [bool(np.nanargmin(matrix.domain_loss[: n_domains + 1, d]) == d) for d in range(n_domains)]
    # Only defined values: base and merge route nowhere, so they have no accuracy or calibration error.
    plain = lambda values: {n: round(float(v), 6) for n, v in zip(names, values) if np.isfinite(v)}  # noqa: E731
    out.summary.update(
        router_accuracy=plain(accuracy),
        gain_recovered=plain(losses.gain),
        router_loss=plain(losses.loss),
        calibration_error=plain(ece),
        routing_seconds_per_text=plain(seconds),
        base_forward_seconds_per_text=round(base_seconds, 6),
        routing_cost_vs_base_forward=plain(seconds / base_seconds if base_seconds > 0 else seconds * 0),
        own_adapter_best=dict(zip(domains, own_best)),
    )


def _loss_arrays(losses: Any) -> dict[str, np.ndarray]:
    arrays = {}
    for name, field in (
        ("router_domain_loss", "domain_loss"),
        ("router_loss", "loss"),
        ("router_domain_gain", "domain_gain"),
        ("gain_recovered", "gain"),
        ("router_domain_delta", "domain_delta"),
    ):
        for suffix in ("", "_low", "_high"):
            arrays[name + suffix] = getattr(losses, field + suffix)
    for suffix in ("", "_low", "_high"):
        arrays["router_domain_perplexity" + suffix] = np.exp(getattr(losses, "domain_loss" + suffix))
    return arrays
