"""Packing tokenised texts into fixed-length training windows, with the owner text of every token.

The texts of a split become one stream ``[EOT] t_0 [EOT] t_1 [EOT] ... t_n [EOT]`` (GPT-2 style
packing: an end-of-text token between texts, no padding inside the stream). Window ``j`` is
``stream[j * L : j * L + L + 1]``: its first ``L`` tokens are the input and its last ``L`` the
next-token targets, so consecutive windows overlap by one token and every stream position after
the first is a target exactly once. Attention is not masked at text boundaries: the model learns
that ``EOT`` starts something new, as GPT-2 did.

Each stream position has an *owner*: the text whose tokens (or whose trailing ``EOT``) it is.
Summing target losses by owner gives per-text and per-domain losses, and dividing by the texts'
UTF-8 bytes gives bits per byte, a tokenizer-independent measure (Gao et al. 2020, The Pile, §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Token and owner value of padding after the end of the stream (never a target).
PAD = -1


@dataclass(frozen=True)
class PackedTokens:
    """Windows of a packed token stream.

    Attributes
    ----------
    windows : ndarray of shape (n_windows, seq_len + 1), int64
        Token ids; :data:`PAD` after the end of the stream.
    owner : ndarray of shape (n_windows, seq_len + 1), int64
        Index (into the packed texts) of the text each position belongs to; :data:`PAD` for the
        stream's leading ``EOT`` and for padding.
    n_texts : int
    """

    windows: np.ndarray
    owner: np.ndarray
    n_texts: int

    def __len__(self) -> int:
        return len(self.windows)

    @property
    def n_targets(self) -> int:
        """Positions with a next-token target."""
        return int((self.windows[:, 1:] != PAD).sum())


def pack(token_lists: list[list[int]], seq_len: int, eot_id: int, *, keep_tail: bool) -> PackedTokens:
    """Pack tokenised texts into windows of ``seq_len`` inputs and ``seq_len`` targets.

    Parameters
    ----------
    token_lists : list of list of int
        Token ids of each text, no special tokens.
    seq_len : int
    eot_id : int
    keep_tail : bool
        Pad the last, partial window (validation: every token is scored) or drop it (training:
        every window is full).
    """
    lengths = np.array([len(tokens) + 1 for tokens in token_lists], dtype=np.int64)  # + the trailing EOT
    stream = np.empty(1 + int(lengths.sum()), dtype=np.int64)
    stream[0] = eot_id
    owner = np.full(len(stream), PAD, dtype=np.int64)
    position = 1
    for index, tokens in enumerate(token_lists):
        stream[position : position + len(tokens)] = tokens
        stream[position + len(tokens)] = eot_id
        owner[position : position + len(tokens) + 1] = index
        position += len(tokens) + 1
    n_targets = len(stream) - 1
    n_windows = -(-n_targets // seq_len) if keep_tail else n_targets // seq_len
    padded = n_windows * seq_len + 1
    stream = np.concatenate([stream, np.full(max(0, padded - len(stream)), PAD, dtype=np.int64)])
    owner = np.concatenate([owner, np.full(max(0, padded - len(owner)), PAD, dtype=np.int64)])
    starts = np.arange(n_windows, dtype=np.int64)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    return PackedTokens(stream[starts], owner[starts], len(token_lists))


def inputs_and_labels(windows: np.ndarray, eot_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Model inputs (padding replaced by ``eot_id``) and labels (-100 where there is no target).

    Parameters
    ----------
    windows : ndarray of shape (batch, seq_len + 1)

    Returns
    -------
    input_ids, labels : ndarray of shape (batch, seq_len), int64
    """
    inputs = windows[:, :-1]
    labels = windows[:, 1:]
    return np.where(inputs == PAD, eot_id, inputs), np.where(labels == PAD, -100, labels)
