"""Token-embedding mode: export a model's input embedding matrix, one row per vocabulary entry.

The input embedding matrix ``model.get_input_embeddings().weight`` (vocab, dim) is the object
that the fiber-bundle analysis of token spaces studies: a point per token, no context. It is read
in row blocks (cast to float32 block by block), so a 150k x 4096 bf16 matrix never needs a second
full-size copy in float32.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch


def embedding_matrix(model: Any) -> torch.Tensor:
    """The input embedding weight, shape (vocab_rows, dim) (rows may exceed the tokenizer's vocabulary)."""
    return model.get_input_embeddings().weight


def token_strings(tokenizer: Any, n_rows: int) -> list[str]:
    """The token string of each embedding row (the ``text_id`` of token-embedding mode).

    Rows past the tokenizer's vocabulary (matrices are often padded to a multiple of 64) have no
    token; they are named ``"<row 50257>"``.

    Returns
    -------
    list of str, length n_rows
    """
    tokens = tokenizer.convert_ids_to_tokens(list(range(n_rows)))
    return [token if token is not None else f"<row {i}>" for i, token in enumerate(tokens)]


def iter_token_blocks(model: Any, start: int, stop: int, block_rows: int) -> Iterator[tuple[int, int, np.ndarray]]:
    """Rows ``[start, stop)`` of the input embedding matrix in blocks.

    Yields
    ------
    block_start, block_stop : int
    values : ndarray of shape (block_stop - block_start, dim), float32
    """
    weight = embedding_matrix(model)
    with torch.inference_mode():
        for block_start in range(start, stop, block_rows):
            block_stop = min(stop, block_start + block_rows)
            yield block_start, block_stop, weight[block_start:block_stop].to(torch.float32).cpu().numpy()


def token_ids(start: int, stop: int) -> np.ndarray:
    """Token ids of rows ``[start, stop)``: shape (stop - start,), int64."""
    return np.arange(start, stop, dtype=np.int64)


__all__: Sequence[str] = ["embedding_matrix", "token_strings", "iter_token_blocks", "token_ids"]
