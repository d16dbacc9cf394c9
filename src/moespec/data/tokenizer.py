"""Tokenizers of the ``lm`` stage: a byte-level BPE trained on the training texts, or a HF tokenizer.

The trained tokenizer is GPT-2's scheme (Radford et al. 2019, section 2.2): texts are read as UTF-8
bytes mapped to printable characters (``ByteLevel``), so every string is encodable with no unknown
token, and BPE merges are learnt from the training split only (the validation texts never shape
the vocabulary). One special token, :data:`EOT`, separates packed texts. The result is a
``PreTrainedTokenizerFast`` saved beside the model (``save_pretrained``), so that
``AutoTokenizer.from_pretrained`` on the model folder gives it back.

``tokenizers`` and ``transformers`` are imported inside the functions.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from moespec.errors import ConfigError

#: The end-of-text token of trained tokenizers (GPT-2's spelling).
EOT = "<|endoftext|>"
#: Byte-level BPE needs the 256 byte symbols and the end-of-text token.
MIN_BPE_VOCAB = 257


class BPETokenizerConfig(BaseModel):
    """Train a byte-level BPE on the training texts.

    Attributes
    ----------
    vocab_size : int
        Target vocabulary, the 256 bytes and :data:`EOT` included (a small corpus may stop short
        of it: no merge occurs ``min_frequency`` times).
    min_frequency : int
        A pair must occur this often to be merged.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["bpe"] = "bpe"
    vocab_size: int = Field(8192, ge=MIN_BPE_VOCAB)
    min_frequency: int = Field(2, ge=1)


class HFTokenizerConfig(BaseModel):
    """A pretrained HF tokenizer, by hub name or local folder.

    Attributes
    ----------
    name : str
    revision : str, optional
    eot_token : str, optional
        Token put between packed texts; None = the tokenizer's eos token.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["hf"] = "hf"
    name: str
    revision: Optional[str] = None
    eot_token: Optional[str] = None


TokenizerConfig = Annotated[Union[BPETokenizerConfig, HFTokenizerConfig], Field(discriminator="kind")]


def train_bpe(texts: list[str], vocab_size: int, min_frequency: int) -> Any:
    """A byte-level BPE tokenizer (``PreTrainedTokenizerFast``) trained on ``texts``; eos = pad = :data:`EOT`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOT,
        bos_token=EOT,
        pad_token=EOT,
        unk_token=None,
        model_max_length=1 << 30,
    )


def load_tokenizer(cfg: BPETokenizerConfig | HFTokenizerConfig, train_texts: list[str]) -> tuple[Any, int]:
    """The tokenizer ``cfg`` describes and its end-of-text id.

    Raises
    ------
    ConfigError
        A HF tokenizer cannot be loaded, or has no end-of-text token (``lm.tokenizer.*``).
    """
    if isinstance(cfg, BPETokenizerConfig):
        tokenizer = train_bpe(train_texts, cfg.vocab_size, cfg.min_frequency)
        return tokenizer, int(tokenizer.convert_tokens_to_ids(EOT))
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(cfg.name, revision=cfg.revision)
    except (OSError, ValueError) as e:
        raise ConfigError(f"lm.tokenizer.name: cannot load tokenizer {cfg.name!r}: {str(e).splitlines()[0]}") from e
    token = cfg.eot_token or tokenizer.eos_token
    if token is None:
        raise ConfigError(
            f"lm.tokenizer.eot_token: tokenizer {cfg.name!r} has no eos token; name the token to put between texts"
        )
    eot_id = tokenizer.convert_tokens_to_ids(token)
    if eot_id is None or eot_id == tokenizer.unk_token_id:
        raise ConfigError(f"lm.tokenizer.eot_token: {token!r} is not in the vocabulary of {cfg.name!r}")
    return tokenizer, int(eot_id)


def encode(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=False)["input_ids"]
