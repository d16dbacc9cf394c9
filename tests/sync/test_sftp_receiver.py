"""``sftp_channels._Receiver`` against paramiko's own ``BaseSFTP._read_packet`` on the same byte stream."""

from __future__ import annotations

import random
import struct

import pytest
from paramiko.sftp import BaseSFTP, SFTPError

from moespec.sync.sftp_channels import _Receiver


class _Pieces:
    """A channel delivering a byte stream in given pieces, at most ``n`` bytes per ``recv``."""

    def __init__(self, data: bytes, cuts: list[int]):
        self.pieces = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)]) if b > a]

    def recv(self, n: int) -> bytes:
        if not self.pieces:
            return b""
        piece = self.pieces.pop(0)
        if len(piece) > n:
            self.pieces.insert(0, piece[n:])
        return piece[:n]


def _packet(kind: int, body: bytes) -> bytes:
    return struct.pack(">IB", len(body) + 1, kind) + body


def _stream(rng: random.Random) -> tuple[bytes, list[tuple[int, bytes]]]:
    packets = [(103, rng.randbytes(rng.choice([0, 5, 4096, 255 * 1024 + 13]))) for _ in range(40)]
    return b"".join(_packet(k, b) for k, b in packets), packets


@pytest.mark.parametrize("seed", range(5))
def test_same_packets_as_paramiko_whatever_the_pieces(seed):
    rng = random.Random(seed)
    data, packets = _stream(rng)
    cuts = sorted(rng.sample(range(1, len(data)), 300))  # pieces that split lengths and bodies alike
    receiver = _Receiver(_Pieces(data, cuts))
    reference = BaseSFTP()
    reference.sock = _Pieces(data, cuts)
    for kind, body in packets:
        assert receiver.read_packet() == reference._read_packet() == (kind, body)
    with pytest.raises(EOFError):
        receiver.read_packet()


def test_packet_ready_only_for_a_whole_packet():
    first, second = _packet(101, b"x" * 100), _packet(102, b"y" * 10)
    receiver = _Receiver(_Pieces(first + second, [len(first) + 3]))
    assert not receiver.packet_ready()  # nothing read yet
    assert receiver.read_packet() == (101, b"x" * 100)
    assert not receiver.packet_ready()  # 3 bytes of the next length only
    assert receiver.read_packet() == (102, b"y" * 10)


def test_whole_packets_already_received_are_ready():
    stream = _packet(101, b"a") + _packet(102, b"b")
    receiver = _Receiver(_Pieces(stream, []))
    assert receiver.read_packet() == (101, b"a")
    assert receiver.packet_ready()
    assert receiver.read_packet() == (102, b"b")


def test_garbage_length_is_refused_like_paramiko():
    receiver = _Receiver(_Pieces(b"\x01\x00\x00\x05hello", []))
    with pytest.raises(SFTPError, match="Garbage"):
        receiver.read_packet()
