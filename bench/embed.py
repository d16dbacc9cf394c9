"""Embedding throughput and memory of the embed stage against a naive baseline measured in the same run.

1. Throughput: real (non-pad) tokens per second of ``TextEncoder`` (length-sorted batches,
   masked mean, rows restored to input order; tokenisation of the length pass included) against
   the naive loop most scripts use — the same model, batch size and masked-mean pooling, batches
   in input order with ``padding=True`` per batch. The texts are the built-in corpus (log-normal
   lengths: median 39 words, p95 ~176, as in ``research/geometry_perf.md`` §5). The two sides run
   in alternating rounds over consecutive parts of the texts, so load from other processes hits
   both alike. Prints the ratio, the pad efficiency of each side and the max |difference| of the
   embeddings (must be <= 1e-5).
2. Memory: the whole stage (``run_inline``: corpus, model, batches, HDF5 writing, atomic rename)
   for N and 4N texts, each in a fresh subprocess; prints the peak resident memory of each and the
   growth (goal: < 20 % for 4x the texts, i.e. memory does not grow with N).

Goals on the 2-core development box: ratio >= 4, memory growth < 20 %. Run::

    python bench/embed.py            # 5000 texts; memory at 2500 and 10000 texts (~8 min on 2 cores)
    python bench/embed.py --quick    # 600 texts; memory at 300 and 1200 texts (~2 min)

On a box shared with other busy processes, add ``--threads 1``: with more torch threads than free
cores every operator waits at a thread barrier for a descheduled thread, which costs small batches
(the short texts of the sorted side) up to 5x and so measures the neighbours rather than batching.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

GOAL_RATIO, GOAL_GROWTH, GOAL_DIFF = 4.0, 0.20, 1e-5


def corpus(n: int) -> list[str]:
    """``n`` built-in corpus texts (all six domains)."""
    from moespec.data import BuiltinSource

    return BuiltinSource(n_per_domain=-(-n // 6), seed=0).load().texts[:n]


def naive_encode(loaded, texts: list[str], batch_size: int, max_length: int) -> tuple[np.ndarray, int, int]:
    """The baseline: input order, ``padding=True`` per batch, masked mean (correct, just unsorted)."""
    import torch

    rows, real, padded = [], 0, 0
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = loaded.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                     max_length=max_length, return_tensors="pt")
            hidden = loaded.model(**batch).last_hidden_state.float()  # (B, T, D)
            mask = batch["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            rows.append(((hidden * mask).sum(1) / mask.sum(1)).numpy())
            real, padded = real + int(mask.sum()), padded + mask.numel()
    return np.concatenate(rows), real, padded


def ours_encode(encoder, texts: list[str]) -> tuple[np.ndarray, int, int]:
    """The stage's path without HDF5: length pass, sorted plan, windows back in input order."""
    from moespec.embedding.encoder import plan_batches

    lengths = np.minimum(encoder.token_lengths(texts), encoder.max_length)
    windows = list(encoder.iter_windows(texts, plan_batches(lengths, encoder.batch_size)))
    return (np.concatenate([w.embeddings[-1] for w in windows]), sum(w.real_tokens for w in windows),
            sum(w.padded_tokens for w in windows))


def throughput(model: str, n: int, batch_size: int, max_length: int, rounds: int) -> dict:
    from moespec.embedding import TextEncoder, load_model

    loaded = load_model(model)
    encoder = TextEncoder(loaded.model, loaded.tokenizer, pooling="mean", max_length=max_length,
                          batch_size=batch_size, name=model)
    texts = corpus(n)
    naive_encode(loaded, texts[:batch_size], batch_size, max_length)  # warm-up (first-call allocations)
    sides = {"ours": ours_encode, "naive": None}
    totals = {side: {"seconds": 0.0, "real": 0, "padded": 0, "rows": []} for side in sides}
    bounds = np.linspace(0, n, rounds + 1).astype(int)
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        part = texts[start:stop]
        order = ["ours", "naive"] if number % 2 == 0 else ["naive", "ours"]
        for side in order:
            began = time.perf_counter()
            if side == "ours":
                rows, real, padded = ours_encode(encoder, part)
            else:
                rows, real, padded = naive_encode(loaded, part, batch_size, max_length)
            totals[side]["seconds"] += time.perf_counter() - began
            totals[side]["real"] += real
            totals[side]["padded"] += padded
            totals[side]["rows"].append(rows)
    ours, naive = (np.concatenate(totals[s]["rows"]) for s in ("ours", "naive"))
    result = {side: {"tokens_per_s": t["real"] / t["seconds"], "seconds": t["seconds"], "real_tokens": t["real"],
                     "pad_efficiency": t["real"] / t["padded"]} for side, t in totals.items()}
    result["ratio"] = result["ours"]["tokens_per_s"] / result["naive"]["tokens_per_s"]
    result["max_abs_diff"] = float(np.abs(ours - naive).max())
    assert totals["ours"]["real"] == totals["naive"]["real"], "both sides must see the same tokens"
    return result


def stage_child(n: int, model: str, batch_size: int, max_length: int) -> None:
    """Run the whole embed stage on ``n`` texts in this (fresh) process; print peak memory as JSON."""
    from moespec.launch.runner import run_inline

    experiment = {"experiment": "bench", "embed": {
        "model": {"name": model}, "data": [{"kind": "builtin", "n_per_domain": -(-n // 6)}],
        "batch_size": batch_size, "max_length": max_length}}
    with tempfile.TemporaryDirectory() as root:
        began = time.perf_counter()
        folder = next(iter(run_inline(experiment, root=root, mode="force").values()))
        seconds = time.perf_counter() - began
        summary = json.loads((folder / "summary.json").read_text())
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"n": summary["n_texts"], "peak_mib": peak_mib, "seconds": seconds,
                      "tokens_per_s": summary["tokens_per_s"], "pad_efficiency": summary["pad_efficiency"]}))


def memory(n: int, model: str, batch_size: int, max_length: int, threads: int | None) -> list[dict]:
    runs = []
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    for size in (n, 4 * n):
        command = [sys.executable, __file__, "--child-stage", str(size), "--model", model,
                   "--batch-size", str(batch_size), "--max-length", str(max_length)]
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            raise SystemExit(f"stage run on {size} texts failed:\n{done.stderr[-3000:]}")
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="600 texts; memory at 300 / 1200 texts")
    parser.add_argument("--n", type=int, help="texts for the throughput comparison (default 5000, quick 600)")
    parser.add_argument("--n-memory", type=int, help="N of the memory runs, also run at 4N (default 2500, quick 300)")
    parser.add_argument("--model", default="builtin:tiny-bert")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--rounds", type=int, help="alternating rounds (default 4, quick 2)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core)")
    parser.add_argument("--child-stage", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child_stage:
        stage_child(args.child_stage, args.model, args.batch_size, args.max_length)
        return 0
    n = args.n or (600 if args.quick else 5000)
    n_memory = args.n_memory or (300 if args.quick else 2500)
    rounds = args.rounds or (2 if args.quick else 4)

    import torch

    from moespec.embedding.builtin import builtin_model_dir, is_builtin

    if args.threads:
        torch.set_num_threads(args.threads)

    if is_builtin(args.model):
        builtin_model_dir(args.model)  # build the cache once, outside every timing
    print(f"embed bench: {args.model}, batch {args.batch_size}, max_length {args.max_length}, "
          f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    result = throughput(args.model, n, args.batch_size, args.max_length, rounds)
    print(f"\n1. throughput on {n} heavy-tailed texts ({result['ours']['real_tokens']} real tokens, {rounds} "
          f"alternating rounds)")
    print(f"   {'side':<36} {'real tokens/s':>13} {'pad eff.':>9} {'seconds':>8}")
    for side, label in (("naive", "naive (input order, padding=True)"), ("ours", "ours (length-sorted, restored)")):
        r = result[side]
        print(f"   {label:<36} {r['tokens_per_s']:>13.0f} {r['pad_efficiency']:>9.2f} {r['seconds']:>8.1f}")
    print(f"   ratio ours / naive: {result['ratio']:.2f}x (goal >= {GOAL_RATIO:.0f}x)   "
          f"max |diff|: {result['max_abs_diff']:.1e} (goal <= {GOAL_DIFF:.0e})")

    runs = memory(n_memory, args.model, args.batch_size, args.max_length, args.threads)
    growth = runs[1]["peak_mib"] / runs[0]["peak_mib"] - 1
    print("\n2. whole stage (run_inline, HDF5), fresh process each")
    for run in runs:
        print(f"   N = {run['n']:>6}: peak RSS {run['peak_mib']:7.0f} MiB, {run['seconds']:6.1f} s, "
              f"{run['tokens_per_s']:.0f} tokens/s, pad eff. {run['pad_efficiency']:.2f}")
    print(f"   memory growth for 4x N: {100 * growth:+.1f} % (goal < {100 * GOAL_GROWTH:.0f} %)")
    ok = result["ratio"] >= GOAL_RATIO and result["max_abs_diff"] <= GOAL_DIFF and growth < GOAL_GROWTH
    print(f"\n{'all goals met' if ok else 'GOAL MISSED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
