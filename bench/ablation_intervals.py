"""Coverage of the ablation intervals of a 0/1 metric (issue #18 item 4): score vs percentile bootstrap.

Synthetic ablations: each of ``n`` inputs is correct with probability ``accuracy``; the ablation
toggles each outcome with probability ``flip`` (either direction), so the true change of the expected
accuracy is ``flip (1 - 2 accuracy)``. For each case the script prints the share of ``--repeats``
simulated studies whose 95 % interval holds the truth, for Tango's paired score interval
(``moespec.specialisation.ablation.paired_score_interval``, what the ablate stage now uses for 0/1 metrics)
and for the paired percentile bootstrap it replaced (1000 resamples), and the mean interval widths.

Run::

    python bench/ablation_intervals.py
    python bench/ablation_intervals.py --repeats 20000
"""

from __future__ import annotations

import argparse

import numpy as np

from moespec.specialisation.ablation import paired_score_interval

CASES = [
    (200, 0.8, 0.01),
    (200, 0.95, 0.01),
    (200, 0.5, 0.01),
    (200, 0.8, 0.05),
    (200, 0.8, 0.2),
    (30, 0.8, 0.01),
    (30, 0.8, 0.05),
    (30, 0.8, 0.2),
    (30, 0.95, 0.2),
    (30, 0.5, 0.2),
]


def coverage(n: int, accuracy: float, flip: float, repeats: int, rng: np.random.Generator) -> tuple[float, ...]:
    baseline = rng.random((repeats, n)) < accuracy
    ablated = baseline ^ (rng.random((repeats, n)) < flip)
    truth = flip * (1 - 2 * accuracy)
    gained, lost = (ablated & ~baseline).sum(1), (baseline & ~ablated).sum(1)
    _, low, high = paired_score_interval(gained, lost, n, 0.95)
    shares = np.stack([lost, n - gained - lost, gained], axis=1) / n
    means = np.stack([(lambda r: (r[:, 2] - r[:, 0]) / n)(rng.multinomial(n, p, size=1000)) for p in shares])
    boot_low, boot_high = np.percentile(means, [2.5, 97.5], axis=1)
    return (
        np.mean((low <= truth) & (truth <= high)),
        np.mean((boot_low <= truth) & (truth <= boot_high)),
        np.mean(high - low),
        np.mean(boot_high - boot_low),
        np.mean(gained + lost == 0),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=10000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(
        f"{'n':>4s} {'accuracy':>8s} {'flip':>5s} {'score':>6s} {'bootstrap':>9s} {'width score':>11s} "
        f"{'width boot':>10s} {'P(none changed)':>15s}"
    )
    for n, accuracy, flip in CASES:
        score, boot, width, boot_width, none = coverage(n, accuracy, flip, args.repeats, rng)
        print(
            f"{n:4d} {accuracy:8.2f} {flip:5.2f} {score:6.3f} {boot:9.3f} {width:11.4f} {boot_width:10.4f} {none:15.3f}"
        )


if __name__ == "__main__":
    main()
