"""Training throughput of the lm stage's MoE language models against baselines measured in the same run.

Two comparisons, each a full training step as the ``lm`` stage runs it (``LMObjective.train_batch``:
forward, next-token loss with the balance and z-losses, backward; then the stage's fused AdamW), on random tokens
(this measures speed, not quality), timed in alternating rounds so that load from other processes
hits every side alike:

1. An E=8 top-2 Qwen2-MoE LM (vocabulary 8192, d=256, 4 blocks, 4 heads, experts of width 256,
   batch 8 x 256 tokens) with the experts implementation the stage picks by measurement on this
   device (``auto``) against its dense Qwen2 twin matched on active parameters (goal: the MoE step
   at most 1.2x the dense step). transformers' ``eager`` loop is shown too.
2. The same model at E=16 top-2: the chosen implementation against transformers' ``eager`` loop on
   the experts layer (forward and backward of one layer on the batch's 2,048 tokens, the router's
   weights in the gradient; goal: >= 1.5x), and for the whole training step, whose other parts
   (attention, the output layer, AdamW) are the same code under both.

Peak memory of each model's step is measured in a fresh process (peak RSS on the CPU, peak
allocated memory on a GPU). On a GPU, model FLOPs utilisation uses 6 N_active + 12 L T d FLOPs per
token against the device's dense bf16 peak given by ``--peak-tflops``.

Run::

    python bench/lm.py                 # 5 alternating rounds of 3 steps
    python bench/lm.py --quick         # 2 rounds of 2 steps
    python bench/lm.py --threads 1     # on a shared machine, fewer threads measure more steadily
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import resource
import statistics
import time

import numpy as np
import torch

from moespec.data.packing import PackedTokens
from moespec.models.lm import (
    AUTO_CANDIDATES,
    LMModelConfig,
    build_model,
    choose_experts_implementation,
    flops_per_token,
    hf_config,
    parameter_counts,
)
from moespec.models.lm_training import LMObjective, make_optimizer

VOCAB, SEQ, BATCH, EOT = 8192, 256, 8, 0
BASE = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "top_k": 2, "expert_size": 256}
GOAL_DENSE_RATIO, GOAL_EAGER_SPEEDUP = 1.2, 1.5


def make_case(n_experts: int, dense_twin: str | None, device: str) -> tuple[object, LMObjective]:
    """A model of the benchmark's shape and an objective whose one batch is random tokens."""
    config = LMModelConfig(**BASE, num_experts=n_experts, dense_twin=dense_twin)
    model = build_model(hf_config(config, VOCAB, SEQ, EOT), seed=0).to(device)
    windows = np.random.default_rng(0).integers(1, VOCAB, size=(BATCH, SEQ + 1))
    packed = PackedTokens(windows, np.zeros_like(windows), 1)
    objective = LMObjective(
        packed,
        packed,
        np.zeros(1, dtype=np.int64),
        np.ones(1),
        1,
        EOT,
        BATCH,
        0,
        device,
        0.01,
        0.001,
        torch.bfloat16 if device == "cuda" else None,
    )
    return model, objective


def train_step(model: object, objective: LMObjective, optimizer: torch.optim.Optimizer) -> None:
    batch = objective.batches(0)[0]
    objective.train_batch(model, batch, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def synchronise(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(
    model: object, objective: LMObjective, optimizer: torch.optim.Optimizer, steps: int, device: str
) -> list[float]:
    times = []
    for _ in range(steps):
        synchronise(device)
        start = time.perf_counter()
        train_step(model, objective, optimizer)
        synchronise(device)
        times.append(time.perf_counter() - start)
    return times


def peak_memory(n_experts: int, dense_twin: str | None, implementation: str, device: str, queue) -> None:
    """Child process: two training steps of one case; put its peak memory (MiB) on ``queue``."""
    torch.set_num_threads(1)
    model, objective = make_case(n_experts, dense_twin, device)
    if dense_twin is None:
        model.set_experts_implementation(implementation)
    optimizer = make_optimizer(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        train_step(model, objective, optimizer)
    synchronise(device)
    if device == "cuda":
        queue.put(torch.cuda.max_memory_allocated() / 2**20)
    else:
        queue.put(peak_rss_mib())


def peak_rss_mib() -> float:
    """This process's peak resident set (``VmHWM``; ``ru_maxrss`` would carry the parent's peak across exec)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except FileNotFoundError:  # not Linux: macOS reports ru_maxrss in bytes
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def measure_memory(n_experts: int, dense_twin: str | None, implementation: str, device: str) -> float:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=peak_memory, args=(n_experts, dense_twin, implementation, device, queue))
    process.start()
    value = queue.get()
    process.join()
    return value


def compare(cases: dict[str, tuple[int, str | None, str]], rounds: int, steps: int, device: str) -> dict[str, dict]:
    """Alternating rounds over the cases; per case the median step time and tokens/s."""
    built = {}
    for name, (n_experts, dense_twin, implementation) in cases.items():
        model, objective = make_case(n_experts, dense_twin, device)
        if dense_twin is None:
            model.set_experts_implementation(implementation)
        optimizer = make_optimizer(model, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
        train_step(model, objective, optimizer)  # warm-up
        built[name] = (model, objective, optimizer)
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (model, objective, optimizer) in built.items():
            times[name] += time_steps(model, objective, optimizer, steps, device)
    results = {}
    for name, (model, _, _) in built.items():
        seconds = statistics.median(times[name])
        total, active = parameter_counts(model)
        results[name] = {"seconds": seconds, "tokens_per_s": BATCH * SEQ / seconds, "total": total, "active": active}
    return results


def chosen_implementation(n_experts: int, device: str) -> tuple[str, dict[str, float]]:
    """What the stage's ``auto`` picks on this device for this model (its own measurement)."""
    model, objective = make_case(n_experts, None, device)
    inputs, labels = objective._tensors(objective.val.windows)
    return choose_experts_implementation(model, inputs, labels, AUTO_CANDIDATES.get(device, AUTO_CANDIDATES["cpu"]))


def compare_layers(
    n_experts: int, implementations: tuple[str, ...], rounds: int, steps: int, device: str
) -> dict[str, float]:
    """Forward and backward of one experts layer and its routing weights (batch x seq tokens, top-2), median seconds."""
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeExperts

    config = hf_config(LMModelConfig(**BASE, num_experts=n_experts), VOCAB, SEQ, EOT)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(BATCH * SEQ, BASE["hidden_size"], generator=generator).to(device).requires_grad_()
    logits = torch.randn(BATCH * SEQ, n_experts, generator=generator).to(device).requires_grad_()
    layers = {}
    for name in implementations:
        # Each layer its own config: the experts forward dispatches on ``self.config`` at every call.
        layer_config = copy.deepcopy(config)
        layer_config._experts_implementation = name
        torch.manual_seed(0)
        layer = Qwen2MoeExperts(layer_config).to(device)
        torch.nn.init.normal_(layer.gate_up_proj, std=0.02)
        torch.nn.init.normal_(layer.down_proj, std=0.02)
        layers[name] = layer
    times: dict[str, list[float]] = {name: [] for name in implementations}
    for round_ in range(rounds + 1):
        for name, layer in layers.items():
            for _ in range(steps):
                synchronise(device)
                start = time.perf_counter()
                weights, index = logits.softmax(-1).topk(BASE["top_k"], dim=-1)  # the router's gradient path too
                layer(hidden, index, weights).square().sum().backward()
                synchronise(device)
                if round_:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def report(title: str, results: dict[str, dict], device: str, peak_tflops: float) -> None:
    print(f"\n{title}")
    print(
        f"  {'model':<34}{'params total':>14}{'active':>12}{'ms/step':>10}{'tokens/s':>11}{'peak MiB':>10}"
        + ("      MFU" if device == "cuda" else "")
    )
    for name, row in results.items():
        line = (
            f"  {name:<34}{row['total']:>14,}{row['active']:>12,}{1e3 * row['seconds']:>10.1f}"
            f"{row['tokens_per_s']:>11,.0f}{row['memory']:>10.0f}"
        )
        if device == "cuda":
            flops = flops_per_token(row["active"], BASE["num_layers"], SEQ, BASE["hidden_size"]) * row["tokens_per_s"]
            line += f"{flops / (peak_tflops * 1e12):>9.3f}"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100 SXM: 989)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds, steps = (2, 2) if args.quick else (5, 3)
    device = args.device
    print(
        f"device {device}, {torch.get_num_threads()} threads; batch {BATCH} x {SEQ} tokens, vocabulary {VOCAB}, "
        f"d={BASE['hidden_size']}, {BASE['num_layers']} blocks; median of {rounds} x {steps} alternating steps"
    )
    for n_experts in (8, 16):
        chosen, seconds = chosen_implementation(n_experts, device)
        timings = ", ".join(f"{k} {1e3 * v:.0f} ms" for k, v in seconds.items())
        print(f"E={n_experts} top-2: auto picks {chosen} ({timings})")
        cases = {
            f"MoE E={n_experts} top-2, {chosen} (chosen)": (n_experts, None, chosen),
            f"MoE E={n_experts} top-2, eager": (n_experts, None, "eager"),
        }
        if n_experts == 8:
            cases["dense twin (active-matched)"] = (n_experts, "active", "eager")
        results = compare(cases, rounds, steps, device)
        for name, (experts, twin, implementation) in cases.items():
            results[name]["memory"] = measure_memory(experts, twin, implementation, device)
        report(f"E={n_experts} top-2", results, device, args.peak_tflops)
        names = list(cases)
        if n_experts == 8:
            ratio = results[names[0]]["seconds"] / results[names[2]]["seconds"]
            eager_ratio = results[names[1]]["seconds"] / results[names[2]]["seconds"]
            print(
                f"  MoE step / dense step: {ratio:.2f}x with {chosen} ({eager_ratio:.2f}x with eager); "
                f"goal <= {GOAL_DENSE_RATIO}x: {'met' if ratio <= GOAL_DENSE_RATIO else 'NOT met'}"
            )
        else:
            layer = compare_layers(n_experts, tuple(dict.fromkeys(("eager", chosen))), rounds, steps, device)
            layer_speedup = layer["eager"] / layer[chosen]
            print(
                f"  experts layer ({BATCH * SEQ} tokens, forward + backward, router weights included): "
                + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in layer.items())
                + f"; {chosen} vs eager {layer_speedup:.2f}x faster; goal >= {GOAL_EAGER_SPEEDUP}x: "
                + ("met" if layer_speedup >= GOAL_EAGER_SPEEDUP else "NOT met")
            )
            print(
                f"  whole training step, {chosen} vs eager: "
                f"{results[names[1]]['seconds'] / results[names[0]]['seconds']:.2f}x faster (the rest of the step, "
                f"attention, the {VOCAB}-word output layer and AdamW, is the same code under both)"
            )


if __name__ == "__main__":
    main()
