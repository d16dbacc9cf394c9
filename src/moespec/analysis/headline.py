"""One-line headlines of each stage's ``summary.json``, for the terminal after a run.

Only chooses and formats numbers the stages computed; it never derives new ones.
"""

from __future__ import annotations

from typing import Any, Mapping

#: Per stage: (label, summary key or pair of keys shown as "a (null b)").
_HEADLINES: dict[str, list[tuple[str, Any]]] = {
    "embed": [("texts", "n_texts"), ("dim", "dim"), ("tokens/s", "tokens_per_s"), ("pad efficiency", "pad_efficiency")],
    "reduce": [("components", "n_components"), ("variance retained", "variance_retained"),
               ("ID pca@0.75", "id_pca_count"), ("ID TwoNN", "id_twonn"), ("ID MLE", "id_mle_levina_bickel")],
    "fiber": [("manifold rejection", ("rejection_rate", "null_rejection_rate")),
              ("fiber-bundle rejection", ("fiber_rejection_rate", "null_fiber_rejection_rate")),
              ("strata", "n_strata"), ("silhouette", "silhouette")],
    "train": [("model", "model"), ("final loss", "final_train_loss"), ("val loss", "final_val_loss"),
              ("val accuracy", "val_accuracy"), ("expert load", "expert_load"), ("collapse", "collapse_warning")],
    "lm": [("model", "model"), ("val loss", "val_loss"), ("bits/byte", "val_bits_per_byte"),
           ("params", "params_total"), ("active", "params_active"), ("tokens/s", "tokens_per_s"),
           ("expert load", "expert_load"), ("NMI expert-token", "nmi_token"), ("NMI expert-domain", "nmi_domain")],
    "lora": [("domain", "domain"), ("base val loss", "base_val_loss"), ("adapter val loss", "best_val_loss"),
             ("steps", "steps_run"), ("trainable", "trainable_params")],
    "route": [("router accuracy", "router_accuracy"), ("gain recovered", "gain_recovered"), ("loss", "router_loss"),
              ("own adapter best", "own_adapter_best")],
    "ablate": [("model", "model"), ("metric", "metric"), ("without ablation", "baseline"),
               ("routing entropy", "routing_entropy"), ("load CV", "load_cv"), ("dead experts", "dead_experts"),
               ("NMI expert-class", "nmi_class"), ("NMI expert-domain", "nmi_domain")],
}


def format_value(value: Any) -> str:
    """Compact text for a summary value: 4 significant digits, lists in brackets, dicts as k=v."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + " ".join(format_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return " ".join(f"{k}={format_value(v)}" for k, v in value.items())
    return str(value)


def headline(stage: str, summary: Mapping[str, Any]) -> str:
    """The headline of one task: the stage's chosen numbers, or every scalar for other stages.

    For ``ablate`` the per-expert table the stage computed (utilisation, entropy, the largest
    drop and the class it hits) follows on its own lines.
    """
    fields = _HEADLINES.get(stage)
    if fields is None:
        return ", ".join(f"{k}={format_value(v)}" for k, v in summary.items() if not isinstance(v, (dict, list)))
    parts = []
    for label, key in fields:
        if isinstance(key, tuple):
            if key[0] in summary:
                null = f" (null {format_value(summary[key[1]])})" if key[1] in summary else " (no null run)"
                parts.append(f"{label} {format_value(summary[key[0]])}{null}")
        elif key in summary:
            parts.append(f"{label} {format_value(summary[key])}")
    text = ", ".join(parts)
    if stage == "ablate" and isinstance(summary.get("experts"), Mapping) and summary["experts"]:
        from moespec.specialisation.ablation import format_table

        table = format_table(dict(summary["experts"]))
        text += "\n" + "\n".join("      " + line for line in table.splitlines())
    return text
