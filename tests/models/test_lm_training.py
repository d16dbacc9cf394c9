"""The LM objective on the shared loop: on a Markov language whose entropy rate is known, the trained
MoE LM's validation loss approaches that rate and beats the best unigram model."""

from __future__ import annotations

import math

import numpy as np
import torch

from moespec.data.packing import pack
from moespec.models.lm import LMModelConfig, build_model, hf_config
from moespec.models.lm_training import LMObjective
from moespec.models.training import LoopConfig, fit, lr_schedule
from tests.builders import one_torch_thread

N_SYMBOLS, STAY = 8, 0.8  # symbols 1..8; token 0 is the end-of-text
EOT = 0


def markov_chain() -> np.ndarray:
    """Doubly stochastic transitions: symbol s goes to s+1 (mod 8) with 0.8, to each other symbol with 0.2/7."""
    transitions = np.full((N_SYMBOLS, N_SYMBOLS), (1 - STAY) / (N_SYMBOLS - 1))
    transitions[np.arange(N_SYMBOLS), (np.arange(N_SYMBOLS) + 1) % N_SYMBOLS] = STAY
    return transitions


def sample_texts(n_texts: int, length: int, rng: np.random.Generator) -> list[list[int]]:
    transitions = markov_chain()
    texts = []
    for _ in range(n_texts):
        state = rng.integers(N_SYMBOLS)  # the stationary law is uniform
        sequence = [state]
        for _ in range(length - 1):
            state = rng.choice(N_SYMBOLS, p=transitions[state])
            sequence.append(state)
        texts.append([s + 1 for s in sequence])
    return texts


def test_the_trained_lm_approaches_the_entropy_rate_and_beats_a_unigram_model():
    transitions = markov_chain()
    entropy_rate = float(-(transitions * np.log(transitions)).sum(axis=1).mean())  # uniform stationary law: 0.889
    rng = np.random.default_rng(0)
    train_texts, val_texts = sample_texts(48, 300, rng), sample_texts(6, 300, rng)
    train, val = pack(train_texts, 32, EOT, keep_tail=False), pack(val_texts, 32, EOT, keep_tail=True)
    frequencies = np.bincount(train.windows[:, 1:].reshape(-1), minlength=N_SYMBOLS + 1) / train.windows[:, 1:].size
    val_targets = val.windows[:, 1:][val.windows[:, 1:] >= 0]
    unigram_loss = float(-np.log(frequencies[val_targets]).mean())  # the best context-free model, fit on train

    config = LMModelConfig(hidden_size=32, num_layers=2, num_heads=2, num_experts=4, top_k=2)
    model = build_model(hf_config(config, N_SYMBOLS + 1, 32, EOT), seed=0)
    objective = LMObjective(
        train,
        val,
        np.zeros(len(val_texts), dtype=np.int64),
        np.array([len(t) for t in val_texts]),
        1,
        EOT,
        batch_size=16,
        seed=0,
        device="cpu",
        balance_weight=0.01,
        z_weight=0.001,
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    steps = 90
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule("cosine", 10, steps))
    with one_torch_thread():
        state = fit(
            model, optimizer, scheduler, objective, LoopConfig(max_steps=steps, eval_every=45, max_grad_norm=1.0)
        )
    val_loss = state.history[-1]["val_loss"]
    # Boundaries (a text's first symbol, its end-of-text) cost more than the rate: 2 of 301 targets per text.
    assert val_loss < entropy_rate + 0.08, (val_loss, entropy_rate)
    assert val_loss < unigram_loss - 0.9, (val_loss, unigram_loss)
    assert unigram_loss > math.log(N_SYMBOLS) - 0.05
    # one byte per symbol (the packing counts a text's bytes; end-of-text has none)
    assert state.history[-1]["val_bits_per_byte"] * math.log(2) > val_loss * 0.99
    load = np.array(state.history[-1]["expert_load"])
    assert load.shape == (2, 4) and np.allclose(load.sum(axis=1), 1.0)
