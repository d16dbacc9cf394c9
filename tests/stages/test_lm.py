"""The lm stage, run for real on tiny models: outputs, the HF folder, resume after an interruption, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moespec.artifacts import ArtifactWriter, open_artifact, write_artifact
from moespec.config import load_experiment
from moespec.errors import ConfigError, DataError
from moespec.models import lm_training
from moespec.stages import lm
from tests.builders import one_torch_thread

TINY_MODEL = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "num_experts": 4, "top_k": 2}


def lm_config(**overrides) -> lm.Config:
    settings = {
        "data": [{"kind": "builtin", "n_per_domain": 12, "domains": ["movies", "news"]}],
        "tokenizer": {"kind": "bpe", "vocab_size": 300},
        "model": dict(TINY_MODEL),
        "seq_len": 32,
        "batch_size": 4,
        "max_steps": 6,
        "eval_every": 3,
        "warmup_steps": 2,
        "lr": 3e-3,
        "validation_fraction": 0.2,
        "checkpoint_every": 2,
        "specialisation": {"n_shuffles": 3, "min_count": 2},
    }
    settings.update(overrides)
    return lm.Config.model_validate(settings)


def run_lm(cfg: lm.Config, folder):
    writer = ArtifactWriter(folder, "lm", "test", schema=lm.schema(cfg), seed=cfg.seed)
    with one_torch_thread(), write_artifact(writer):
        lm.run(cfg, {}, writer)
    return open_artifact(folder / "lm.h5", lm.schema(cfg)), writer.summary


def test_an_moe_lm_trains_and_saves_a_standard_hf_folder(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moespec.data.packing import pack
    from moespec.data.tokenizer import encode

    cfg = lm_config()
    reader, summary = run_lm(cfg, tmp_path)
    for key in ("val_loss", "val_bits_per_byte", "params_total", "params_active", "tokens_per_s"):
        assert np.isfinite(summary[key]), key
    assert summary["params_active"] < summary["params_total"]
    with reader:
        assert reader["steps/index"][()].tolist() == list(range(1, 7))
        assert reader["curves/step"][()].tolist() == [3, 6]
        assert reader["curves/expert_load"].shape == (2, 2, 4)
        np.testing.assert_allclose(reader["curves/expert_load"][()].sum(-1), 1.0)
        assert reader["specialisation/coactivation"].shape == (2, 4, 4)
        assert reader["curves/router_saturation"][-1].tolist() == [1.0, 1.0]  # the final model against itself
        assert [str(n) for n in reader.read("domain_names")] == ["movies", "news"]
        val_texts = [str(t) for t in reader.read("val/texts")]
        assert float(reader["val_loss"][()]) == pytest.approx(summary["val_loss"], abs=1e-5)
        assert reader.attrs["experts_implementation"] in ("eager", "sorted_mm")
    folder = tmp_path / "model"
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    # The saved model and tokenizer give back the validation loss the stage measured.
    eot = tokenizer.eos_token_id
    val = pack(encode(tokenizer, val_texts), cfg.seq_len, eot, keep_tail=True)
    objective = lm_training.LMObjective(
        val, val, np.zeros(len(val_texts), dtype=np.int64), np.ones(len(val_texts)), 1, eot, 4, 0, "cpu", 0.0, 0.0
    )
    assert objective.evaluate(model)["val_loss"] == pytest.approx(summary["val_loss"], abs=1e-5)


def test_the_dense_twin_is_one_line_away_and_matches_the_active_parameters(tmp_path):
    moe_cfg = lm_config(max_steps=2, eval_every=2)
    dense_cfg = lm_config(max_steps=2, eval_every=2, model={**TINY_MODEL, "dense_twin": "active"})
    moe_reader, moe = run_lm(moe_cfg, tmp_path / "moe")
    dense_reader, dense = run_lm(dense_cfg, tmp_path / "dense")
    moe_reader.close()
    with dense_reader:
        assert "curves/expert_load" not in dense_reader
    assert dense["params_total"] == dense["params_active"]
    assert abs(dense["params_total"] - moe["params_active"]) <= 3 * 32 * 2 / 2
    config = json.loads((tmp_path / "dense" / "model" / "config.json").read_text())
    assert config["model_type"] == "qwen2"


@pytest.mark.parametrize("stop_at_batch", [5, 8])
def test_resume_after_an_interruption_gives_the_uninterrupted_weights(tmp_path, monkeypatch, stop_at_batch):
    from safetensors.torch import load_file

    # experts implementation pinned: "auto" measures per task, and two tasks may pick differently
    cfg = lm_config(
        grad_accumulation=2,
        max_steps=5,
        checkpoint_every=1,
        model={**TINY_MODEL, "dropout": 0.1, "experts_implementation": "sorted_mm"},
    )
    reference, _ = run_lm(cfg, tmp_path / "reference")
    with reference:
        reference_curve = reference["steps/train/total"][()]
    real_batch, calls = lm_training.LMObjective.train_batch, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at_batch:
            raise KeyboardInterrupt("preempted")
        return real_batch(self, *args, **kwargs)

    monkeypatch.setattr(lm_training.LMObjective, "train_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_lm(cfg, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "work" / "checkpoint.pt").exists()
    assert not (tmp_path / "resumed" / "lm.h5").exists() and not (tmp_path / "resumed" / "model").exists()
    monkeypatch.setattr(lm_training.LMObjective, "train_batch", real_batch)
    resumed, _ = run_lm(cfg, tmp_path / "resumed")
    with resumed:
        np.testing.assert_array_equal(resumed["steps/train/total"][()], reference_curve)
    expected = load_file(tmp_path / "reference" / "model" / "model.safetensors")
    got = load_file(tmp_path / "resumed" / "model" / "model.safetensors")
    assert expected.keys() == got.keys()
    for name, value in expected.items():
        assert torch.equal(value, got[name]), name


@pytest.mark.parametrize(
    "section,message",
    [
        ({"seq_len": 64, "model": {"max_positions": 32}}, "lm: seq_len 64 is beyond model.max_positions 32"),
        (
            {"tokenizer": {"kind": "bpe", "vocab_size": 1000}, "model": {"vocab_size": 512}},
            "lm: tokenizer.vocab_size 1000 does not fit model.vocab_size 512",
        ),
        ({"model": {"num_experts": 2, "top_k": 3}}, "lm.model: top_k 3 is above num_experts 2"),
        (
            {"model": {"num_layers": 2, "decoder_sparse_step": 4}},
            "lm.model: decoder_sparse_step 4 is above num_layers 2",
        ),
        ({"max_steps": 10, "max_tokens": 1000}, "lm: give max_steps or max_tokens, not both"),
        ({"data": []}, "lm: data: give at least one text source"),
        ({"tokenizer": {"kind": "bpe", "vocab_size": 100}}, "lm.tokenizer.vocab_size: Input should be greater"),
    ],
)
def test_bad_settings_are_errors_naming_the_key_at_validate_time(section, message):
    with pytest.raises(ConfigError, match=message):
        load_experiment({"experiment": "x", "lm": section})


def test_a_source_empty_after_filtering_is_an_error_naming_it(tmp_path):
    path = tmp_path / "texts.jsonl"
    path.write_text("\n".join(json.dumps({"text": "  "}) for _ in range(3)) + "\n")
    cfg = lm_config(
        data=[{"kind": "builtin", "n_per_domain": 4, "domains": ["movies"]}, {"kind": "files", "paths": [str(path)]}]
    )
    with pytest.raises(DataError, match=r"lm.data\[1\]: source files:.*every text in field\(s\) \['text'\] is empty"):
        run_lm(cfg, tmp_path / "out")


def test_a_tokenizer_larger_than_the_model_vocabulary_is_an_error_naming_the_key(tmp_path):
    cfg = lm_config(
        tokenizer={"kind": "bpe", "vocab_size": 300},
        model={**TINY_MODEL, "vocab_size": 320},
        data=[{"kind": "builtin", "n_per_domain": 2, "domains": ["movies"]}],
    )
    # 300 <= 320 passes validation; a HF tokenizer's size is only known at run time, so check that path
    # with a model vocabulary below the trained tokenizer's size through the stage's own check
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vocab_size": 280})})
    with pytest.raises(ConfigError, match=r"lm.model.vocab_size: 280 is smaller than the tokenizer's vocabulary"):
        run_lm(cfg, tmp_path / "out")


def test_ablate_runs_on_an_lm_artifact_through_the_pretrained_path(tmp_path):
    from moespec.launch.runner import run_inline

    settings = lm_config(max_steps=4, eval_every=4).model_dump(mode="json")
    experiment = {
        "experiment": "lm-ablate",
        "lm": settings,
        "ablate": {
            "source": {"kind": "lm", "max_length": 64, "batch_size": 4},
            "by": ["domain", "token"],
            "bootstrap": 20,
            "modes": ["mask"],
        },
    }
    with one_torch_thread():
        folders = run_inline(experiment, root=tmp_path)
    ablate_folder = next(folder for (stage, _), folder in folders.items() if stage == "ablate")
    summary = json.loads((ablate_folder / "summary.json").read_text())
    assert summary["source"] == "lm" and summary["task"] == "lm"
    with open_artifact(ablate_folder / "ablate.h5") as reader:
        assert reader["ablations/expert"].shape == (2 * 4,)  # every expert of both MoE layers
        assert reader["ablation/mask/values"].shape[0] == 8
        assert [str(n) for n in reader.read("names/domain")] == ["movies", "news"]


@pytest.mark.parametrize("architecture,extra", [("mixtral", {"norm_topk_prob": True}), ("olmoe", {})])
def test_the_other_architectures_train_save_and_ablate(tmp_path, architecture, extra):
    from moespec.launch.runner import run_inline

    model = {**TINY_MODEL, "architecture": architecture, **extra}
    settings = lm_config(max_steps=4, eval_every=4, model=model).model_dump(mode="json")
    experiment = {
        "experiment": f"lm-{architecture}",
        "lm": settings,
        "ablate": {
            "source": {"kind": "lm", "max_length": 64, "batch_size": 4},
            "by": ["domain"],
            "bootstrap": 20,
            "modes": ["mask"],
        },
    }
    with one_torch_thread():
        folders = run_inline(experiment, root=tmp_path)
    lm_folder = next(folder for (stage, _), folder in folders.items() if stage == "lm")
    assert json.loads((lm_folder / "model" / "config.json").read_text())["model_type"] == architecture
    with open_artifact(lm_folder / "lm.h5") as reader:
        assert reader["curves/expert_load"].shape == (1, 2, 4)  # every block is an MoE block
        assert reader["specialisation/coactivation"].shape == (2, 4, 4)
    ablate_folder = next(folder for (stage, _), folder in folders.items() if stage == "ablate")
    with open_artifact(ablate_folder / "ablate.h5") as reader:
        assert reader["ablations/expert"].shape == (2 * 4,)


def test_ablate_of_an_lm_artifact_rejects_class_groups():
    with pytest.raises(ConfigError, match="by: 'class' needs labels"):
        load_experiment({"experiment": "x", "lm": {}, "ablate": {"source": {"kind": "lm"}, "by": ["class"]}})


@pytest.mark.parametrize("name,n_tasks", [("moe_lm_architectures.yaml", 10), ("moe_lm_experts.yaml", 54)])
def test_the_shipped_lm_sweeps_plan_to_their_task_counts(name, n_tasks, tmp_path):
    from pathlib import Path

    from moespec.launch.plan import make_plan

    path = Path(__file__).resolve().parents[2] / "configs" / "experiments" / name
    plan = make_plan(load_experiment(path, root=tmp_path))
    tasks = [task for task in plan.tasks if task.stage == "lm"]
    assert len(tasks) == n_tasks == len({task.uid for task in tasks})
    twins = [task.config.model.dense_twin for task in tasks]
    assert twins.count(None) == (9 if n_tasks == 10 else 18)


def test_small_training_steps_run_on_one_thread_and_the_thread_count_is_restored():
    import logging

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with lm._threads_for(lm_config(), 50_000, torch.device("cpu"), logging.getLogger("test")):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with lm._threads_for(lm_config(), 10**9, torch.device("cpu"), logging.getLogger("test")):
            assert torch.get_num_threads() == 2  # a large step keeps its threads
    finally:
        torch.set_num_threads(threads)
