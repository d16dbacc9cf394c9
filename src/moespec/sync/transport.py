"""The transport interface: one authenticated connection that runs commands and opens SFTP channels.

Two implementations sit behind it:

- ``transport_paramiko.ParamikoTransport`` speaks SSH in-process: ssh_config (with Include),
  ProxyJump chains, ProxyCommand, the agent and key files, strict known_hosts checking;
- ``transport_openssh.OpenSSHTransport`` runs each SFTP session over the system ``ssh -s sftp``
  through one ControlMaster, so that everything ``ssh`` supports (one 2FA prompt, Include, host
  certificates, GSSAPI, ...) works unchanged, and paramiko only speaks SFTP.

Both hand out ``paramiko.SFTPClient`` objects, one per channel (an ``SFTPClient`` is not
thread-safe, paramiko#718), so the transfer engine is the same for both.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

TransportKind = Literal["paramiko", "openssh"]


@dataclass(frozen=True)
class CommandResult:
    """Exit status and output of a remote command."""

    status: int
    stdout: bytes
    stderr: bytes

    @property
    def error_text(self) -> str:
        return self.stderr.decode("utf-8", "replace").strip()


@dataclass(frozen=True)
class ConnectOptions:
    """How to reach a host.

    Attributes
    ----------
    host : str
        Alias resolved through ``ssh_config``.
    ssh_config : Path or None
        OpenSSH client config (default ``~/.ssh/config``).
    known_hosts : tuple of Path or None
        Replace the config's UserKnownHostsFile.
    interactive : bool
        Whether passphrase and keyboard-interactive (2FA) prompts may be shown.
    """

    host: str
    ssh_config: Path | None = None
    known_hosts: tuple[Path, ...] | None = None
    connect_timeout: float = 20.0
    interactive: bool = False


class Transport(ABC):
    """One connection to a remote host."""

    #: ``user@host:port`` or similar, for messages.
    description: str = ""

    def ready(self) -> None:  # noqa: B027 - a default no-op that transports may override
        """Wait until the connection is up (a no-op for a transport whose ``connect`` already waited)."""

    @abstractmethod
    def run(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> CommandResult:
        """Run ``command`` through the remote user's shell and collect its output.

        ``timeout`` bounds the silence between two pieces of output (the openssh transport,
        which cannot see inside ``ssh``, bounds the whole command by ten times it).
        """

    @abstractmethod
    def open_sftp(self):
        """A new ``paramiko.SFTPClient`` on its own channel (one per thread)."""

    def start_sftp(self) -> "PendingSftp":
        """Begin opening an SFTP channel (the slow, remote part); ``finish()`` the result to use it.

        By default the channel is opened completely here.
        """
        return PendingSftp(self.open_sftp())

    def start_stream(self, command: str):
        """Run ``command`` on a session of its own and return the session's byte stream (``recv``,
        ``settimeout``, ``close``), for output that an SFTP server follows on the same session
        (``listing.list_then_serve_command``); None where the transport cannot.
        """
        return None

    def sftp_over(self, stream) -> "PendingSftp":
        """An SFTP client over a ``start_stream`` whose SFTP server is now running."""
        raise NotImplementedError

    @abstractmethod
    def abort(self) -> None:
        """Tear the connection down now, from any thread: blocked reads fail at once."""

    @abstractmethod
    def close(self) -> None:
        """Close the connection and everything opened through it."""

    def __enter__(self) -> "Transport":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PendingSftp:
    """An SFTP channel being opened: ``finish()`` returns the client (once), ``close()`` drops it."""

    def __init__(self, sftp):
        self._sftp = sftp

    def finish(self):
        return self._sftp

    def close(self) -> None:
        self._sftp.close()


def start_early(kind: TransportKind, options: ConnectOptions, first_command: str | None = None) -> Transport:
    """Begin connecting in the background, so that the caller's imports overlap the login.

    ``openssh``: the master is another process, which also starts ``first_command`` (see
    ``OpenSSHTransport.start``); ``paramiko``: a thread, whose handshake mostly waits on the
    server. Call ``ready()`` on the result before using it (it raises what connecting raised).
    """
    if kind == "openssh":
        from moespec.sync.transport_openssh import OpenSSHTransport

        return OpenSSHTransport.start(options, first_command)
    return _Connecting(lambda: connect(kind, options))


class _Connecting(Transport):
    """A transport being opened by ``connect`` in a background thread; usable after ``ready()``."""

    def __init__(self, open_transport):
        self._transport: Transport | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._open, args=(open_transport,), daemon=True, name="sync-connect")
        self._thread.start()

    def _open(self, open_transport) -> None:
        try:
            self._transport = open_transport()
        except BaseException as e:  # raised again by ready(), in the caller's thread
            self._error = e

    def ready(self) -> None:
        self._thread.join()
        if self._error is not None:
            raise self._error
        self._transport.ready()
        self.description = self._transport.description

    def run(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> CommandResult:
        return self._transport.run(command, stdin, timeout)

    def open_sftp(self):
        return self._transport.open_sftp()

    def start_sftp(self) -> "PendingSftp":
        return self._transport.start_sftp()

    def start_stream(self, command: str):
        return self._transport.start_stream(command)

    def sftp_over(self, stream) -> "PendingSftp":
        return self._transport.sftp_over(stream)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()

    def close(self) -> None:
        self._thread.join()  # at most the connect timeout; a connection must not be left behind
        if self._transport is not None:
            self._transport.close()


def connect(kind: TransportKind, options: ConnectOptions) -> Transport:
    """Open a transport of the given kind.

    Raises
    ------
    SyncError
        The host cannot be reached, its key is unknown or changed, or authentication failed.
    """
    if kind == "openssh":
        from moespec.sync.transport_openssh import OpenSSHTransport

        return OpenSSHTransport.connect(options)
    from moespec.sync.transport_paramiko import ParamikoTransport

    return ParamikoTransport.connect(options)
