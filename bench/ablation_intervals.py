"""Coverage of the ablation intervals of a 0/1 metric (issue #18 item 4): score vs percentile bootstrap.

Synthetic ablations: each of ``n`` inputs is correct with probability ``accuracy``; the ablation
toggles each outcome with probability ``flip`` (either direction), so the true change of the expected
accuracy is ``flip (1 - 2 accuracy)``. For each case the script prints the share of ``--repeats``
simulated studies whose 95 % interval holds the truth, for Tango's paired score interval
(``moespec.specialisation.ablation.paired_score_interval``, what the ablate stage now uses for 0/1 metrics)
and for the paired percentile bootstrap it replaced (1000 resamples), and the mean interval widths;
then the score interval's exact coverage (every outcome enumerated:
``paired_interval_coverage``) over a grid of sizes, accuracies and flip rates, and, at a truth of 0,
the coverage of an interval that excludes 0 exactly where McNemar's mid-p test rejects: the least
coverage an interval reaches without declaring effects that test refuses
(``docs/artifacts/ablate.md``, "Intervals of 0/1 metrics").

Run::

    python bench/ablation_intervals.py
    python bench/ablation_intervals.py --repeats 20000
"""

from __future__ import annotations

import argparse

import numpy as np

from scipy import stats

from moespec.specialisation.ablation import paired_interval_coverage, paired_score_interval

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


def mid_p_coverage_at_zero(n: int, flip: float) -> float:
    """Coverage of 0 by an interval that excludes 0 exactly where McNemar's two-sided mid-p test rejects at 5 %.

    At accuracy 0.5 the two directions are equally likely and the truth is 0; ``gained`` and ``lost``
    are then independent Poisson(n flip / 2) to within O(flip) (the exact trinomial is used here).
    """
    changed_max = int(n * flip + 12 * (n * flip) ** 0.5 + 12)
    gained, lost = np.meshgrid(np.arange(changed_max), np.arange(changed_max), indexing="ij")
    keep = gained + lost <= n
    gained, lost = gained[keep], lost[keep]
    counts = np.stack([gained, lost, n - gained - lost], 1)
    probability = stats.multinomial.pmf(counts, n, [flip / 2, flip / 2, 1 - flip])
    changed, smaller = gained + lost, np.minimum(gained, lost)
    mid_p = 2 * (stats.binom.cdf(smaller - 1, changed, 0.5) + 0.5 * stats.binom.pmf(smaller, changed, 0.5))
    return float(probability[(changed == 0) | (mid_p >= 0.05)].sum())


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
    flips = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2)
    print("\nexact coverage of the score interval (95 %); window 0.93-0.97")
    print(f"{'n':>5s} {'accuracy':>8s} " + " ".join(f"{f'flip {flip}':>10s}" for flip in flips))
    for n in (30, 100, 200, 1000):
        for accuracy in (0.5, 0.8, 0.95):
            cells = [paired_interval_coverage(n, (1 - accuracy) * flip, accuracy * flip) for flip in flips]
            print(f"{n:5d} {accuracy:8.2f} " + " ".join(f"{cell:10.4f}" for cell in cells))
    print("\ntruth 0 (accuracy 0.5): coverage of an interval excluding 0 where McNemar's mid-p test rejects")
    for n, flip in ((30, 0.01), (200, 0.01), (200, 0.02), (1000, 0.01)):
        score = paired_interval_coverage(n, flip / 2, flip / 2)
        print(f"  n={n:<5d} flip {flip}: mid-p bound {mid_p_coverage_at_zero(n, flip):.4f}, score interval {score:.4f}")


if __name__ == "__main__":
    main()
