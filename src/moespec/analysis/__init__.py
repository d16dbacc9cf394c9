"""The laptop side: read finished artifacts, tabulate and draw them (``moespec report`` / ``compare``).

Nothing here computes a result that a stage should have computed; the metrics the stages compute
on the cluster live in :mod:`moespec.specialisation` and :mod:`moespec.geometry`.

- ``results``: find an experiment's artifacts on disk and group them into runs;
- ``loaders``: read each stage's artifact once into report sections (tables and plot data);
- ``plots``: ``plot_*(data, ax)`` only draws saved results;
- ``report``: the HTML report, figures and JSON summaries; ``compare``: rank the runs of a sweep;
- ``headline``: the one-line terminal headlines of each stage's ``summary.json``;
- ``cli``: the thin ``moespec report`` / ``moespec compare`` shims.
"""
