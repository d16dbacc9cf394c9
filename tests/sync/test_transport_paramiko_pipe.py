"""``transport_paramiko._PiecePipe`` against paramiko's own ``BufferedPipe`` on the same feeds and reads."""

from __future__ import annotations

import random

import pytest
from paramiko.buffered_pipe import BufferedPipe

from moespec.sync.transport_paramiko import _PiecePipe, _Pieces


@pytest.mark.parametrize("seed", range(5))
def test_reads_match_paramiko_pipe(seed):
    rng = random.Random(seed)
    ours, reference = _PiecePipe(), BufferedPipe()
    for _ in range(400):
        if rng.random() < 0.5:
            data = rng.randbytes(rng.choice([0, 1, 7, 4096, 32768 + 9]))
            ours.feed(data)
            reference.feed(data)
        assert len(ours) == len(reference)
        assert ours.read_ready() == reference.read_ready()
        if len(reference):
            n = rng.choice([1, 4, 100, 40000, 4 << 20])
            assert ours.read(n, timeout=0) == reference.read(n, timeout=0)
    for pipe in (ours, reference):
        pipe.feed(b"tail")
        pipe.close()
    left = reference.empty()
    assert left.endswith(b"tail") and ours.empty() == left
    assert ours.read(10) == b""  # closed and drained: end of stream, as paramiko's


def test_one_waiting_piece_is_handed_out_without_a_copy():
    pipe = _PiecePipe()
    data = bytes(range(256)) * 100
    pipe.feed(data)
    assert pipe.read(1 << 20) is data


def test_only_leading_slices_are_removed():
    pieces = _Pieces()
    pieces.frombytes(b"abcdef")
    pieces.frombytes(b"gh")
    assert pieces.head(7) == b"abcdefg"
    del pieces[:7]
    assert (len(pieces), pieces.head(None)) == (1, b"h")
    with pytest.raises(IndexError):
        del pieces[1:]
