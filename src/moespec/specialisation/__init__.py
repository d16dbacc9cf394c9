"""Expert specialisation and ablation metrics: pure numpy, computed by the stages on the cluster.

Modules
-------
metrics
    Routing statistics of measured router outputs: load, importance, entropy, mutual information
    and NMI with a grouping, lift, token consistency, the paired bootstrap; dead experts and the
    one definition of routing collapse (``collapse_report``) that train and ablate share.
ablation
    The tables of an ablation study (baseline, per-ablation deltas with intervals, control sets
    matched on load, the per-expert summary table) as ``{dataset name: array}`` dicts; the
    ablate stage writes them, nothing here reads or writes files.
tokens
    Token-level specialisation of MoE language models: NMI of the expert with the token id and
    with the domain, I(expert; domain | token id) against a shuffled-domain null, vocabulary
    specialisation, co-activation, router saturation.
adapter_routing
    The lora/route comparison: per-domain losses under each router, gain recovered, confusion
    matrices and expected calibration error.

Nothing here imports torch; ``moespec.analysis`` (the laptop side) only reads what the stages wrote.
"""
