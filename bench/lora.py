"""LoRA against full fine-tuning of the same base, and a learned router's cost against one forward pass.

Training: both sides run the lora stage's own training step (``AdapterObjective.train_batch``, then
an AdamW step) on the same random LLaMA-style base and the same token batches; the LoRA side trains a
PEFT adapter (rank ``--rank`` on q/k/v/o) through ``TrainableView``, the full side every weight of
the base. Step times: both sides in one process, their steps alternating (so that load from other
processes hits both alike), the median of ``--steps`` steps after two warm-up steps. Peak memory:
three steps of each side in a fresh process of its own, peak resident memory on the CPU
(``VmHWM``, the Python runtime and weights included), ``torch.cuda.max_memory_allocated`` on a
GPU; and what training added to it over the loaded model (gradients, optimiser state, activations).

Routing: the learned router's feature pass (``pooled_hidden``: a forward pass stopped after block
``L``, then the mean over tokens) and its logistic regression, against one full forward pass of
the base with the next-token loss (``text_nll``, what scoring a text costs), on the same texts,
timed alternately (best of the rounds); the keyword router's regular expressions are timed on
texts of the same length for scale.

Weights and tokens are random: this measures cost, not quality. ``--size gemma`` builds a model of
Gemma-3-270M's shape (hidden 640, 18 blocks, vocabulary 262,144; no weights are downloaded).

Run::

    python bench/lora.py                    # small base (hidden 256, 4 blocks), CPU
    python bench/lora.py --size gemma       # Gemma-3-270M's shape (use a GPU)
    python bench/lora.py --threads 1        # steadier on a shared machine
"""

from __future__ import annotations

import argparse
import multiprocessing
import resource
import statistics
import time

import numpy as np

SIZES = {
    "small": dict(kind="llama", hidden=256, layers=4, heads=4, kv_heads=2, ffn=688, vocab=8192),
    "gemma": dict(kind="gemma3", hidden=640, layers=18, heads=4, kv_heads=1, ffn=2048, vocab=262144),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_base(size: str, seed: int = 0):
    import torch
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig

    shape = SIZES[size]
    common = dict(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["ffn"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=1024,
    )
    config = Gemma3TextConfig(head_dim=256, **common) if shape["kind"] == "gemma3" else LlamaConfig(**common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def random_texts(n: int, length: int, vocab: int, seed: int):
    from moespec.models.adapters import TokenizedTexts

    rng = np.random.default_rng(seed)
    return TokenizedTexts(rng.integers(4, vocab, size=(n, length)), np.ones((n, length), dtype=np.int64))


def _setup_side(side: str, args: argparse.Namespace):
    """A model of one side, its AdamW optimiser, and the objective over random texts."""
    import torch
    from peft import get_peft_model

    from moespec.models.adapters import AdapterObjective, TrainableView, lora_config

    device = torch.device(args.device)
    base = build_base(args.size, args.seed).to(device)
    model = (
        TrainableView(get_peft_model(base, lora_config(args.rank, 2.0 * args.rank, 0.0, TARGETS)))
        if side == "lora"
        else base
    )
    params = [p for p in model.parameters() if p.requires_grad]
    texts = random_texts(args.batch * (args.steps + 2), args.length, SIZES[args.size]["vocab"], args.seed)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    objective = AdapterObjective(texts, texts.rows(slice(0, 2)), args.batch, args.seed, device, autocast)
    model.train()
    return model, torch.optim.AdamW(params, lr=1e-4), objective, params, base


def _step(model, optimizer, objective, batch, device) -> float:
    import torch

    started = time.perf_counter()
    objective.train_batch(model, batch, 1.0)
    optimizer.step()
    optimizer.zero_grad()
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - started


def _peak_resident_bytes() -> int:
    """This process's peak resident memory: ``VmHWM`` (``ru_maxrss`` of a spawned child starts at its parent's)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_memory(side: str, args: argparse.Namespace, results) -> None:
    """In a fresh process: three training steps of one side, then its peak memory."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = str(args.device).startswith("cuda")
    model, optimizer, objective, params, base = _setup_side(side, args)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if cuda else _peak_resident_bytes()
    for batch in objective.batches(0)[:3]:
        _step(model, optimizer, objective, batch, args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else _peak_resident_bytes()
    # The increment is what training adds to the loaded weights: gradients, optimiser state, activations.
    results[side] = {
        "peak_bytes": peak,
        "increment_bytes": peak - before,
        "trainable": sum(p.numel() for p in params),
        "total": sum(p.numel() for p in base.parameters()),
    }


def compare_training(args: argparse.Namespace) -> dict[str, dict]:
    """Step times (both sides in this process, steps alternating) and peak memory (one process per side)."""
    import torch

    context = multiprocessing.get_context("spawn")
    results = context.Manager().dict()
    for side in ("full", "lora"):
        process = context.Process(target=_peak_memory, args=(side, args, results))
        process.start()
        process.join()
        if process.exitcode != 0:
            raise SystemExit(f"the {side} side failed (exit code {process.exitcode})")
    results = {side: dict(values) for side, values in results.items()}
    if args.threads:
        torch.set_num_threads(args.threads)
    sides = {side: _setup_side(side, args) for side in ("full", "lora")}
    times = {side: [] for side in sides}
    for index in range(args.steps + 2):
        for side, (model, optimizer, objective, _, _) in sides.items():  # alternating: same machine load
            seconds = _step(model, optimizer, objective, objective.batches(0)[index], args.device)
            if index >= 2:  # two warm-up steps
                times[side].append(seconds)
    for side in sides:
        results[side]["step_s"] = statistics.median(times[side])
    return results


def compare_routing(args: argparse.Namespace) -> list[tuple[str, float]]:
    """Seconds per text: full forward with loss, the learned router at several blocks, keywords."""
    import torch

    from moespec.models.adapters import pooled_hidden, text_nll
    from moespec.models.text_routers import KeywordRouter, LearnedRouter

    if args.threads:
        torch.set_num_threads(args.threads)
    base = build_base(args.size, args.seed).to(args.device).eval()
    n_layers = SIZES[args.size]["layers"]
    texts = random_texts(args.route_texts, args.length, SIZES[args.size]["vocab"], args.seed + 1)
    layers = sorted({1, max(1, n_layers // 4), max(1, n_layers // 2)})
    features = pooled_hidden(base, texts, layers[0], args.batch, args.device)
    classifier = LearnedRouter().fit(features, np.arange(len(texts)) % 5)
    words = [" ".join(f"w{t}" for t in row) for row in texts.input_ids]
    keyword = KeywordRouter(
        {"math": ["calculate", "+", "="], "code": ["python", "function"]}, "reasoning", ["math", "code", "reasoning"]
    ).fit()
    sides = {"base forward + loss": lambda: text_nll(base, texts, args.batch, args.device)}
    for layer in layers:
        sides[f"learned router, block {layer}/{n_layers}"] = lambda layer=layer: classifier.predict_proba(
            pooled_hidden(base, texts, layer, args.batch, args.device)
        )
    sides["keyword router"] = lambda: keyword.predict(words)
    best = {name: float("inf") for name in sides}
    for _ in range(args.rounds):
        for name, run in sides.items():  # alternating: every side sees the same machine load
            if str(args.device).startswith("cuda"):
                torch.cuda.synchronize()
            started = time.perf_counter()
            run()
            if str(args.device).startswith("cuda"):
                torch.cuda.synchronize()
            best[name] = min(best[name], (time.perf_counter() - started) / len(texts))
    return list(best.items())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=64, help="tokens per text")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--route-texts", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    shape = SIZES[args.size]
    print(
        f"base: {args.size} ({shape['kind']}, hidden {shape['hidden']}, {shape['layers']} blocks, vocabulary "
        f"{shape['vocab']}) on {args.device}; batch {args.batch} x {args.length} tokens; LoRA rank {args.rank} on "
        f"{', '.join(TARGETS)}"
    )
    train = compare_training(args)
    memory = "peak GPU memory allocated" if args.device.startswith("cuda") else "peak resident memory"
    print(
        f"\n{'training step':<14} {'trainable':>12} {'ms / step':>10} {memory + ' (MiB)':>32} "
        f"{'of it training (MiB)':>22}"
    )
    for side in ("full", "lora"):
        result = train[side]
        print(
            f"{side:<14} {result['trainable']:>12,} {1e3 * result['step_s']:>10.1f} "
            f"{result['peak_bytes'] / 2**20:>32.0f} {result['increment_bytes'] / 2**20:>22.0f}"
        )
    lora, full = train["lora"], train["full"]
    print(
        f"LoRA / full: step time {lora['step_s'] / full['step_s']:.2f}x, peak memory "
        f"{lora['peak_bytes'] / full['peak_bytes']:.2f}x (training's share "
        f"{lora['increment_bytes'] / max(full['increment_bytes'], 1):.2f}x), trainable parameters "
        f"{lora['trainable'] / full['trainable']:.4f}x"
    )
    routing = compare_routing(args)
    reference = routing[0][1]
    print(f"\n{'routing (per text)':<34} {'ms / text':>10} {'vs base forward':>16}")
    for name, seconds in routing:
        print(f"{name:<34} {1e3 * seconds:>10.3f} {seconds / reference:>15.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
