"""The train stage, run for real: outputs, determinism, resume after an interruption, bad input."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from moespec.artifacts import ArtifactWriter, open_artifact, write_artifact
from moespec.config import load_experiment
from moespec.errors import ConfigError, DataError, StageError
from moespec.launch.runner import run_inline
from moespec.data.splits import stratified_split
from moespec.models import rows, training
from moespec.stages import train
from tests.builders import TINY_DICTIONARY, tiny_experiment, write_reduce_artifact


def train_config(**overrides):
    settings = {
        "model": TINY_DICTIONARY,
        "epochs": 3,
        "batch_size": 16,
        "checkpoint_every": 2,
        "lr": 1e-2,
    }
    settings.update(overrides)
    return train.Config.model_validate(settings)


def run_train(cfg, reader, folder):
    writer = ArtifactWriter(folder, "train", "test", schema=train.schema(cfg), seed=cfg.seed)
    with write_artifact(writer):
        train.run(cfg, {"reduce": reader}, writer)
    return open_artifact(folder, train.schema(cfg)), writer.summary


@pytest.fixture
def reduced(tmp_path):
    return write_reduce_artifact(tmp_path / "reduce")


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


def test_dictionary_training_writes_curves_checkpoints_and_heldout_routing(reduced, tmp_path):
    cfg = train_config()
    result, summary = run_train(cfg, reduced, tmp_path / "train")
    with result:
        assert result["curves/epoch"][()].tolist() == [1, 2, 3]
        assert result["curves/expert_load"].shape == (3, 1, 3)
        np.testing.assert_allclose(result["curves/expert_load"][()].sum(-1), 1.0)
        assert result["curves/val/contrastive"].shape == (3,)
        assert result["curves/train/total"][-1] < result["curves/train/total"][0]
        probs = result["heldout/router_probs"][()]
        n_val = len(result["split/val_index"])
        assert probs.shape == (n_val, 1, 3)
        np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
        assert (result["heldout/assignment"][()][:, 0] == probs[:, 0].argmax(-1)).all()
        assert result["heldout/embedding"].shape == (n_val, 4)
        assert set(result["split/train_index"][()]).isdisjoint(result["split/val_index"][()])
        assert 1 <= int(result["best_epoch"][()]) <= 3
        assert result.attrs["heldout_model"] == "best"
    assert (tmp_path / "train" / "best.pt").exists() and (tmp_path / "train" / "final.pt").exists()
    assert not (tmp_path / "train" / "work" / "checkpoint.pt").exists()
    assert summary["epochs_run"] == 3 and len(summary["expert_load"][0]) == 3
    model, checkpoint = rows.load_model(tmp_path / "train" / "best.pt")
    assert checkpoint["epoch"] == int(summary["best_epoch"])
    features = torch.as_tensor(reduced["reduced"][()], dtype=torch.float32)
    val_index = torch.as_tensor(np.sort(stratified_split(reduced.read("domain"), 0.2, 0)[1]))
    with torch.no_grad():
        embedding, aux = model(features[val_index])
    with open_artifact(tmp_path / "train") as result:
        np.testing.assert_allclose(aux["router_probs"].numpy(), result["heldout/router_probs"][()][:, 0], atol=1e-5)


def test_split_is_stratified_by_domain_and_seeded():
    domain = np.repeat(np.arange(4), [10, 5, 2, 1])
    train_index, val_index = stratified_split(domain, 0.2, seed=3)
    assert np.bincount(domain[val_index], minlength=4).tolist() == [2, 1, 1, 0]
    assert sorted(np.concatenate([train_index, val_index]).tolist()) == list(range(len(domain)))
    again = stratified_split(domain, 0.2, seed=3)
    assert np.array_equal(again[1], val_index)
    assert not np.array_equal(stratified_split(domain, 0.2, seed=4)[1], val_index)


def test_training_is_deterministic(reduced, tmp_path):
    cfg = train_config(epochs=2)
    run_train(cfg, reduced, tmp_path / "a")
    run_train(cfg, reduced, tmp_path / "b")
    for a, b in zip(_weights(tmp_path / "a" / "final.pt").values(), _weights(tmp_path / "b" / "final.pt").values()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("stop_at_batch", [5, 9])
def test_resume_after_an_interruption_gives_the_uninterrupted_weights(reduced, tmp_path, monkeypatch, stop_at_batch):
    cfg = train_config(epochs=3, grad_accumulation=2, checkpoint_every=1, schedule="cosine", warmup_steps=2)
    reference, _ = run_train(cfg, reduced, tmp_path / "reference")
    reference_curves = reference["curves/val/total"][()]
    reference_dense = reference["dense/curves/val/total"][()]
    reference.close()

    real_batch, calls = rows.train_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == stop_at_batch:  # mid-epoch, and (batch 5) mid accumulation window
            raise KeyboardInterrupt("preempted")
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(rows, "train_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, reduced, tmp_path / "resumed")
    assert (tmp_path / "resumed" / "work" / "checkpoint.pt").exists()
    assert not (tmp_path / "resumed" / "train.h5").exists()
    resumed_calls = []

    def counted(*args, **kwargs):
        resumed_calls.append(1)
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(rows, "train_batch", counted)
    resumed, _ = run_train(cfg, reduced, tmp_path / "resumed")
    total_batches = 3 * len(training.row_batches(np.arange(len(resumed["split/train_index"])), cfg.batch_size))
    # It resumed from the last checkpoint (at most one accumulation window back), not from scratch;
    # then the dense twin trained for as many batches.
    resumed_moe_calls = len(resumed_calls) - total_batches
    assert total_batches - stop_at_batch < resumed_moe_calls <= total_batches - stop_at_batch + 2
    with resumed:
        np.testing.assert_array_equal(resumed["curves/val/total"][()], reference_curves)
        np.testing.assert_array_equal(resumed["dense/curves/val/total"][()], reference_dense)
    for name in ("final.pt", "best.pt"):
        reference_weights = _weights(tmp_path / "reference" / name)
        resumed_weights = _weights(tmp_path / "resumed" / name)
        for key, value in reference_weights.items():
            assert torch.equal(value, resumed_weights[key]), (name, key)


def test_a_checkpoint_from_another_config_is_a_clear_error(reduced, tmp_path, monkeypatch):
    cfg = train_config()
    real_batch, calls = rows.train_batch, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(rows, "train_batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_train(cfg, reduced, tmp_path / "train")
    monkeypatch.setattr(rows, "train_batch", real_batch)
    with pytest.raises(ConfigError, match=r"different run \(differs in: train.config.lr \(0.01 -> 0.02\)"):
        run_train(train_config(lr=2e-2), reduced, tmp_path / "train")
    (tmp_path / "train" / "work" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ConfigError, match="not a readable moespec checkpoint"):
        run_train(cfg, reduced, tmp_path / "train")


def test_topk_classifier_learns_the_classes_and_records_routing(reduced, tmp_path):
    cfg = train_config(
        model={"kind": "topk", "n_experts": 4, "top_k": 2, "hidden_dim": 16, "ffn_dim": 16, "target": "domain_label"},
        epochs=8,
    )
    result, summary = run_train(cfg, reduced, tmp_path / "train")
    with result:
        assert result["target_names"].asstr()[()].tolist() == [f"d{c // 2}/d{c // 2}/c{c % 2}" for c in range(6)]
        assert result["heldout/selected"][()].sum(-1).tolist() == [[2]] * len(result["split/val_index"])
        assert result["curves/val_accuracy"][-1] > 0.8
        accuracy = (result["heldout/prediction"][()] == result["heldout/target"][()]).mean()
        assert accuracy == pytest.approx(summary["val_accuracy"], abs=1e-4)
        assert set(summary) >= {"collapse_warning", "routing_entropy", "stopped_early"}


def test_collapse_warning_and_early_stopping(reduced, tmp_path, caplog):
    # Two experts and a threshold of 0.5: the top expert always takes >= half the rows.
    cfg = train_config(
        model={"kind": "topk", "n_experts": 2, "top_k": 1, "hidden_dim": 8, "ffn_dim": 8},
        collapse_threshold=0.5,
        lr=1e-9,
        epochs=10,
        patience=2,
        min_delta=1.0,
    )
    result, summary = run_train(cfg, reduced, tmp_path / "train")
    with result:
        assert result["epochs_run"][()] == 3  # best at epoch 1, then 2 epochs without a 1.0 improvement
        assert int(result["best_epoch"][()]) == 1
        assert result["curves/collapsed"][()].any()
    assert summary["stopped_early"] and summary["collapse_warning"]


def test_bad_input_is_a_clear_error(tmp_path):
    unlabelled = write_reduce_artifact(tmp_path / "reduce", labelled=False)
    with pytest.raises(DataError, match="'domain_label' needs a label on every row, but 96 of 96"):
        run_train(train_config(), unlabelled, tmp_path / "a")
    with pytest.raises(DataError, match="'label' needs a label"):
        run_train(train_config(model={"kind": "topk", "target": "label"}), unlabelled, tmp_path / "b")
    run_train(
        train_config(
            model={
                "kind": "dictionary",
                "n_experts": 2,
                "positive_pairs": "domain",
                "code_dim": 4,
                "n_layers": 1,
                "query_dim": 4,
            },
            epochs=1,
        ),
        unlabelled,
        tmp_path / "c",
    )
    with pytest.raises(ConfigError, match="train.model: dictionary model expects input dimension 64, the data has 8"):
        run_train(
            train_config(model={"kind": "dictionary", "input_dim": 64, "positive_pairs": "domain"}),
            unlabelled,
            tmp_path / "d",
        )
    assert not (tmp_path / "d" / "train.h5").exists()


def test_config_validation_messages():
    with pytest.raises(ConfigError, match=r"train\.model\.topk\.top_k|top_k must be <= n_experts"):
        load_experiment(tiny_experiment(reduce={"n_components": 4}, train={"model": {"kind": "topk", "top_k": 9}}))
    with pytest.raises(ConfigError, match="batch_size"):
        load_experiment(tiny_experiment(reduce={"n_components": 4}, train={"batch_size": 1}))
    config = load_experiment(tiny_experiment(reduce={"n_components": 4}, train={"input": "embed"}))
    assert config is not None


def test_lr_schedules():
    cfg = train_config(schedule="step", step_epochs=2, step_gamma=0.5, warmup_steps=2)
    factor = training.lr_schedule(
        cfg.schedule, cfg.warmup_steps, 100, step_every=cfg.step_epochs * 10, step_gamma=cfg.step_gamma
    )
    assert [factor(step) for step in (0, 1, 2, 19, 20, 40)] == [0.5, 1.0, 1.0, 1.0, 0.5, 0.25]
    cosine = training.lr_schedule("cosine", 0, 100)
    assert cosine(0) == 1.0 and cosine(100) == pytest.approx(0.0)


def test_pipeline_embed_reduce_train_runs_inline(tmp_path):
    experiment = tiny_experiment(
        "tr",
        n_per_domain=8,
        reduce={"n_components": 6, "mle_k": 5},
        train={
            "model": {"kind": "topk", "n_experts": 2, "hidden_dim": 8, "ffn_dim": 8, "target": "domain"},
            "epochs": 2,
            "batch_size": 8,
        },
    )
    artifacts = run_inline(experiment, root=tmp_path)
    train_dir = next(path for key, path in artifacts.items() if key[0] == "train")
    with open_artifact(train_dir) as result:
        assert result["heldout/router_probs"].shape[1:] == (1, 2)
        assert result.attrs["input_dim"] == 6
        with h5py.File(train_dir / "train.h5") as h5:
            assert h5.attrs["complete"]
    assert (train_dir / "best.pt").exists()
    with pytest.raises(StageError):
        run_inline(
            {
                **experiment,
                "experiment": "tr2",
                "train": {**experiment["train"], "model": {"kind": "topk", "input_dim": 99}},
            },
            root=tmp_path,
        )


@pytest.mark.parametrize(
    "model",
    [
        TINY_DICTIONARY,
        {"kind": "topk", "n_experts": 3, "top_k": 2, "hidden_dim": 8},
    ],
)
def test_bfloat16_autocast_trains_in_low_precision_and_keeps_float32_weights(reduced, tmp_path, model):
    full, _ = run_train(train_config(model=model, epochs=2, precision="float32"), reduced, tmp_path / "fp32")
    low, summary = run_train(train_config(model=model, epochs=2, precision="bfloat16"), reduced, tmp_path / "bf16")
    full_loss, low_loss = full["curves/train/total"][()], low["curves/train/total"][()]
    assert np.isfinite(low_loss).all() and np.isfinite(low["curves/val/total"][()]).all()
    assert not np.array_equal(full_loss, low_loss)  # the forward passes really ran in bfloat16
    np.testing.assert_allclose(low_loss, full_loss, rtol=0.1)  # ... and trained the same model
    weights = _weights(tmp_path / "bf16" / "final.pt")
    assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    assert training.autocast_dtype("auto", "cpu") is None
    assert training.autocast_dtype("auto", "cuda:0") == torch.bfloat16


def test_every_moe_run_reports_its_dense_twin(reduced, tmp_path):
    cfg = train_config(
        model={"kind": "topk", "n_experts": 4, "top_k": 2, "hidden_dim": 16, "ffn_dim": 16, "target": "domain"},
        epochs=3,
    )
    result, summary = run_train(cfg, reduced, tmp_path / "train")
    with result:
        assert result["dense/curves/val/total"].shape == (3,)
        assert 0.0 <= float(result["dense/val_accuracy"][()]) <= 1.0
    # Same active parameters (to within the rounding of one FFN width), fewer in total.
    assert abs(summary["dense_params_active"] - summary["params_active"]) <= 2 * 16 * 3
    assert summary["dense_params_total"] < summary["params_total"]
    off, off_summary = run_train(train_config(dense_baseline=False), reduced, tmp_path / "off")
    with off:
        assert "dense/val_accuracy" not in off
    assert "dense_val_accuracy" not in off_summary
