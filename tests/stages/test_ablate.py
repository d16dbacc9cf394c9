"""The ablate stage, run for real: trained classifiers and dictionary MoEs, pretrained HF MoEs, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moespec.artifacts import ArtifactWriter, open_artifact, write_artifact
from moespec.config import config_yaml, load_experiment
from moespec.errors import ConfigError, DataError, StageError
from moespec.launch.runner import run_inline
from moespec.stages import ablate, train
from moespec.models import rows
from moespec.stages.ablate import trained as ablate_trained
from tests.builders import (
    TINY_DICTIONARY,
    TINY_FIBER,
    N_EXPERTS,
    one_torch_thread,
    save_tiny_moe,
    tiny_experiment,
    write_reduce_artifact,
)

TOPK = {"kind": "topk", "n_experts": 4, "top_k": 2, "hidden_dim": 16, "ffn_dim": 16, "n_layers": 2}
DICTIONARY = {**TINY_DICTIONARY, "routing": "straight_through"}
REDUCE = {"n_components": 4}


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def _run(stage, cfg, inputs, folder):
    writer = ArtifactWriter(
        folder,
        stage.NAME,
        "test",
        schema=stage.schema(cfg),
        seed=getattr(cfg, "seed", 0),
        root_attrs={"config": config_yaml(cfg)},
    )
    with write_artifact(writer):
        stage.run(cfg, inputs, writer)
    return open_artifact(folder, stage.schema(cfg)), writer.summary


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A synthetic reduce artifact and a top-k classifier and a dictionary MoE trained on it."""
    root = tmp_path_factory.mktemp("ablate-trained")
    reduced = write_reduce_artifact(root / "reduce")
    models = {}
    for name, model in [("topk", TOPK), ("dictionary", DICTIONARY)]:
        cfg = train.Config.model_validate({"model": model, "epochs": 6, "batch_size": 16, "lr": 2e-2})
        models[name] = _run(train, cfg, {"reduce": reduced}, root / f"train-{name}")[0]
    return reduced, models


def _ablate(trained, name, folder, **settings):
    reduced, models = trained
    cfg = ablate.Config.model_validate({"bootstrap": 100, **settings})
    return _run(ablate, cfg, {"train": models[name], "data": reduced}, folder)


def test_classifier_ablation_tables_and_summary(trained, tmp_path):
    result, summary = _ablate(trained, "topk", tmp_path / "a", modes=["mask", "zero", "renormalise"])
    n_val = len(trained[1]["topk"]["split/val_index"])
    n_layers, n_experts, n_classes = 2, 4, 6
    with result:
        assert result["eval/row"].shape == (n_val,) and result["routing/probs"].shape == (n_val, n_layers, n_experts)
        assert result["ablations/layer"][()].tolist() == [0] * 4 + [1] * 4
        for mode in ("mask", "zero", "renormalise"):
            values = result[f"ablation/{mode}/values"][()]
            assert values.shape == (8, n_val) and set(np.unique(values)) <= {0.0, 1.0}
            assert result[f"ablation/{mode}/delta_accuracy_class"].shape == (8, n_classes)
            low = result[f"ablation/{mode}/delta_accuracy_low"][()]
            high = result[f"ablation/{mode}/delta_accuracy_high"][()]
            delta = result[f"ablation/{mode}/delta_accuracy"][()]
            assert (low <= delta + 1e-12).all() and (delta <= high + 1e-12).all()
            np.testing.assert_allclose(delta, values.mean(1) - result["baseline/values"][()].mean())
            np.testing.assert_allclose(result[f"ablation/{mode}/load"][()].sum(-1), 1.0)
        # A masked expert receives nothing in its own layer.
        load = result["ablation/mask/load"][()]
        assert all(load[a, a // 4, a % 4] == 0 for a in range(8))
        assert result["controls/random/experts"].shape[0] == len(result["controls/random/target"]) > 0
        assert result["controls/seed/values"].shape == (1, n_val)
        np.testing.assert_allclose(result["specialisation/class/share"][()].sum(-1), 1.0)
        assert result["specialisation/class/counts"][()].sum() == n_val * 2 * n_layers  # top-2 slots
    assert summary["source"] == "trained" and summary["metric"] == "accuracy"
    table = summary["experts"]
    assert len(table["accuracy_drop"]) == 8 and len(table["control_mean"]) == 8
    assert set(table) >= {"utilisation", "entropy", "max_class_drop", "max_class", "accuracy_drop_zero"}
    assert len(summary["nmi_class"]) == n_layers and "seed_control_delta" in summary
    json.dumps(summary)


def test_batched_ablations_equal_one_pass_per_expert(trained):
    from moespec.specialisation.ablation import plan_ablations
    from moespec.models import Ablation

    model, _ = rows.load_model(trained[1]["topk"].path.parent / "best.pt")
    features = torch.as_tensor(trained[0]["reduced"][()], dtype=torch.float32)
    plan = plan_ablations([0, 1], [0, 1, 2, 3], np.full((2, 4), 0.25), 2, np.random.default_rng(0))
    for mode in ("mask", "zero", "drop"):
        batched = ablate_trained.ablated_passes(model, features, plan, mode, batch_size=32, n_layers=2)
        for row in range(len(plan.layer)):
            ablation = Ablation(torch.as_tensor(plan.masks[row]), mode, int(plan.layer[row]))
            single = ablate_trained.trained_pass(model, features, ablation, batch_size=1000)
            np.testing.assert_array_equal(batched["prediction"][row], single["prediction"][0])
            np.testing.assert_allclose(batched["probs"][row], single["probs"][0], atol=1e-6)


def test_dictionary_ablation_moves_exactly_the_masked_experts_rows(trained, tmp_path):
    result, summary = _ablate(
        trained,
        "dictionary",
        tmp_path / "d",
        modes=["mask", "zero"],
        by=["domain"],
        controls={"random_sets": 0, "retrain_seeds": []},
    )
    with result:
        load = result["experts/load"][()][0]
        # Top-1 (arg-max) assignment: masking e moves every row of e and no other row.
        np.testing.assert_allclose(result["ablation/mask/assignment_changed"][()], load)
        assert (result["ablation/zero/assignment_changed"][()] == 0).all()  # zero keeps the routing
        assert result["ablation/mask/contrastive"].shape == (3,)
        assert result["ablation/mask/delta_mixture_reconstruction_domain"].shape == (3, 3)
        assert "controls/seed/values" not in result and result["controls/random/experts"].shape == (0, 3)
    assert summary["metric"] == "reconstruction" and summary["seed_control"].startswith("off")
    assert {"contrastive_increase", "mixture_reconstruction_increase", "assignment_changed"} <= set(summary["experts"])


def test_bad_trained_input_is_a_clear_error(trained, tmp_path):
    with pytest.raises(ConfigError, match=r"ablate.experts: expert 7 does not exist; the model has 4 experts"):
        _ablate(trained, "topk", tmp_path / "e", experts=[1, 7])
    with pytest.raises(ConfigError, match=r"ablate.layers: MoE layer 2 does not exist"):
        _ablate(trained, "topk", tmp_path / "l", layers=[2])
    with pytest.raises(ConfigError, match=r"ablate.source.input: the train stage read 'reduce'"):
        _ablate(trained, "topk", tmp_path / "i", source={"kind": "trained", "input": "embed"})
    with pytest.raises(ConfigError, match=r"retrain_seeds: 0 is the seed"):
        _ablate(trained, "topk", tmp_path / "s", controls={"retrain_seeds": [0]})
    unlabelled = write_reduce_artifact(tmp_path / "unlabelled", labelled=False)
    cfg = train.Config.model_validate(
        {"model": {**DICTIONARY, "positive_pairs": "domain"}, "epochs": 1, "batch_size": 16}
    )
    model = _run(train, cfg, {"reduce": unlabelled}, tmp_path / "train-u")[0]
    with pytest.raises(DataError, match=r"ablate.by: 'class' needs a label on every evaluated row"):
        _run(ablate, ablate.Config(), {"train": model, "data": unlabelled}, tmp_path / "u")


def test_config_validation_names_the_key():
    with pytest.raises(ConfigError, match=r"ablate.modes.*'mask', 'zero' or 'renormalise'"):
        load_experiment(tiny_experiment(reduce=REDUCE, train={}, ablate={"modes": ["delete"]}))
    with pytest.raises(ConfigError, match=r"ablate: .*'token' needs token ids"):
        load_experiment(tiny_experiment(reduce=REDUCE, train={}, ablate={"by": ["token"]}))
    with pytest.raises(ConfigError, match=r"ablate.experts: must list at least one value, each once"):
        load_experiment(tiny_experiment(reduce=REDUCE, train={}, ablate={"experts": [1, 1]}))
    with pytest.raises(ConfigError, match=r"ablate: reads the train stage"):
        load_experiment(tiny_experiment(reduce=REDUCE, ablate={}))
    pretrained = {
        "experiment": "p",
        "ablate": {"source": {"kind": "pretrained", "model": {"name": "x"}}, "by": ["stratum"]},
    }
    with pytest.raises(ConfigError, match=r"'stratum' needs fiber strata"):
        load_experiment(pretrained)
    config = load_experiment({"experiment": "p", "ablate": {"source": {"kind": "pretrained", "model": {"name": "x"}}}})
    assert ablate.inputs(config.configs[0].ablate) == {}
    strata = load_experiment(tiny_experiment(reduce=REDUCE, fiber={}, train={}, ablate={"by": ["stratum"]}))
    assert ablate.inputs(strata.configs[0].ablate) == {"train": "train", "data": "reduce", "strata": "fiber"}


def _pretrained(folder, **settings):
    source = {
        "kind": "pretrained",
        "model": {"name": str(folder)},
        "data": [{"kind": "builtin", "n_per_domain": 2}],
        "max_length": 24,
        "batch_size": 4,
    }
    source.update(settings.pop("source", {}))
    return {"experiment": "hf", "ablate": {"source": source, "bootstrap": 50, **settings}}


def test_pretrained_mixtral_lm_per_domain_and_token_tables(tmp_path):
    folder = save_tiny_moe("mixtral", tmp_path / "mixtral")
    arts = run_inline(
        _pretrained(folder, by=["class", "domain", "token"], layers=[1], modes=["mask", "renormalise"]),
        root=tmp_path / "results",
    )
    path = next(p for key, p in arts.items() if key[0] == "ablate")
    summary = json.loads((path / "summary.json").read_text())
    with open_artifact(path) as result:
        n_texts, n_tokens = 12, len(result["routing/row"])
        assert result["routing/probs"].shape == (n_tokens, 2, N_EXPERTS)
        assert result["ablations/layer"][()].tolist() == [1] * N_EXPERTS
        assert result["ablation/mask/values"].shape == (N_EXPERTS, n_texts)
        assert result["ablation/mask/delta_nll_domain"].shape == (N_EXPERTS, 6)
        weights = result["eval/n_tokens"][()]
        baseline = result["baseline/values"][()]
        assert result["baseline/nll"][()] == pytest.approx(np.sum(baseline * weights) / weights.sum())
        assert result["specialisation/token/consistency"].shape == (2,)
        assert result["specialisation/domain/counts"][()].sum() == n_tokens * 2 * 2
        assert result["layers/name"].asstr()[0] == "model.layers.0.mlp.gate"
        assert result.attrs["model_class"] == "MixtralForCausalLM"
    assert summary["metric"] == "nll" and summary["seed_control"].startswith("not applicable")
    assert len(summary["experts"]["nll_increase"]) == N_EXPERTS and len(summary["token_consistency"]) == 2
    assert "per-expert ablation" in (path / "log.txt").read_text()


def test_pretrained_qwen_probe_is_fitted_once_and_frozen(tmp_path):
    folder = save_tiny_moe("qwen2_moe", tmp_path / "qwen")
    arts = run_inline(
        _pretrained(
            folder,
            source={"task": "probe", "probe": {"test_fraction": 0.5}},
            experts=[0, 2],
            controls={"random_sets": 0},
        ),
        root=tmp_path / "results",
    )
    path = next(p for key, p in arts.items() if key[0] == "ablate")
    summary = json.loads((path / "summary.json").read_text())
    with open_artifact(path) as result:
        n_eval = len(result["eval/row"])
        assert 0 < n_eval < 12 and result["ablation/mask/values"].shape == (4, n_eval)
        assert result["controls/seed/values"].shape == (1, n_eval)
        assert 0.0 <= result["baseline/accuracy"][()] <= 1.0
    assert summary["task"] == "probe" and summary["metric"] == "accuracy" and summary["experts"]["expert"] == [0, 2] * 2


def test_bad_pretrained_input_is_a_clear_error(tmp_path):
    from tests.builders import word_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = word_tokenizer()
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2
        )
    ).save_pretrained(tmp_path / "dense")
    tokenizer.save_pretrained(tmp_path / "dense")
    with pytest.raises(StageError, match="not a mixture-of-experts model"):
        run_inline(_pretrained(tmp_path / "dense"), root=tmp_path / "r1")
    folder = save_tiny_moe("mixtral", tmp_path / "mixtral", n_layers=1)
    with pytest.raises(StageError, match=r"ablate.experts: expert 4 does not exist"):
        run_inline(_pretrained(folder, experts=[4]), root=tmp_path / "r2")
    unlabelled = tmp_path / "texts.jsonl"
    unlabelled.write_text("\n".join(json.dumps({"text": f"some text number {i}"}) for i in range(6)))
    files = {"data": [{"kind": "files", "paths": [str(unlabelled)]}]}
    with pytest.raises(StageError, match=r"by: 'class' needs a label on every text"):
        run_inline(_pretrained(folder, source=files), root=tmp_path / "r3")
    with pytest.raises(StageError, match=r"task 'probe' needs a label on every text"):
        run_inline(_pretrained(folder, source={**files, "task": "probe"}, by=["domain"]), root=tmp_path / "r4")


def test_pipeline_embed_reduce_fiber_train_ablate_runs_inline(tmp_path):
    experiment = tiny_experiment(
        "ab",
        n_per_domain=10,
        reduce={"n_components": 6, "mle_k": 5},
        fiber=TINY_FIBER,
        train={"model": {"kind": "topk", "n_experts": 4, "hidden_dim": 8, "ffn_dim": 8}, "epochs": 3, "batch_size": 16},
        ablate={"by": ["class", "domain", "stratum"], "bootstrap": 50},
    )
    arts = run_inline(experiment, root=tmp_path)
    path = next(p for key, p in arts.items() if key[0] == "ablate")
    summary = json.loads((path / "summary.json").read_text())
    with open_artifact(path) as result:
        n_strata = len(result["names/stratum"])
        assert result["ablation/mask/delta_accuracy_stratum"].shape == (4, n_strata)
        assert result["specialisation/stratum/nmi"].shape == (1,)
    assert len(summary["experts"]["utilisation"]) == 4 and "nmi_stratum" in summary
