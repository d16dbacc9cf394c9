"""All single-expert ablations of a classifier: one batched pass against one evaluation pass per expert.

Both sides are the ablate stage's own code on the same model, rows and ablations:

* batched: ``moespec.stages.ablate.trained.ablated_passes`` runs every single-expert ablation of a layer
  as rows of one ``Ablation`` mask of shape (E, 1, E); what comes before the layer and the layer's
  expert outputs are computed once for all E ablations;
* separate: ``moespec.stages.ablate.trained.trained_pass`` once per expert with ``Ablation.of([e])``,
  i.e. E ordinary evaluation passes.

The model is the demo's top-k classifier shape (``TopKMoEConfig`` defaults, 8 experts, top-2,
hidden 64, FFN 128, one MoE layer) on 64-D inputs (the reduce stage's PCA width), evaluated on
240 rows (the demo's held-out split: 6 domains x 200 texts x 20%). Weights and inputs are random:
this measures speed, not quality. The two sides are timed in alternating rounds (best of the
rounds) so that load from other processes hits both alike, and their predictions are checked
to be identical.

Run::

    python bench/ablate.py               # E = 4, 8, 16; 240 and 2400 rows; masks, zero, renormalise
    python bench/ablate.py --quick       # E = 8, 240 rows, mask only (the goal case)
    python bench/ablate.py --threads 1   # steadier on a shared machine
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from moespec.specialisation.ablation import plan_ablations
from moespec.models import Ablation, TopKMoEConfig
from moespec.stages.ablate.common import LIBRARY_MODE
from moespec.stages.ablate.trained import ablated_passes, trained_pass

INPUT_DIM, N_CLASSES, DEMO_ROWS, BATCH_SIZE = 64, 18, 240, 256
GOAL_EXPERTS = 8


def _setup(n_experts: int, n_rows: int, seed: int):
    model = TopKMoEConfig(n_experts=n_experts).build(input_dim=INPUT_DIM, n_classes=N_CLASSES, seed=seed).eval()
    features = torch.randn(n_rows, INPUT_DIM, generator=torch.Generator().manual_seed(seed))
    plan = plan_ablations(
        [0], list(range(n_experts)), np.full((1, n_experts), 1.0 / n_experts), 0, np.random.default_rng(seed)
    )
    return model, features, plan


def _batched(model, features, plan, mode):
    return ablated_passes(model, features, plan, mode, BATCH_SIZE, n_layers=1)["prediction"]


def _separate(model, features, plan, mode):
    n_experts = plan.masks.shape[1]
    return np.concatenate(
        [
            trained_pass(model, features, Ablation.of([e], n_experts, mode), BATCH_SIZE)["prediction"]
            for e in range(n_experts)
        ]
    )


def _best_times(model, features, plan, mode, rounds: int, repeats: int) -> dict[str, float]:
    contenders = {"separate": _separate, "batched": _batched}
    best = {name: float("inf") for name in contenders}
    for _ in range(rounds):
        for name, run in contenders.items():  # alternating: both sides see the same machine load
            started = time.perf_counter()
            for _ in range(repeats):
                run(model, features, plan, mode)
            best[name] = min(best[name], (time.perf_counter() - started) / repeats)
    return best


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"E={GOAL_EXPERTS}, {DEMO_ROWS} rows, mask only")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    experts = [GOAL_EXPERTS] if args.quick else [4, GOAL_EXPERTS, 16]
    rows = [DEMO_ROWS] if args.quick else [DEMO_ROWS, 10 * DEMO_ROWS]
    modes = ["mask"] if args.quick else ["mask", "zero", "renormalise"]
    rounds, repeats = (5, 3) if args.quick else (7, 5)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, best of {rounds} rounds of {repeats}; "
        f"top-2 classifier, hidden 64, FFN 128, input {INPUT_DIM}"
    )
    goal_met = True
    with torch.no_grad():
        for n_experts in experts:
            for n_rows in rows:
                model, features, plan = _setup(n_experts, n_rows, args.seed)
                for mode in modes:
                    library_mode = LIBRARY_MODE[mode]
                    same = np.array_equal(
                        _batched(model, features, plan, library_mode), _separate(model, features, plan, library_mode)
                    )
                    best = _best_times(model, features, plan, library_mode, rounds, repeats)
                    ratio = best["separate"] / best["batched"]
                    print(
                        f"  E={n_experts:2d} rows={n_rows:5d} {mode:11s}: {n_experts} separate passes "
                        f"{best['separate'] * 1e3:8.2f} ms, one batched pass {best['batched'] * 1e3:7.2f} ms "
                        f"-> {ratio:5.1f}x (identical predictions: {same})"
                    )
                    if not same:
                        goal_met = False
                    if n_experts == GOAL_EXPERTS and n_rows == DEMO_ROWS and mode == "mask":
                        goal = GOAL_EXPERTS / 2
                        goal_met &= ratio >= goal
                        print(
                            f"  goal at E={GOAL_EXPERTS}, {DEMO_ROWS} rows: >= {goal:.0f}x -> {ratio:.1f}x "
                            f"{'met' if ratio >= goal else 'NOT met'}"
                        )
    return 0 if goal_met else 1


if __name__ == "__main__":
    raise SystemExit(main())
