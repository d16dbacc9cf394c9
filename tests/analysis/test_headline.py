"""Terminal headlines: stable between a fresh and a cached run, within 120 columns."""

from __future__ import annotations

import json

from moespec.analysis.headline import expert_table_text, headline

EXPERTS = {
    "layer": [0, 0, 1, 1],
    "expert": [0, 1, 0, 1],
    "utilisation": [0.31, 0.69, 0.5, 0.5],
    "importance": [0.28, 0.72, 0.49, 0.51],
    "entropy": [0.94, 0.9, 0.7, 0.8],
    "accuracy_drop": [0.07, 0.01, 0.0, -0.02],
    "max_class_drop": [0.55, 0.2, 0.1, None],
    "max_class": ["products/neutral", "news/sport", "law/contract", None],
    "control_mean": [-0.01, 0.0, 0.01, 0.02],
    "accuracy_drop_zero": [0.05, 0.0, 0.01, 0.0],
    "accuracy_drop_renormalise": [0.06, 0.01, 0.0, 0.0],
}
SUMMARY = {
    "model": "topk",
    "metric": "accuracy",
    "baseline": 0.475,
    "routing_entropy": [0.964, 0.9],
    "load_cv": [0.166, 0.2],
    "dead_experts": 0,
    "nmi_class": [0.1234, 0.2],
    "nmi_domain": [0.05, 0.07],
    "experts": EXPERTS,
}


def _as_cached(summary: dict) -> dict:
    """What a cached run reads back when summary.json was written with sorted keys (older artifacts)."""
    return json.loads(json.dumps(summary, sort_keys=True))


def test_ablation_table_columns_do_not_depend_on_the_key_order_of_summary_json():
    assert headline("ablate", SUMMARY) == headline("ablate", _as_cached(SUMMARY))
    header = expert_table_text(EXPERTS, width=1000, metric="accuracy").splitlines()[0].split()
    assert header == [
        "layer",
        "expert",
        "utilisation",
        "importance",
        "entropy",
        "accuracy_drop",
        "max_class_drop",
        "max_class",
        "control_mean",
        "accuracy_drop_renormalise",
        "accuracy_drop_zero",
    ]


def test_headlines_fit_120_columns_and_break_between_numbers():
    prefix = "  ablate  a5df211b5fdc  "
    text = prefix + headline("ablate", SUMMARY, width=120, indent=len(prefix))
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 120, "\n".join(lines)
    assert lines[0].endswith(",") and lines[1].startswith(" " * len(prefix))
    table = [line for line in lines if line.strip().startswith("layer")]
    assert len(table) >= 2 and all(line.split()[:2] == ["layer", "expert"] for line in table)  # blocks repeat keys
    body = " ".join(line.strip() for line in lines)
    for value in ("0.475", "products/neutral", "0.1234", "-0.0100"):
        assert value in body


def test_train_headline_wraps_a_long_expert_load():
    summary = {
        "model": "dictionary",
        "final_train_loss": 1.25,
        "val_accuracy": 0.4,
        "expert_load": [[round(0.01 * i, 4) for i in range(40)]],
        "collapse_warning": False,
    }
    text = headline("train", summary, width=120, indent=24)
    assert all(24 + len(line.lstrip()) <= 120 for line in text.splitlines())
    assert "collapse False" in text and "val accuracy 0.4" in text


def test_extra_columns_of_a_loss_metric_keep_one_order():
    experts = {
        "layer": [0],
        "expert": [0],
        "utilisation": [0.5],
        "importance": [0.5],
        "entropy": [0.9],
        "reconstruction_increase": [0.1],
        "max_class_increase": [0.2],
        "max_class": ["a/b"],
        "control_mean": [0.0],
        "mixture_reconstruction_increase": [0.05],
        "contrastive_increase": [0.01],
        "assignment_changed": [0.3],
        "reconstruction_increase_zero": [0.2],
    }
    summary = {"metric": "reconstruction", "experts": experts}
    assert headline("ablate", summary) == headline("ablate", _as_cached(summary))
    header = expert_table_text(experts, width=1000, metric="reconstruction").splitlines()[0].split()
    assert header[5:] == [
        "reconstruction_increase",
        "max_class_increase",
        "max_class",
        "control_mean",
        "assignment_changed",
        "contrastive_increase",
        "mixture_reconstruction_increase",
        "reconstruction_increase_zero",
    ]
