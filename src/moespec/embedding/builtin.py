"""Built-in default models for the demo and the tests: tiny transformers built in code.

``builtin:tiny-bert``
    A BERT-style encoder (4 layers, hidden 256, 4 heads, FFN 1024) with a WordPiece tokenizer
    (lower-cased, ``[CLS] ... [SEP]``, pad token ``[PAD]``, right padding).
``builtin:tiny-llama``
    A LLaMA decoder (4 layers, hidden 256, 4 heads, FFN 688, RoPE) with a byte-level BPE tokenizer
    that adds ``<s>`` and, like a real LLaMA tokenizer, has **no pad token** (the loader sets
    pad = eos, as it must for any LLaMA); right padding, so last-token pooling has to find the last
    real token rather than take position -1.

Both tokenizers are trained with HF ``tokenizers`` on the built-in corpus, and the weights are
initialised from a fixed seed: the models are random networks (no pre-training), which is what the
tests and the demo need — real geometry needs a real model. Each model is built once into a local
cache, ``$MOESPEC_CACHE/models/<name>-v<version>`` (default ``~/.cache/moespec``), in a temporary
folder that is then renamed into place (an atomic rename: when two processes race, one wins and
the other discards its copy), and from then on loaded through the very same
``AutoModel.from_pretrained`` / ``AutoTokenizer.from_pretrained`` path as a real model.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

BUILTIN_PREFIX = "builtin:"
#: Seed of the weight initialisation of every built-in model.
WEIGHT_SEED = 0
#: The weights are drawn from torch's global generator (transformers' own initialisers), which
#: threads share: builds in one process take turns so that each sees only its own seeded stream.
_SEEDED_INIT = threading.Lock()


def cache_root() -> Path:
    """moespec's local cache: ``$MOESPEC_CACHE``, else ``~/.cache/moespec``."""
    return Path(os.environ.get("MOESPEC_CACHE") or Path.home() / ".cache" / "moespec").expanduser()


@dataclass(frozen=True)
class BuiltinModel:
    """A built-in model: how to build its tokenizer and its weights.

    Attributes
    ----------
    name : str
        ``"builtin:<slug>"``.
    version : int
        Bump when the build changes, so that caches built by older code are not used.
    build_tokenizer : callable
        ``() -> PreTrainedTokenizerFast``.
    build_config : callable
        ``(tokenizer) -> PretrainedConfig``.
    """

    name: str
    version: int
    build_tokenizer: Callable[[], Any]
    build_config: Callable[[Any], Any]
    description: str = field(default="")

    @property
    def slug(self) -> str:
        return self.name.removeprefix(BUILTIN_PREFIX)


def _training_texts() -> list[str]:
    from moespec.data.corpus import tokenizer_training_texts

    return tokenizer_training_texts()


def _wordpiece_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.train_from_iterator(_training_texts(), trainers.WordPieceTrainer(vocab_size=4000, special_tokens=specials,
                                                                         show_progress=False))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)])
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]", model_max_length=512, padding_side="right")


def _bpe_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=4000, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_training_texts(), trainer)
    # A LLaMA tokenizer prepends <s> and appends nothing.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=2048, padding_side="right",
                                   model_input_names=["input_ids", "attention_mask"])


def _bert_config(tokenizer: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                      intermediate_size=1024, max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id)


def _llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=None,
                       tie_word_embeddings=False)


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m for m in (
        BuiltinModel("builtin:tiny-bert", 1, _wordpiece_tokenizer, _bert_config,
                     "BERT encoder, 4 layers x 256, WordPiece; use pooling mean or cls"),
        BuiltinModel("builtin:tiny-llama", 1, _bpe_tokenizer, _llama_config,
                     "LLaMA decoder, 4 layers x 256, byte-level BPE, no pad token; use pooling last (or mean)"),
    )
}


def is_builtin(name: str) -> bool:
    return name.startswith(BUILTIN_PREFIX)


def builtin_model_dir(name: str) -> Path:
    """The cache folder of built-in model ``name``, built on first use.

    Returns
    -------
    Path
        A folder that ``AutoModel.from_pretrained`` and ``AutoTokenizer.from_pretrained`` load.

    Raises
    ------
    KeyError
        ``name`` is not a built-in model.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; built-in models are {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    final = cache_root() / "models" / f"{spec.slug}-v{spec.version}"
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".building", dir=final.parent))
    try:
        _build(spec, building)
        try:
            os.rename(building, final)  # atomic; fails if another process renamed its copy first
        except OSError:
            if not (final / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return final


def _build(spec: BuiltinModel, folder: Path) -> None:
    import torch
    from transformers import AutoModel

    tokenizer = spec.build_tokenizer()
    config = spec.build_config(tokenizer)
    # fork_rng: seeding here must not change the caller's random stream.
    with _SEEDED_INIT, torch.random.fork_rng(devices=[]):
        torch.manual_seed(WEIGHT_SEED)
        model = AutoModel.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "moespec_builtin.json").write_text(json.dumps(
        {"name": spec.name, "version": spec.version, "weight_seed": WEIGHT_SEED, "description": spec.description},
        indent=2))
