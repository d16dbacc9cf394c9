"""Packing texts into windows: every token after the first is a target exactly once, owners are right."""

from __future__ import annotations

import numpy as np
import pytest

from moespec.data.packing import PAD, inputs_and_labels, pack

EOT = 0


@pytest.mark.parametrize("seq_len", [1, 3, 4, 7, 50])
def test_the_windows_score_every_token_of_the_stream_once(seq_len):
    texts = [[5, 6, 7], [8], [9, 10, 11, 12, 13]]
    stream = [EOT, 5, 6, 7, EOT, 8, EOT, 9, 10, 11, 12, 13, EOT]
    owners = [PAD, 0, 0, 0, 0, 1, 1, 2, 2, 2, 2, 2, 2]
    packed = pack(texts, seq_len, EOT, keep_tail=True)
    assert packed.windows.shape[1] == seq_len + 1
    targets = packed.windows[:, 1:].reshape(-1)
    assert targets[targets != PAD].tolist() == stream[1:]
    assert packed.owner[:, 1:].reshape(-1)[targets != PAD].tolist() == owners[1:]
    assert packed.n_targets == len(stream) - 1
    # consecutive windows overlap by one token: the last target of one is the first input of the next
    assert np.array_equal(packed.windows[1:, 0], packed.windows[:-1, -1])


def test_training_windows_drop_the_partial_tail():
    packed = pack([[1, 2, 3, 4, 5, 6]], 4, EOT, keep_tail=False)  # stream of 8 tokens: 7 targets, one full window
    assert packed.windows.tolist() == [[EOT, 1, 2, 3, 4]]
    assert (packed.windows != PAD).all()
    assert len(pack([[1]], 4, EOT, keep_tail=False)) == 0


def test_inputs_and_labels_replace_padding():
    packed = pack([[1, 2]], 4, EOT, keep_tail=True)  # stream EOT 1 2 EOT
    inputs, labels = inputs_and_labels(packed.windows, EOT)
    assert inputs.tolist() == [[EOT, 1, 2, EOT]]
    assert labels.tolist() == [[1, 2, EOT, -100]]
