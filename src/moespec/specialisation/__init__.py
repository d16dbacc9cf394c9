"""Expert specialisation and ablation metrics: pure numpy, computed by the stages on the cluster.

Modules
-------
metrics
    Routing statistics of measured router outputs: load, importance, entropy, mutual information
    and NMI with a grouping, lift, token consistency, the paired bootstrap.
ablation
    The tables of an ablation study (baseline, per-ablation deltas with intervals, control sets
    matched on load, the per-expert summary table) as ``{dataset name: array}`` dicts; the
    ablate stage writes them, nothing here reads or writes files.

Nothing here imports torch; ``moespec.analysis`` (the laptop side) only reads what the stages wrote.
"""
