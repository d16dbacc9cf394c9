"""One-line headlines of each stage's ``summary.json``, for the terminal after a run.

Only chooses and formats numbers the stages computed; it never derives new ones.
"""

from __future__ import annotations

import textwrap
from typing import Any, Mapping

#: Per stage: (label, summary key or pair of keys shown as "a (null b)").
_HEADLINES: dict[str, list[tuple[str, Any]]] = {
    "embed": [("texts", "n_texts"), ("dim", "dim"), ("tokens/s", "tokens_per_s"), ("pad efficiency", "pad_efficiency")],
    "reduce": [
        ("components", "n_components"),
        ("variance retained", "variance_retained"),
        ("ID pca@0.75", "id_pca_count"),
        ("ID TwoNN", "id_twonn"),
        ("ID MLE", "id_mle_levina_bickel"),
    ],
    "fiber": [
        ("manifold rejection", ("rejection_rate", "null_rejection_rate")),
        ("fiber-bundle rejection", ("fiber_rejection_rate", "null_fiber_rejection_rate")),
        ("strata", "n_strata"),
        ("silhouette", "silhouette"),
    ],
    "train": [
        ("model", "model"),
        ("final loss", "final_train_loss"),
        ("val loss", "final_val_loss"),
        ("val accuracy", "val_accuracy"),
        ("expert load", "expert_load"),
        ("collapse", "collapse_warning"),
        ("params active", "params_active"),
        ("dense val accuracy", "dense_val_accuracy"),
        ("dense params active", "dense_params_active"),
    ],
    "lm": [
        ("model", "model"),
        ("val loss", "val_loss"),
        ("bits/byte", "val_bits_per_byte"),
        ("params", "params_total"),
        ("active", "params_active"),
        ("tokens/s", "tokens_per_s"),
        ("expert load", "expert_load"),
        ("NMI expert-token", "nmi_token"),
        ("NMI expert-domain", "nmi_domain"),
    ],
    "lora": [
        ("domain", "domain"),
        ("base val loss", "base_val_loss"),
        ("adapter val loss", "best_val_loss"),
        ("steps", "steps_run"),
        ("trainable", "trainable_params"),
    ],
    "route": [
        ("router accuracy", "router_accuracy"),
        ("gain recovered", "gain_recovered"),
        ("loss", "router_loss"),
        ("own adapter best", "own_adapter_best"),
    ],
    "ablate": [
        ("model", "model"),
        ("metric", "metric"),
        ("without ablation", "baseline"),
        ("routing entropy", "routing_entropy"),
        ("load CV", "load_cv"),
        ("dead experts", "dead_experts"),
        ("NMI expert-class", "nmi_class"),
        ("NMI expert-domain", "nmi_domain"),
    ],
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


def headline(stage: str, summary: Mapping[str, Any], width: int = 120, indent: int = 0) -> str:
    """The headline of one task: the stage's chosen numbers, or every scalar for other stages.

    Lines are wrapped between numbers to ``width`` columns, counting ``indent`` columns already
    printed before the first line (continuation lines start with ``indent`` spaces). For ``ablate``
    the per-expert table the stage computed (utilisation, entropy, the largest drop and the class
    it hits) follows, in column blocks that fit ``width``, each repeating ``layer`` and ``expert``.
    """
    fields = _HEADLINES.get(stage)
    if fields is None:
        parts = [f"{k}={format_value(v)}" for k, v in summary.items() if not isinstance(v, (dict, list))]
    else:
        parts = _parts(fields, summary)
    text = _wrap(parts, width, indent)
    if stage == "ablate" and isinstance(summary.get("experts"), Mapping) and summary["experts"]:
        table = expert_table_text(dict(summary["experts"]), width - 6, summary.get("metric"))
        text += "\n" + "\n".join("      " + line if line else "" for line in table.splitlines())
    return text


def _parts(fields: list[tuple[str, Any]], summary: Mapping[str, Any]) -> list[str]:
    parts = []
    for label, key in fields:
        if isinstance(key, tuple):
            if key[0] in summary:
                null = f" (null {format_value(summary[key[1]])})" if key[1] in summary else " (no null run)"
                parts.append(f"{label} {format_value(summary[key[0]])}{null}")
        elif key in summary:
            parts.append(f"{label} {format_value(summary[key])}")
    return parts


def _wrap(parts: list[str], width: int, indent: int) -> str:
    """Join ``parts`` with ", " into lines of at most ``width`` columns, breaking only between parts."""
    lines: list[str] = []
    current = ""
    room = max(20, width - indent - 1)  # - 1: the trailing comma
    for part in parts:
        candidate = f"{current}, {part}" if current else part
        if len(candidate) <= room:
            current = candidate
            continue
        if current:
            lines.append(current + ",")
        pieces = textwrap.wrap(part, room, break_long_words=False) or [part]  # a long list: break between values
        lines += pieces[:-1]
        current = pieces[-1]
    lines.append(current)
    return ("\n" + " " * indent).join(lines)


#: Column order of the per-expert ablation table (the ablate stage's): keys, routing, then harm columns.
_FIRST_COLUMNS = ("layer", "expert", "utilisation", "importance", "entropy")


def _column_rank(name: str, metric: str | None) -> tuple[int, str]:
    """Where a column of the ablation table goes: the same order whether the summary was just
    computed or read back from ``summary.json`` (whose keys may have been sorted)."""
    if name in _FIRST_COLUMNS:
        return _FIRST_COLUMNS.index(name), ""
    harm = next((f"{metric}_{h}" for h in ("drop", "increase") if name.startswith(f"{metric}_{h}")), None)
    if harm == name:
        return 10, ""  # the metric's change, e.g. accuracy_drop
    if name.startswith("max_") and name.endswith(("_drop", "_increase")):
        return 11, name  # the largest change of one group, e.g. max_class_drop
    if name.startswith("max_"):
        return 12, name  # the group it hits, e.g. max_class
    if name == "control_mean":
        return 13, ""
    if harm is not None:
        return 30, name  # the metric's change in the other modes, e.g. accuracy_drop_zero
    return 20, name  # other columns the stage added


def expert_table_text(table: dict[str, list], width: int = 114, metric: str | None = None) -> str:
    """The per-expert table in a stable column order, split into blocks of at most ``width`` columns.

    ``metric`` (the summary's ``metric``) tells the metric's columns from the others.
    """
    from moespec.specialisation.ablation import format_table

    columns = sorted(table, key=lambda name: _column_rank(name, metric))
    keys = [c for c in ("layer", "expert") if c in table]
    rest = [c for c in columns if c not in keys]
    blocks: list[list[str]] = []
    for column in rest:
        trial = (blocks[-1] if blocks else []) + [column]
        if blocks and len(format_table({c: table[c] for c in keys + trial}).splitlines()[0]) <= width:
            blocks[-1] = trial
        else:
            blocks.append([column])
    return "\n\n".join(format_table({c: table[c] for c in keys + block}) for block in blocks or [[]])
