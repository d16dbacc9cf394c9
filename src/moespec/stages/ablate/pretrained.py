"""The ablate stage on a pretrained Hugging Face MoE (Mixtral family, Qwen2-MoE, OLMoE, Switch encoders).

Texts come from the same sources as ``embed``. ``task: lm`` measures next-token loss per text;
``task: probe`` fits one logistic-regression probe on the pooled last hidden states of the
unablated model (training texts) and keeps it frozen while experts are ablated (test texts).
Router logits are captured by hooks (:mod:`moespec.embedding.hf_moe`); ablations patch the routing
in a hook; the blocks before an ablated layer are computed once per batch and replayed; several
ablations run in one pass as copies of the batch (``tokens_per_pass``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moespec.artifacts import ArtifactReader, ArtifactWriter
from moespec.data.sources import load_texts
from moespec.errors import ConfigError, DataError
from moespec.specialisation.ablation import Groups
from moespec.stages.ablate import common


def run(cfg: Any, inputs: dict[str, ArtifactReader], out: ArtifactWriter) -> None:
    from moespec.embedding import hf_moe

    src = cfg.source
    device = _resolve_device(src.model.device, out.device)
    loaded = hf_moe.load_moe_model(
        src.model.name,
        task=src.task,
        revision=src.model.revision,
        dtype=src.model.dtype,
        device=device,
        trust_remote_code=src.model.trust_remote_code,
        log=out.log,
    )
    texts = load_texts(src.data, out.log)
    if len(texts) == 0:
        raise DataError("ablate.source.data: the sources gave no texts")
    ablate_texts(cfg, loaded, texts, device, out, src.model.name, src.model.revision or "")


def ablate_texts(
    cfg: Any, loaded: Any, texts: Any, device: str, out: ArtifactWriter, model_name: str, model_revision: str
) -> None:
    """Routing, specialisation and every ablation of a loaded HF MoE on texts (``pretrained`` and ``lm`` sources)."""
    from moespec.embedding import hf_moe

    src = cfg.source
    sites = loaded.sites
    if len({site.n_experts for site in sites}) > 1:
        raise ConfigError(
            f"ablate.source.model.name: the MoE layers have different numbers of experts "
            f"{sorted({s.n_experts for s in sites})}, which this stage does not support"
        )
    layers, experts = common.check_indices(cfg, len(sites), sites[0].n_experts)
    text_codes, names = _text_groups(cfg, texts)
    train_rows, eval_rows = _probe_split(cfg, texts)
    out.log.info(
        "ablate %s (%d MoE layers x %d experts, top-%d) on %d texts (%d evaluated), task %s, modes %s",
        model_name,
        len(sites),
        sites[0].n_experts,
        sites[0].top_k,
        len(texts),
        len(eval_rows),
        src.task,
        ", ".join(cfg.modes),
    )
    measure = _measure(src)

    def run_texts(rows: np.ndarray, probe: Any = None, **settings: Any) -> Any:
        return hf_moe.run_texts(
            loaded,
            [texts.texts[r] for r in rows],
            measure if probe is None else _probed(measure, probe),
            max_length=src.max_length,
            batch_size=src.batch_size,
            tokens_per_pass=src.tokens_per_pass,
            progress=lambda batches, total: out.progress(batches, total=total, desc="ablate"),
            **settings,
        )

    # Pass 1: unablated routing of every token (and the states the probe is fitted on).
    first = run_texts(np.arange(len(texts)), record_routing=True)
    tokens = first.routing
    groups = Groups(
        {k: v[eval_rows] for k, v in text_codes.items()}, {k: v[tokens.text] for k, v in text_codes.items()}, names
    )
    tables: dict[str, Any] = {
        "eval/row": eval_rows,
        "routing/row": tokens.text,
        "routing/token_id": tokens.token_id,
        "routing/position": tokens.position,
        **common.group_tables(groups),
    }
    routing_tables, routing, plan = common.routing_analysis(
        cfg,
        tokens.probs,
        tokens.expert_index,
        groups,
        [s.name for s in sites],
        layers,
        experts,
        tokens.token_id,
        tokens.text,
    )
    tables.update(routing_tables)

    # Pass 2: the evaluated texts, unablated and under every ablation (the probe frozen).
    probe = (
        fit_probe(first.base[train_rows], texts.label[train_rows], src.probe, cfg.seed) if src.task == "probe" else None
    )
    second = run_texts(
        eval_rows, probe, masks=plan.masks, layers=plan.layer, modes=tuple(common.LIBRARY_MODE[m] for m in cfg.modes)
    )
    ablated = dict(zip(cfg.modes, (second.ablated[common.LIBRARY_MODE[m]] for m in cfg.modes)))
    metric, weights = src.metric, None
    if src.task == "lm":
        weights = second.n_tokens.astype(np.float64)
        base_values = _per_token(second.base, second.n_tokens)
        values = {m: _per_token(v, second.n_tokens) for m, v in ablated.items()}
        tables["eval/n_tokens"] = second.n_tokens
    else:
        labels = texts.label[eval_rows]
        base_values = (second.base == labels).astype(np.float64)
        values = {m: (v == labels).astype(np.float64) for m, v in ablated.items()}
    tables.update(common.baseline_tables(cfg, metric, base_values, groups, weights))
    results = {
        mode: common.comparison(cfg, mode, metric, base_values, values[mode], plan, groups, weights)
        for mode in cfg.modes
    }
    for result in results.values():
        tables.update(result)
    seed_tables, seed_summary = _probe_seed_control(cfg, first.base, train_rows, texts, eval_rows, groups, base_values)
    tables.update(seed_tables)
    common.write_tables(out, tables)
    for key, value in {
        "source": src.kind,
        "model_name": model_name,
        "model_revision": model_revision,
        "model_commit": loaded.commit,
        "model_class": type(loaded.model).__name__,
        "task": src.task,
        "device": device,
        "dtype": str(loaded.dtype).removeprefix("torch."),
    }.items():
        out.attrs[key] = value
    common.summarise(
        cfg,
        out,
        plan,
        routing,
        results,
        metric,
        groups,
        float(tables[f"baseline/{metric}"]),
        {
            "source": src.kind,
            "model": model_name,
            "task": src.task,
            "n_eval": len(eval_rows),
            "n_tokens": int(len(tokens.text)),
            **seed_summary,
        },
    )


def _resolve_device(requested: str, default: str) -> str:
    import torch

    device = default if requested == "auto" else requested
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(
            f"ablate.source.model.device: {requested!r} asks for a GPU but torch sees none; use 'auto' or 'cpu'"
        )
    return device


def _text_groups(cfg: Any, texts: Any) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    codes, names = {"domain": texts.domain}, {"domain": list(texts.domain_names)}
    if "class" in cfg.by:
        _check_labels(texts, "by: 'class'")
        codes["class"], names["class"] = texts.label, list(texts.label_names)
    return codes, names


def _check_labels(texts: Any, what: str) -> None:
    unlabelled = int((texts.label < 0).sum())
    if unlabelled:
        raise DataError(
            f"ablate.source: {what} needs a label on every text, but {unlabelled} of {len(texts)} texts "
            f"are unlabelled; give every source a label_field (or leave 'class' out of ablate.by)"
        )


def _probe_split(cfg: Any, texts: Any) -> tuple[np.ndarray, np.ndarray]:
    """Probe: a class-stratified train/test split of the texts; LM: every text is evaluated."""
    if cfg.source.task == "lm":
        return np.zeros(0, dtype=np.int64), np.arange(len(texts), dtype=np.int64)
    from moespec.data.splits import stratified_split

    _check_labels(texts, "task 'probe'")
    return stratified_split(texts.label, cfg.source.probe.test_fraction, cfg.seed)


def _measure(src: Any):
    from functools import partial

    from moespec.embedding import hf_moe

    return hf_moe.next_token_loss if src.task == "lm" else partial(hf_moe.pooled_state, pooling=src.probe.pooling)


def _probed(measure: Any, probe: Any):
    """The probe's class prediction of each text, from the pooled state ``measure`` returns."""
    return lambda model, batch: probe.predict(measure(model, batch))


def _per_token(nll_sums: np.ndarray, n_tokens: np.ndarray) -> np.ndarray:
    """Per-text mean next-token loss (0 for a text without targets, which then has weight 0)."""
    return np.where(n_tokens > 0, nll_sums / np.maximum(n_tokens, 1), 0.0)


def fit_probe(states: np.ndarray, labels: np.ndarray, probe_cfg: Any, seed: int) -> Any:
    """A standardising logistic-regression probe, fitted once and then frozen."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(np.unique(labels)) < 2:
        raise DataError(
            f"ablate.source: the probe's training texts hold {len(np.unique(labels))} class(es); it needs 2 or more"
        )
    probe = make_pipeline(
        StandardScaler(), LogisticRegression(C=probe_cfg.c, max_iter=probe_cfg.max_iter, random_state=seed)
    )
    return probe.fit(states, labels)


def _probe_seed_control(
    cfg: Any,
    states: np.ndarray,
    train_rows: np.ndarray,
    texts: Any,
    eval_rows: np.ndarray,
    groups: Groups,
    base_values: np.ndarray,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Probe: refit on seeded bootstrap resamples of its training texts. LM: not applicable."""
    if cfg.source.task == "lm":
        return {}, {"seed_control": "not applicable: a pretrained LM has one set of weights and a deterministic loss"}
    seeds = cfg.controls.retrain_seeds if cfg.controls.retrain_seeds is not None else [cfg.seed + 1]
    if not seeds:
        return {}, {"seed_control": "off (controls.retrain_seeds: [])"}
    labels = texts.label[eval_rows]
    values = []
    for seed in seeds:
        resample = np.random.default_rng(seed).choice(train_rows, size=len(train_rows), replace=True)
        other = fit_probe(states[resample], texts.label[resample], cfg.source.probe, seed)
        values.append((other.predict(states[eval_rows]) == labels).astype(np.float64))
    return common.seed_control_tables(cfg, seeds, np.stack(values), base_values, "accuracy", groups)
