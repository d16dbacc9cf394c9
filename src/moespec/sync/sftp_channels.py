"""SFTP channels that pull and push files: the protocol side of the transfer engine.

Pulls use a pipelined SFTP client written over paramiko's request layer
(``SFTPClient._async_request`` / ``_read_response``, stable since paramiko 1.x) rather than
``SFTPClient.get``, because on a link with latency the per-file round trips, not the bandwidth,
dominate (docs/sync.md, "Measurements"):

- each channel keeps many files in flight: ``OPEN`` for the next files goes out while earlier
  files are still being read, so a small file costs about two round trips of *latency* but
  almost no *time*;
- reads are issued up to a byte budget per channel with no polling: paramiko's prefetch thread
  sleeps 10 ms whenever its request bound is hit, which made bounded downloads crawl
  (paramiko#2455), and ``get()`` adds a ``stat`` round trip per file (paramiko#562);
- reads are as large as the server says it accepts (``limits@openssh.com``, 255 KiB for
  OpenSSH), else 32 KiB; short reads are asked again for the rest;
- ``FSTAT`` is queued right behind the last ``READ``: the server answers in order, so it tells
  whether the file changed while it was read, at no extra round trip; ``CLOSE`` is sent without
  waiting for its answer.

Each file is written to a hidden ``*.part`` next to its final name, checked (size, unchanged
remote attributes, and the content hash under ``--checksum``), given the remote mtime and mode,
and renamed into place. A ``.part`` left by an interrupted run is resumed when it belongs to the
same remote version: the last 64 KiB are read again and compared before appending.

Pushes use paramiko's pipelined ``putfo`` into a remote ``*.part``, then ``posix-rename``.
"""

from __future__ import annotations

import os
import posixpath
import stat
import struct
import threading
from pathlib import Path

import paramiko
from paramiko.sftp import (
    CMD_ATTRS,
    CMD_CLOSE,
    CMD_DATA,
    CMD_EXTENDED,
    CMD_EXTENDED_REPLY,
    CMD_FSTAT,
    CMD_HANDLE,
    CMD_OPEN,
    CMD_READ,
    CMD_STATUS,
    SFTP_FLAG_READ,
    SFTPError,
    int64,
)
from paramiko.sftp_attr import SFTPAttributes

from moespec.errors import SyncError
from moespec.sync.engine import PassState, is_plain_file, local_error, log, sha256_file
from moespec.sync.listing import remote_bytes, remote_join
from moespec.sync.paths import LocalRoot, part_name, printable
from moespec.sync.plan import Action

#: Bytes of a kept ``.part`` that are fetched again and compared before a resume appends to it.
RESUME_OVERLAP = 64 * 1024
#: SFTP read size when the server does not state its limits: 32 KiB is what every server accepts
#: (paramiko's MAX_REQUEST_SIZE).
SAFE_READ_SIZE = 32 * 1024
#: Largest read asked for. OpenSSH's sftp-server allows 255 KiB (SFTP_MAX_READ_LENGTH); with
#: 32 KiB reads paramiko spends twice rsync's CPU per byte, with 255 KiB about the same.
MAX_READ_SIZE = 255 * 1024
_FLUSH_BYTES = 1 << 20
#: Data answers at least this long go straight from the received packet to the file, not through
#: the file's write buffer.
_DIRECT_BYTES = 64 * 1024
#: Most bytes taken from a paramiko channel at once: everything that has arrived, in one call
#: (its ``recv`` copies what is buffered, up to this).
_RECV_BYTES = 4 << 20
#: Most answers handled before the requests they lead to are sent (a bound, so that a steady
#: stream of data never holds the next reads back for long).
_BURST = 32


# --------------------------------------------------------------------------------------------------
# pull: one file on one channel


class _Download:
    """The requests of one file: OPEN, READs and FSTAT pipelined, CLOSE without waiting.

    paramiko's ``_read_response`` hands every response to the object passed with its request
    (``_async_response``); that is how responses of many files on one channel find their file.
    """

    def __init__(self, action: Action, channel: "PullChannel"):
        self.action = action
        self.entry = action.source
        self.channel = channel
        self.size = self.entry.size
        self.handle: bytes | None = None
        self.kinds: dict[int, tuple[str, int, int]] = {}
        self.next_offset = 0
        self.write_offset = 0
        self.tail = b""  # bytes of a kept .part that incoming data must match
        self.tail_offset = 0
        self.early: dict[int, bytes] = {}
        self.buffer = bytearray()
        self.fd: int | None = None
        self.part: Path | None = None
        self.stat_sent = False
        self.stat_ok = False
        self.finished = False

    # ---- requests

    def _send(self, kind: str, command: int, *args, offset: int = 0, length: int = 0) -> None:
        num = self.channel.sftp._async_request(self, command, *args)
        self.kinds[num] = (kind, offset, length)
        self.channel.outstanding += 1
        self.channel.inflight += length

    def start(self) -> None:
        path = remote_bytes(remote_join(self.channel.remote_root, self.action.path))
        self._send("open", CMD_OPEN, path, int(SFTP_FLAG_READ), SFTPAttributes())

    def issue(self) -> bool:
        """Queue reads within the channel's budget, and FSTAT right behind the last one.

        Returns whether requests remain to be sent (reads past the budget, or the FSTAT).
        """
        if self.handle is None or self.finished:
            return False
        channel = self.channel
        while self.next_offset < self.size and channel.inflight < channel.settings.inflight_bytes:
            length = min(channel.read_size, self.size - self.next_offset)
            self._send(
                "read",
                CMD_READ,
                self.handle,
                int64(self.next_offset),
                int(length),
                offset=self.next_offset,
                length=length,
            )
            self.next_offset += length
        if self.next_offset >= self.size and not self.stat_sent:
            # queued right behind the last READ: answered after it, so it sees the file as read
            self.stat_sent = True
            self._send("stat", CMD_FSTAT, self.handle)
        return not self.stat_sent

    def _close_remote(self) -> None:
        """Release the remote handle; nobody waits for the answer (``type(None)``: paramiko drops it)."""
        handle, self.handle = self.handle, None
        if handle is not None:
            try:
                self.channel.sftp._async_request(type(None), CMD_CLOSE, handle)
            except (OSError, EOFError, paramiko.SSHException):
                pass  # the connection is gone, and the handle with it

    # ---- responses

    def _async_response(self, kind_code: int, msg, num: int) -> None:
        kind, offset, length = self.kinds.pop(num)
        channel = self.channel
        channel.outstanding -= 1
        channel.inflight -= length
        channel.shared.progress.touch()
        if self.finished:
            return  # answers still in flight for a file that already failed
        try:
            if kind_code == CMD_STATUS:
                self._on_status(kind, msg)
            elif kind == "open" and kind_code == CMD_HANDLE:
                self._on_open(msg.get_binary())
            elif kind == "read" and kind_code == CMD_DATA:
                self._on_data(offset, length, msg.get_binary())
            elif kind == "stat" and kind_code == CMD_ATTRS:
                self._on_stat(SFTPAttributes._from_msg(msg))
            else:
                self.fail(f"unexpected SFTP answer {kind_code} to {kind}", retryable=True)
        except (OSError, SyncError) as e:  # local problems: this file fails, the others go on
            self.fail(local_error(e), retryable=False)
        if not self.finished and self.stat_ok and self.write_offset >= self.size:
            self._complete()

    def _on_status(self, kind: str, msg) -> None:
        try:
            self.channel.sftp._convert_status(msg)
        except EOFError:
            self.fail("remote file is shorter than listed (changed while being read)", retryable=True)
            return
        except OSError as e:
            self.fail(f"remote {kind} failed: {e}", retryable=False)
            return
        self.fail(f"unexpected SFTP status for {kind}", retryable=True)

    def _on_open(self, handle: bytes) -> None:
        self.handle = handle
        try:
            self._open_part()
        except BaseException:
            self._close_remote()
            raise
        self.channel.issuing.append(self)

    def _open_part(self) -> None:
        """Create the .part file, or reopen a kept one of the same remote version to resume it."""
        local: LocalRoot = self.channel.local
        final = local.check_parent(self.action.path)
        self.part = final.with_name(part_name(final.name, self.size, self.entry.mtime))
        # partial files of other versions were removed before the pass (plan.stale_parts), from the
        # listing: no listdir per file here
        kept = self.part.lstat().st_size if is_plain_file(self.part) else -1
        if 0 < kept <= self.size:
            self.fd = os.open(self.part, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
            start = max(0, kept - RESUME_OVERLAP)
            os.lseek(self.fd, start, os.SEEK_SET)
            self.tail, self.tail_offset = os.read(self.fd, kept - start), start
            self.next_offset = self.write_offset = start
        else:
            if kept >= 0 or os.path.islink(self.part):
                os.unlink(self.part)
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
            self.fd = os.open(self.part, flags, 0o600)

    def _on_data(self, offset: int, length: int, data: bytes) -> None:
        if not data:
            self.fail("remote file is shorter than listed (changed while being read)", retryable=True)
            return
        if len(data) < length:  # a short read is legal (the handle stays open until the end): ask for the rest
            self.channel.read_size = min(self.channel.read_size, max(len(data), 4096))  # and ask for less
            rest = offset + len(data)
            self._send(
                "read",
                CMD_READ,
                self.handle,
                int64(rest),
                int(length - len(data)),
                offset=rest,
                length=length - len(data),
            )
        self.early[offset] = data
        while self.write_offset in self.early:
            chunk = self.early.pop(self.write_offset)
            self._consume(chunk)

    def _consume(self, chunk: bytes) -> None:
        offset = self.write_offset
        tail_end = self.tail_offset + len(self.tail)
        if offset < tail_end:  # resuming: these bytes are already on disk and must match
            overlap = min(len(chunk), tail_end - offset)
            if chunk[:overlap] != self.tail[offset - self.tail_offset : offset - self.tail_offset + overlap]:
                self.fail(
                    "kept partial file does not match the remote file; it was removed", retryable=True, discard=True
                )
                return
            self.write_offset += overlap
            chunk = chunk[overlap:]
        if chunk:
            self.write_offset += len(chunk)
            self.channel.shared.progress.add(len(chunk))
            if not self.buffer and len(chunk) >= _DIRECT_BYTES:  # a large read: no copy into the buffer
                _write_all(self.fd, chunk)
                return
            self.buffer += chunk
            if len(self.buffer) >= _FLUSH_BYTES:
                self._flush()

    def _flush(self) -> None:
        _write_all(self.fd, self.buffer)
        self.buffer = bytearray()

    def _on_stat(self, attrs: SFTPAttributes) -> None:
        if attrs.st_size != self.size or int(attrs.st_mtime or 0) != self.entry.mtime_s:
            self.fail("remote file changed while being read", retryable=True, discard=True)
            return
        self.stat_ok = True

    # ---- the end

    def _complete(self) -> None:
        """Everything arrived: release the remote handle and finish the file off this thread.

        The local end (flush, fsync, hash, rename) runs in the finisher pool so that a slow
        ``fsync`` (milliseconds per file) never stalls the channel's request pipeline.
        """
        self.finished = True
        self.channel.finished += 1
        self._close_remote()
        self.channel.shared.finisher.submit(self._finalize)

    def _finalize(self) -> None:
        """Flush, verify, stamp and rename the .part into place (in the finisher pool)."""
        shared = self.channel.shared
        try:
            self._flush()
            if self.channel.settings.fsync:
                os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            expected = self.channel.expected_sums.get(self.action.path)
            if expected is not None and sha256_file(self.part) != expected:
                os.unlink(self.part)
                shared.failed(self.action.path, "checksum of the received file does not match the remote one")
                return
            os.chmod(self.part, self.entry.mode & 0o777)
            os.utime(self.part, (self.entry.mtime, self.entry.mtime))
            os.replace(self.part, self.channel.local.path(self.action.path))
        except Exception as e:  # in a pool nothing would report it: every file must end done or failed
            log.debug("finishing %s failed", self.action.path, exc_info=True)
            if self.fd is not None:
                os.close(self.fd)
            shared.failed(self.action.path, local_error(e), retryable=False)
            return
        shared.succeeded(self.action)

    def fail(self, reason: str, retryable: bool, discard: bool = False) -> None:
        """Give up on this file; keep the .part for a resume unless its content is suspect."""
        if self.finished:
            return
        self.finished = True
        self.channel.finished += 1
        self._close_remote()
        if self.fd is not None:
            try:
                self._flush()  # what arrived is kept for a resume
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if discard and self.part is not None:
            try:
                os.unlink(self.part)
            except OSError:
                pass
        kept = not discard and self.part is not None and is_plain_file(self.part) and self.part.stat().st_size > 0
        self.channel.shared.failed(self.action.path, reason, retryable, resumable=kept)

    def abandon(self, reason: str) -> None:
        """The connection died: keep what was received for the next run."""
        self.fail(reason, retryable=True)


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


class _Receiver:
    """Cuts SFTP packets out of what the channel delivers, taking everything that arrived at once.

    paramiko's ``BaseSFTP._read_packet`` asks the channel for the 4-byte length, then for the body
    with ``out += x`` per piece: a 255 KiB DATA answer arrives as ~8 SSH packets of 32 KiB (sshd
    reads its ``sftp-server`` in 32 KiB pieces), so the body was copied again for every piece, and
    each small ``recv`` moved the rest of paramiko's channel buffer down. Here each ``recv`` takes
    all that is buffered (up to 4 MiB) and appends it once; a packet is copied out once.

    Only for paramiko channels: the openssh transport's pipe already answers ``recv(n)`` with one
    ``os.read`` and no copy, and there this reader measured slower (docs/sync.md, "Transfers").
    """

    def __init__(self, sock):
        self.sock = sock
        self._buffer = bytearray()
        self._pos = 0

    def packet_ready(self) -> bool:
        """Whether a whole packet is already here (answered without touching the channel)."""
        have = len(self._buffer) - self._pos
        return have >= 4 and have >= 4 + int.from_bytes(self._buffer[self._pos : self._pos + 4], "big")

    def _fill(self, need: int) -> None:
        while len(self._buffer) - self._pos < need:
            if self._pos:
                del self._buffer[: self._pos]  # from the front: CPython moves a pointer, not the bytes
                self._pos = 0
            data = self.sock.recv(_RECV_BYTES)
            if not data:
                raise EOFError("the SFTP channel closed")
            self._buffer += data

    def read_packet(self) -> tuple[int, bytes]:
        """``BaseSFTP._read_packet``'s contract: the packet type and the rest of its body."""
        self._fill(4)
        (size,) = struct.unpack_from(">I", self._buffer, self._pos)
        if size >> 24:  # as paramiko: nothing this large is a real SFTP packet
            raise SFTPError("Garbage packet received")
        self._fill(4 + size)
        start, self._pos = self._pos + 4, self._pos + 4 + size
        if size == 0:
            return 0, b""
        with memoryview(self._buffer) as view:
            return view[start], view[start + 1 : self._pos].tobytes()


def receiver(sftp) -> _Receiver | None:
    """The ``_Receiver`` reading ``sftp``'s paramiko channel, installed as its ``_read_packet`` on
    first use; None for other streams."""
    found = sftp.__dict__.get("_moespec_receiver")
    if found is None and isinstance(sftp.sock, paramiko.Channel):
        found = sftp._moespec_receiver = _Receiver(sftp.sock)
        sftp._read_packet = found.read_packet
    return found


def server_limits(sftp) -> dict[str, int]:
    """The server's ``limits@openssh.com`` (OpenSSH >= 8.7): max packet, read, write, open handles.

    Returns an empty dict when the server does not know the extension.
    """
    try:
        kind, msg = sftp._request(CMD_EXTENDED, "limits@openssh.com")
    except (OSError, paramiko.SFTPError):
        return {}
    if kind != CMD_EXTENDED_REPLY:
        return {}
    names = ("max-packet-length", "max-read-length", "max-write-length", "max-open-handles")
    return {name: msg.get_int64() for name in names}


class _Coalesced:
    """An SFTP client's socket whose writes are collected until ``flush``: one write per burst.

    paramiko sends each request as soon as it is made, so a small file's OPEN, READ, FSTAT and
    CLOSE would each be an SSH packet (encrypted and sent on its own, and answered on its own by
    ``sftp-server``, which writes out what one read of its input produced). The channel collects
    the requests it makes between two waits for an answer and sends them together just before it
    waits: no request is held back while the channel waits.
    """

    def __init__(self, sock):
        self.sock = sock
        self._pending: list[bytes] = []

    def send(self, data) -> int:
        self._pending.append(bytes(data))
        return len(data)

    def flush(self) -> None:
        if not self._pending:
            return
        data, self._pending = b"".join(self._pending), []
        while data:
            sent = self.sock.send(data)
            if sent <= 0:
                raise EOFError("the SFTP channel closed")
            data = data[sent:]

    def __getattr__(self, name):  # recv, close, closed, get_name...: the socket's own
        return getattr(self.sock, name)


class PullChannel:
    """One SFTP channel and its thread: keeps many files in flight, reads up to a byte budget."""

    def __init__(self, sftp, shared: PassState, local: LocalRoot, remote_root: str, expected_sums: dict[str, str]):
        self.sftp = sftp
        self.shared = shared
        self.settings = shared.settings
        self.local = local
        self.remote_root = remote_root
        self.expected_sums = expected_sums
        self.outstanding = 0
        self.inflight = 0
        self.read_size = SAFE_READ_SIZE
        self.max_files = self.settings.files_per_channel
        self.issuing: list[_Download] = []  # open files with reads (or the FSTAT) still to send
        self.finished = 0  # files that ended since ``run`` last dropped them from its list

    def _admit(self, active: list[_Download]) -> None:
        while len(active) < self.max_files and not self.shared.exhausted():
            remaining = sum(d.size - d.write_offset for d in active)
            if active and remaining >= self.settings.admit_bytes:
                return
            action = self.shared.take()
            if action is None:
                return
            download = _Download(action, self)
            download.start()
            active.append(download)

    def run(self) -> None:
        received = receiver(self.sftp)
        limits = server_limits(self.sftp)
        if limits:
            self.read_size = max(SAFE_READ_SIZE, min(MAX_READ_SIZE, limits["max-read-length"] or SAFE_READ_SIZE))
            if limits["max-open-handles"]:
                self.max_files = max(1, min(self.max_files, limits["max-open-handles"] - 2))
        active: list[_Download] = []
        self.sftp.sock = coalesced = _Coalesced(self.sftp.sock)
        try:
            while True:
                self._admit(active)
                # only files with requests left to send (most send all of theirs when they open)
                self.issuing = [download for download in self.issuing if download.issue()]
                if self.finished:
                    active = [d for d in active if not d.finished]
                    self.finished = 0
                coalesced.flush()
                if not active and self.outstanding == 0:
                    if self.shared.exhausted():
                        return
                    continue
                if self.outstanding == 0:
                    raise AssertionError("files in flight but no request outstanding")
                self.sftp._read_response()
                # answers that are already here first, so that the requests they lead to go out together
                for _ in range(_BURST - 1):
                    if not (self.outstanding and ((received and received.packet_ready()) or coalesced.recv_ready())):
                        break
                    self.sftp._read_response()
        except (paramiko.SSHException, EOFError, OSError) as e:
            reason = self.shared.abort_reason or f"connection lost: {e}"
            for download in active:
                download.abandon(reason)
            raise
        finally:
            self.sftp.sock = coalesced.sock


# --------------------------------------------------------------------------------------------------
# push: one file at a time per channel, paramiko's pipelined putfo


class PushChannel:
    """One SFTP channel uploading files into remote ``*.part`` names, then renaming them."""

    def __init__(
        self,
        sftp,
        shared: PassState,
        local: LocalRoot,
        remote_root: str,
        folders: set[str],
        folders_lock: threading.Lock,
    ):
        self.sftp = sftp
        self.shared = shared
        self.local = local
        self.remote_root = remote_root
        self.folders = folders
        self.folders_lock = folders_lock

    def run(self) -> None:
        while (action := self.shared.take()) is not None:
            try:
                self._upload(action)
            except (paramiko.SSHException, EOFError) as e:
                self.shared.failed(action.path, f"connection lost: {e}")
                raise
            except (OSError, SyncError) as e:
                if getattr(self.sftp.sock, "closed", False):  # the channel died: a connection error
                    raise
                self.shared.failed(action.path, f"upload failed: {e}", retryable=False)

    def _ensure_folder(self, path: str) -> None:
        """``mkdir -p`` on the remote, remembering what exists (shared by the channels)."""
        with self.folders_lock:
            if path in self.folders or path in ("", ".", "/"):
                return
        try:
            attrs = self.sftp.stat(remote_bytes(path))
        except FileNotFoundError:
            self._ensure_folder(posixpath.dirname(path))
            try:
                self.sftp.mkdir(remote_bytes(path))
            except OSError:
                attrs = self.sftp.stat(remote_bytes(path))  # another channel made it first (or this raises)
            else:
                attrs = None
        if attrs is not None and not stat.S_ISDIR(attrs.st_mode or 0):
            raise OSError(f"{printable(path)} exists on the remote and is not a folder")
        with self.folders_lock:
            self.folders.add(path)

    def _upload(self, action: Action) -> None:
        entry = action.source
        source = self.local.path(action.path)
        final = remote_join(self.remote_root, action.path)
        self._ensure_folder(posixpath.dirname(final))
        part = posixpath.join(posixpath.dirname(final), part_name(posixpath.basename(final), entry.size, entry.mtime))
        progress = self.shared.progress
        sent = [0]

        def callback(done: int, total: int) -> None:
            progress.add(done - sent[0])
            sent[0] = done

        part, final = remote_bytes(part), remote_bytes(final)  # names need not be UTF-8
        fd = os.open(source, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0))
        with os.fdopen(fd, "rb") as fh:
            self.sftp.putfo(fh, part, file_size=entry.size, callback=callback, confirm=True)
            now = os.fstat(fh.fileno())
        if now.st_size != entry.size or int(now.st_mtime) != entry.mtime_s:
            self.sftp.remove(part)
            self.shared.failed(action.path, "local file changed while being sent", retryable=True)
            return
        self.sftp.chmod(part, entry.mode & 0o777)
        self.sftp.utime(part, (entry.mtime_s, entry.mtime_s))
        _remote_replace(self.sftp, part, final)
        self.shared.succeeded(action)


def _remote_replace(sftp, source: bytes, target: bytes) -> None:
    """Atomic rename over an existing file (posix-rename@openssh.com), else remove + rename."""
    try:
        sftp.posix_rename(source, target)
    except OSError:
        try:
            sftp.remove(target)
        except OSError:
            pass
        sftp.rename(source, target)
