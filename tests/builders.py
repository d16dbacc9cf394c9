"""Shared test builders: tiny experiments, synthetic artifacts and tiny HF models, built in code.

Tests import these from here (never from another test module); fixtures live in ``conftest.py``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import h5py
import numpy as np
import torch

from moespec.artifacts import ArtifactWriter, open_artifact, write_artifact


@contextlib.contextmanager
def one_torch_thread():
    """Run torch on one thread, then restore: tiny models in small batches stall on thread barriers
    when the box is shared, and a stage run inline must match its one-thread job bit for bit."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_experiment(name: str = "t", n_per_domain: int = 4, **sections) -> dict:
    """A small experiment dict on the built-in corpus and model."""
    config = {
        "experiment": name,
        "embed": {
            "model": {"name": "builtin:tiny-bert"},
            "data": [{"kind": "builtin", "n_per_domain": n_per_domain}],
            "batch_size": 16,
            "max_length": 64,
        },
    }
    config.update(sections)
    return config


# --------------------------------------------------------------------------------------------------
# synthetic artifacts


def write_embed_artifact(folder, embeddings, domain, domain_names=None):
    """A synthetic, complete embed artifact holding ``embeddings`` (for known-geometry tests)."""
    n_domains = int(domain.max()) + 1
    from moespec.stages import embed

    writer = ArtifactWriter(folder, "embed", "synthetic", schema=embed.schema(embed.Config()))
    with write_artifact(writer):
        writer.write("embeddings", np.asarray(embeddings, dtype=np.float32))
        writer.write("domain", np.asarray(domain, dtype=np.int64))
        writer.write("domain_names", domain_names or [f"d{i}" for i in range(n_domains)])
        writer.write("label", np.full(len(domain), -1, dtype=np.int64))
        writer.create_dataset("label_names", (0,), h5py.string_dtype())
        writer.write("label_domain", np.zeros(0, dtype=np.int64))
        writer.write("text_id", [f"row/{i}" for i in range(len(domain))])
    return open_artifact(folder)


def run_stage(module, cfg, inputs, folder):
    """Run one stage's ``run`` into ``folder`` through a real ArtifactWriter; return its reader."""
    writer = ArtifactWriter(folder, module.NAME, "test", schema=module.schema(cfg))
    with write_artifact(writer):
        module.run(cfg, inputs, writer)
    return open_artifact(folder), writer.summary


N_DOMAINS, LABELS_PER_DOMAIN, ROWS_PER_CLASS, DIM = 3, 2, 16, 8


def write_reduce_artifact(folder, *, labelled=True, seed=0):
    """A complete synthetic reduce artifact: one Gaussian cluster per (domain, class)."""
    rng = np.random.default_rng(seed)
    n_classes = N_DOMAINS * LABELS_PER_DOMAIN
    centers = rng.normal(0, 3, size=(n_classes, DIM))
    label = np.repeat(np.arange(n_classes), ROWS_PER_CLASS)
    domain = label // LABELS_PER_DOMAIN
    reduced = centers[label] + rng.normal(0, 0.5, size=(len(label), DIM))
    writer = ArtifactWriter(folder, "reduce", f"synthetic{seed}", schema={})
    with write_artifact(writer):
        writer.write("reduced", reduced)
        writer.write("domain", domain.astype(np.int64))
        writer.write("domain_names", [f"d{i}" for i in range(N_DOMAINS)])
        writer.write("label", (label if labelled else np.full(len(label), -1)).astype(np.int64))
        writer.write("label_names", [f"d{c // LABELS_PER_DOMAIN}/c{c % LABELS_PER_DOMAIN}" for c in range(n_classes)])
        writer.write("label_domain", np.arange(n_classes) // LABELS_PER_DOMAIN)
    return open_artifact(folder)


# --------------------------------------------------------------------------------------------------
# tiny HF MoE models

N_EXPERTS, TOP_K, HIDDEN = 4, 2, 32


def word_tokenizer():
    """A word-level tokenizer over the built-in corpus words (with bos, eos, pad and unk)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from moespec.data.corpus import tokenizer_training_texts

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(
        tokenizer_training_texts(n_per_domain=20),
        trainers.WordLevelTrainer(vocab_size=600, special_tokens=["<pad>", "<unk>", "<s>", "</s>"]),
    )
    bos = ("<s>", tok.token_to_id("<s>"))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[bos])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="right",
    )


def tiny_config(kind: str, vocab_size: int, n_layers: int = 2):
    from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig, SwitchTransformersConfig

    if kind == "mixtral":
        return MixtralConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=48,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=48,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=48,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            norm_topk_prob=False,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if kind == "olmoe":
        return OlmoeConfig(
            vocab_size=vocab_size,
            hidden_size=HIDDEN,
            intermediate_size=24,
            num_hidden_layers=n_layers,
            num_attention_heads=4,
            num_key_value_heads=4,
            num_experts=N_EXPERTS,
            num_experts_per_tok=TOP_K,
            max_position_embeddings=256,
            tie_word_embeddings=False,
        )
    if kind == "switch":
        return SwitchTransformersConfig(
            vocab_size=vocab_size,
            d_model=HIDDEN,
            d_kv=8,
            d_ff=48,
            num_layers=2,
            num_decoder_layers=2,
            num_heads=4,
            num_experts=N_EXPERTS,
            encoder_sparse_step=1,
            decoder_sparse_step=1,
            expert_capacity=64,
            decoder_start_token_id=0,
        )
    raise ValueError(kind)


def save_tiny_moe(kind: str, folder: Path, seed: int = 0, n_layers: int = 2) -> Path:
    """Build a tiny random ``kind`` model and its tokenizer and ``save_pretrained`` them into ``folder``."""
    from transformers import AutoModel, AutoModelForCausalLM

    tokenizer = word_tokenizer()
    config = tiny_config(kind, len(tokenizer), n_layers)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = (AutoModel if kind == "switch" else AutoModelForCausalLM).from_config(config)
        # Router weights of a fresh model are tiny (Qwen2-MoE's start at zero); larger ones make
        # the routing decisive, as in a trained model.
        for name, param in model.named_parameters():
            if name.endswith(("gate.weight", "router.classifier.weight")):
                param.data.normal_(0.0, 0.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


# --------------------------------------------------------------------------------------------------
# tiny HF causal LMs (bases for LoRA adapters)


def save_tiny_llama(folder: Path, seed: int = 0, hidden: int = 32, n_layers: int = 2) -> Path:
    """A tiny random LLaMA (q/k/v/o and gate/up/down projections) and its word tokenizer, saved in ``folder``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tokenizer = word_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=n_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)
