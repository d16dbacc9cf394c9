"""The batched encoder against per-text unpadded runs of the same model (the known answer)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from moespec.embedding.encoder import TextEncoder, plan_batches
from moespec.errors import ConfigError, DataError

MAX_LENGTH = 80


def _unpadded(loaded, texts, pooling, layer=-1):
    """Each text alone (no padding at all), pooled by hand: the reference."""
    rows = []
    with torch.inference_mode():
        for text in texts:
            batch = loaded.tokenizer([text], truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
            batch.pop("token_type_ids", None)
            states = loaded.model(**batch, output_hidden_states=True).hidden_states[layer][0]  # (T, D)
            rows.append({"mean": states.mean(0), "cls": states[0], "last": states[-1]}[pooling])
    return torch.stack(rows).numpy()


def _min_cosine(a, b):
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return float((a * b).sum(1).min())


def _encoder(loaded, **kw):
    kw = {"pooling": "mean", "max_length": MAX_LENGTH, "batch_size": 16, **kw}
    return TextEncoder(loaded.model, loaded.tokenizer, **kw)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_bert_pooling_in_padded_batches_equals_unpadded(tiny_bert, corpus_texts, pooling):
    encoder = _encoder(tiny_bert, pooling=pooling)
    lengths = np.minimum(encoder.token_lengths(corpus_texts), MAX_LENGTH)
    assert lengths.min() < lengths.max() / 4  # the batches really are padded
    batched = encoder.encode(corpus_texts)[-1]
    assert _min_cosine(batched, _unpadded(tiny_bert, corpus_texts, pooling)) > 0.99999


@pytest.mark.parametrize("side", ["right", "left"])
def test_llama_last_token_pooling_with_either_padding_equals_unpadded(tiny_llama, corpus_texts, side):
    tokenizer = copy.deepcopy(tiny_llama.tokenizer)
    tokenizer.padding_side = side
    encoder = TextEncoder(tiny_llama.model, tokenizer, pooling="last", max_length=MAX_LENGTH, batch_size=16)
    batched = encoder.encode(corpus_texts)[-1]
    reference = _unpadded(tiny_llama, corpus_texts, "last")
    assert _min_cosine(batched, reference) > 0.99999
    assert np.abs(batched - reference).max() < 1e-4


def test_llama_has_no_pad_token_of_its_own_and_pads_with_eos(tiny_llama):
    assert tiny_llama.tokenizer.pad_token == tiny_llama.tokenizer.eos_token == "</s>"
    assert tiny_llama.model.config.pad_token_id is None


def test_sorted_batches_equal_fixed_order_and_rows_keep_input_order(tiny_bert, corpus_texts):
    encoder = _encoder(tiny_bert)
    sorted_rows = encoder.encode(corpus_texts)[-1]
    fixed_rows = encoder.encode(corpus_texts, sort_by_length=False)[-1]
    assert np.abs(sorted_rows - fixed_rows).max() <= 1e-5
    reversed_rows = encoder.encode(corpus_texts[::-1])[-1]
    assert np.abs(reversed_rows[::-1] - sorted_rows).max() <= 1e-5


def test_small_windows_give_the_same_rows_as_one_window(tiny_bert, corpus_texts):
    encoder = _encoder(tiny_bert)
    lengths = np.minimum(encoder.token_lengths(corpus_texts), MAX_LENGTH)
    windows = list(encoder.iter_windows(corpus_texts, plan_batches(lengths, 16, window_rows=12)))
    assert [(w.start, w.stop) for w in windows] == [(0, 12), (12, 24), (24, 30)]
    stacked = np.concatenate([w.embeddings[-1] for w in windows])
    assert np.abs(stacked - encoder.encode(corpus_texts)[-1]).max() <= 1e-5
    assert sum(w.real_tokens for w in windows) == lengths.sum()


def test_plan_covers_every_row_once_sorted_within_windows():
    lengths = np.random.default_rng(0).lognormal(3.5, 0.9, size=1000).astype(int) + 1
    plan = plan_batches(lengths, 32, window_rows=256)
    rows = np.concatenate([r for _, r in plan.batches])
    assert sorted(rows.tolist()) == list(range(1000))
    for number, batch in plan.batches:
        start, stop = plan.windows[number]
        assert start <= batch.min() and batch.max() < stop
    first_window = np.concatenate([r for n, r in plan.batches if n == 0])
    assert np.all(np.diff(lengths[first_window]) <= 0)  # descending: the largest batch comes first

    def padded(p):
        return sum(len(r) * lengths[r].max() for _, r in p.batches)

    naive = plan_batches(lengths, 32, sort_by_length=False)
    assert [r.tolist() for _, r in naive.batches][0] == list(range(32))
    assert padded(naive) > 2 * padded(plan)


def test_layer_list_and_layer_range(tiny_bert, corpus_texts):
    texts = corpus_texts[:6]
    encoder = _encoder(tiny_bert, layers=[2, -1, 0])
    assert encoder.n_hidden_states == 5 and encoder.layer_indices == (2, 4, 0)
    layers = encoder.encode(texts)
    last_only = _encoder(tiny_bert).encode(texts)[-1]  # uses last_hidden_state, no hidden_states tuple
    assert np.abs(layers[-1] - last_only).max() <= 1e-5
    assert _min_cosine(layers[2], _unpadded(tiny_bert, texts, "mean", layer=2)) > 0.99999
    with pytest.raises(ConfigError, match="embed.layer: index 5 is out of range"):
        _encoder(tiny_bert, layers=[5])
    with pytest.raises(ConfigError, match="out of range"):
        _encoder(tiny_bert, layers=[-6])


def test_max_length_beyond_the_model_is_a_config_error(tiny_bert):
    with pytest.raises(ConfigError, match="embed.max_length: 600 exceeds the 512 tokens"):
        _encoder(tiny_bert, max_length=600)


def test_token_lengths_count_special_tokens_before_truncation(tiny_bert):
    encoder = _encoder(tiny_bert, max_length=8)
    lengths = encoder.token_lengths(["film", " ".join(["film"] * 20)])
    assert lengths.tolist() == [3, 22]  # [CLS] film [SEP]


def test_nan_output_is_a_data_error_naming_the_texts(tiny_bert, corpus_texts):
    broken = copy.deepcopy(tiny_bert.model)
    with torch.no_grad():
        broken.encoder.layer[1].output.LayerNorm.weight.fill_(float("nan"))
    encoder = TextEncoder(broken, tiny_bert.tokenizer, pooling="mean", max_length=32, batch_size=4, name="broken")
    texts = corpus_texts[:4]
    lengths = np.minimum(encoder.token_lengths(texts), 32)
    with pytest.raises(DataError, match=r"'broken' produced NaN/inf .* e\.g\. \['a/"):
        list(encoder.iter_windows(texts, plan_batches(lengths, 4), text_ids=["a/0", "a/1", "a/2", "a/3"]))
