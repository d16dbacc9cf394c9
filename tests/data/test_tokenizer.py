"""The trained byte-level BPE: lossless on any text, its vocabulary size, the end-of-text token, save and load."""

from __future__ import annotations

from moespec.data.corpus import generate_domain
from moespec.data.tokenizer import EOT, BPETokenizerConfig, encode, load_tokenizer


def test_the_trained_bpe_is_lossless_and_saves_as_a_hf_tokenizer(tmp_path):
    from transformers import AutoTokenizer

    texts, _ = generate_domain("movies", 60, 0)
    tokenizer, eot_id = load_tokenizer(BPETokenizerConfig(vocab_size=320, min_frequency=2), texts)
    assert len(tokenizer) == 320 and tokenizer.convert_ids_to_tokens(eot_id) == EOT
    unseen = ["Ünïcödé — text never seen: 数据 🙂", "  leading spaces\nand lines"]
    for text in texts[:5] + unseen:
        ids = encode(tokenizer, [text])[0]
        assert eot_id not in ids
        assert tokenizer.decode(ids) == text
    assert sum(map(len, encode(tokenizer, texts))) < sum(len(t.encode()) for t in texts)  # merges compress
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert encode(reloaded, unseen) == encode(tokenizer, unseen)
    assert reloaded.eos_token == EOT


def test_bpe_training_is_deterministic():
    texts, _ = generate_domain("news", 40, 1)
    first, _ = load_tokenizer(BPETokenizerConfig(vocab_size=300), texts)
    second, _ = load_tokenizer(BPETokenizerConfig(vocab_size=300), texts)
    assert first.get_vocab() == second.get_vocab()
