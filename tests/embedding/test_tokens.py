"""Token-embedding mode: the exported rows are the model's input embedding matrix."""

from __future__ import annotations

import numpy as np

from moespec.embedding.tokens import iter_token_blocks, token_strings


def test_blocks_are_the_input_embedding_weight(tiny_llama):
    weight = tiny_llama.model.get_input_embeddings().weight.detach().numpy()
    blocks = list(iter_token_blocks(tiny_llama.model, 10, 1000, block_rows=300))
    assert [(a, b) for a, b, _ in blocks] == [(10, 310), (310, 610), (610, 910), (910, 1000)]
    assert np.array_equal(np.concatenate([v for _, _, v in blocks]), weight[10:1000])


def test_token_strings_name_every_row(tiny_bert):
    n_rows = tiny_bert.model.get_input_embeddings().weight.shape[0]
    names = token_strings(tiny_bert.tokenizer, n_rows + 2)
    assert names[:3] == ["[PAD]", "[UNK]", "[CLS]"]
    assert names[tiny_bert.tokenizer.convert_tokens_to_ids("film")] == "film"
    assert names[-2:] == [f"<row {n_rows}>", f"<row {n_rows + 1}>"]
