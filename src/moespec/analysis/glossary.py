"""Readable names, units and definitions of every metric the report and ``compare`` show.

One word, one meaning: *load* is always the share of routed slots an expert receives (a top-k
router gives every input k slots), in ``train`` and in ``ablate`` alike.
"""

from __future__ import annotations

import re

#: ``<stage>.<summary key>`` (``[i]``: the MoE layer i) -> (readable name, unit).
METRICS: dict[str, tuple[str, str]] = {
    "embed.n_texts": ("texts embedded", "count"),
    "embed.dim": ("embedding dimension", "count"),
    "embed.tokens_per_s": ("embedding throughput", "real tokens / s"),
    "embed.pad_efficiency": ("pad efficiency", "real / padded tokens"),
    "embed.n_truncated": ("texts truncated at max_length", "count"),
    "embed.tokens": ("real tokens embedded", "count"),
    "embed.seconds": ("embedding time", "s"),
    "reduce.variance_retained": ("variance retained by PCA", "fraction"),
    "reduce.n_components": ("PCA components", "count"),
    "reduce.id_pca_count": ("ID pca@0.75", "dimensions"),
    "reduce.id_twonn": ("ID TwoNN", "dimensions"),
    "reduce.id_mle_levina_bickel": ("ID MLE", "dimensions"),
    "fiber.rejection_rate": ("manifold test rejection rate", "fraction of testable points"),
    "fiber.null_rejection_rate": ("manifold test rejection rate on null data", "fraction"),
    "fiber.fiber_rejection_rate": ("fiber-bundle test rejection rate", "fraction of testable points"),
    "fiber.null_fiber_rejection_rate": ("fiber-bundle test rejection rate on null data", "fraction"),
    "fiber.silhouette": ("strata silhouette", "-1 to 1"),
    "fiber.n_strata": ("strata", "count"),
    "train.val_accuracy": ("validation accuracy", "fraction"),
    "train.best_val_loss": ("best validation loss", "mean per row"),
    "train.epochs_run": ("epochs run", "count"),
    "ablate.baseline.accuracy": ("accuracy without ablation", "fraction"),
    "ablate.baseline.reconstruction": ("reconstruction loss without ablation", "mean per row"),
    "ablate.baseline.nll": ("next-token loss without ablation", "nats per token"),
    "ablate.nmi_class": ("NMI expert-class", "0 to 1"),
    "ablate.nmi_domain": ("NMI expert-domain", "0 to 1"),
    "ablate.nmi_stratum": ("NMI expert-stratum", "0 to 1"),
    "ablate.load_cv": ("load CV", "std / mean"),
    "ablate.routing_entropy": ("routing entropy", "/ log E"),
    "ablate.dead_experts": ("dead experts", "count"),
}

#: Term -> definition, for the report's glossary (every metric the report shows is here).
GLOSSARY: dict[str, str] = {
    "ID pca@0.75": "intrinsic dimension as the number of principal components needed to reach 75 % of the "
    "variance (of the reduced data; 'input' variant: of the embeddings).",
    "TwoNN": "intrinsic dimension from the ratio of each point's second to first nearest-neighbour distance "
    "(Facco et al. 2017, Sci. Rep. 7:12140), the largest ratios discarded (10 % by default).",
    "MLE": "Levina-Bickel maximum-likelihood intrinsic dimension from the distances to the k nearest "
    "neighbours (Levina & Bickel 2004, NeurIPS), averaged over points.",
    "rejection rate": "share of testable points at which the manifold test (or the fiber-bundle test) rejects "
    "its null hypothesis at level alpha (Robinson, Dey & Chiang 2025). Read it against the "
    "same test on null data: only the excess is evidence of structure.",
    "null data": "smooth Gaussian data of the same size and covariance as the input, tested the same way, "
    "repeated with fresh draws: the spread of its rates is the test's false-alarm variability.",
    "95 % interval (rates)": "Wilson score interval of a binomial proportion (Wilson 1927, JASA 22:209) "
    "over the testable points of the group.",
    "stratum": "a cluster of points (k-means or GMM on the analysed coordinates), k chosen by a criterion.",
    "silhouette": "mean silhouette coefficient of the strata (-1 to 1; higher: better separated).",
    "local dimension": "slope of log neighbour count against log radius at a point, over small and large radii.",
    "load": "share of routed slots an expert receives (a top-k router gives each input k slots; shares sum "
    "to 1 over a layer's experts; uniform is 1/E). Used with this meaning in train and ablate.",
    "load CV": "coefficient of variation (standard deviation / mean) of the experts' loads in a layer; "
    "0 is perfectly balanced.",
    "importance": "mean router probability an expert receives over all routed inputs (Shazeer et al. 2017).",
    "routing entropy": "entropy of an input's router probabilities divided by log E (0: one expert takes all; "
    "1: uniform). An expert's entropy is the mean over the inputs routed to it (in any of their "
    "k slots).",
    "dead expert": "an expert whose load is below dead_threshold / E.",
    "NMI": "normalised mutual information between an input's group (class, domain or stratum) and the expert "
    "of each of its routed slots: I / sqrt(H(group) H(expert)), 0 to 1.",
    "lift": "share of a group's slots going to an expert divided by that expert's load. 1: no preference; "
    "2: twice as often as on average; 1/2: half as often. Drawn on a log scale centred at 1.",
    "validation accuracy (classifier)": "share of held-out rows whose argmax class is the true class; chance "
    "level is the share of the most frequent class.",
    "validation accuracy (dictionary)": "the dictionary MoE has no classifier head: each held-out row is "
    "assigned to the nearest centroid (in the model's projection space) of "
    "the training rows with each target key, and the share assigned to "
    "its own key is reported; chance level is the most frequent key's share.",
    "ablation Δ": "metric with one expert ablated minus without (mask: the expert's router logit is -inf, "
    "inputs re-route; zero: its output is removed; renormalise: it leaves the selected set), "
    "with a paired bootstrap interval over evaluated inputs.",
    "control mean": "mean harm of random expert sets with the same total load as the ablated expert: an "
    "ablation matters when it harms more than its load-matched controls.",
    "collapse": "one expert takes more than collapse_threshold of the validation rows' routed slots in an epoch.",
    "gain recovered": "for per-domain adapters (lora stage): (loss of the base model - loss with the routed "
    "adapter) / (loss of the base model - loss with the oracle adapter); 1 = oracle routing.",
}


def metric_label(metric: str) -> str:
    """``"train.val_accuracy"`` -> ``"validation accuracy (fraction)"``; ``[i]`` -> ``", layer i"``."""
    match = re.fullmatch(r"(.*?)\[(\d+)\]", metric)
    base, layer = (match.group(1), int(match.group(2))) if match else (metric, None)
    name, unit = METRICS.get(base, (base.split(".", 1)[-1].replace("_", " "), ""))
    where = f", layer {layer}" if layer is not None else ""
    return f"{name}{where}" + (f" ({unit})" if unit else "")
