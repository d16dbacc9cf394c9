"""The OpenSSH transport: SFTP sessions over the system ``ssh``, all through one ControlMaster.

``ssh`` owns the connection: its config (Include, Match, ProxyJump, certificates, GSSAPI), the
agent, host-key checking and the crypto (in C, in another process). paramiko only speaks SFTP
over the pipes of ``ssh -s HOST sftp`` (``SFTPClient`` accepts any object with
``send``/``recv``), the escape hatch rclone also added (rclone#7012). Measured on loopback, this
was the fastest paramiko variant (docs/sync.md, "Measurements").

One master connection is opened first (one password or 2FA prompt, read by ``ssh`` from the
terminal); every channel and command then multiplexes over it. The master is always moespec's
own, on a socket in a private folder: a master that the user (or anything else) opened may have
been started with host-key checking off (``-o StrictHostKeyChecking=no``), and a client that
multiplexes over it never sees the host key (ssh_config(5), ControlMaster). Host keys are checked
with ``StrictHostKeyChecking=yes``: nothing is ever added automatically.
"""

from __future__ import annotations

import os
import select
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from typing import TYPE_CHECKING

from moespec.errors import SyncError
from moespec.sync.hostkeys import HostKeyError
from moespec.sync.transport import CommandResult, ConnectOptions, PendingSftp, Transport

if TYPE_CHECKING:
    import paramiko


class PipeSocket:
    """The socket-like object ``paramiko.SFTPClient`` needs, over an ``ssh -s HOST sftp`` process."""

    def __init__(self, argv: list[str]):
        self._stderr = tempfile.TemporaryFile()
        self.process = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, bufsize=0
        )
        self._read_fd = self.process.stdout.fileno()
        self._write_fd = self.process.stdin.fileno()
        self._buffer = b""
        self._offset = 0
        self.established = False  # set once the SFTP version exchange went through
        self._timeout: float | None = None
        self.is_master = False
        _widen_pipe(self._read_fd)

    def send(self, data) -> int:
        try:
            return os.write(self._write_fd, data)
        except BrokenPipeError:
            raise EOFError("ssh exited") from None

    def recv(self, n: int) -> bytes:
        if self._offset >= len(self._buffer):
            if self._timeout is not None and not select.select([self._read_fd], [], [], self._timeout)[0]:
                raise TimeoutError(f"no output from ssh for {self._timeout:.0f} s")
            # nothing buffered: read straight into the answer (b"" at EOF, paramiko raises EOFError);
            # paramiko asks for whole SFTP packets, so most reads need no copy at all
            chunk = os.read(self._read_fd, max(n, 1 << 16))
            if len(chunk) <= n:
                return chunk
            self._buffer, self._offset = chunk, 0
        out = self._buffer[self._offset : self._offset + n]
        self._offset += len(out)
        return out

    def recv_ready(self) -> bool:
        return self._offset < len(self._buffer) or bool(select.select([self._read_fd], [], [], 0)[0])

    def settimeout(self, timeout) -> None:
        self._timeout = timeout

    def gettimeout(self):
        return self._timeout

    def setblocking(self, flag) -> None:
        pass

    def get_name(self) -> str:
        return "ssh-subsystem-sftp"

    @property
    def closed(self) -> bool:
        return self.process.poll() is not None

    def stderr_text(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode("utf-8", "replace").strip()

    def close(self) -> None:
        """Send EOF (ssh then ends the session); kill ssh if it lingers; then release the pipes.

        The master's own session (``OpenSSHTransport`` with a first command) is only closed with
        the transport (``end``): closing it would end the master.

        stdout is closed only once ssh is gone: closing a descriptor that another thread is
        blocked reading would not wake it, and the number could be reused under it.
        """
        if self.is_master:
            return
        self.end()

    def end(self) -> None:
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            # a session still starting (remote login shell) would only end after it started
            self.process.wait(timeout=2 if self.established else 0)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self._stderr.close()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()


def _widen_pipe(fd: int) -> None:
    """Ask Linux for a 1 MiB pipe (default 64 KiB): fewer, larger reads of 255 KiB SFTP replies."""
    try:
        import fcntl
    except ImportError:  # Windows
        return
    setsize = getattr(fcntl, "F_SETPIPE_SZ", None)
    if setsize is not None:
        try:
            fcntl.fcntl(fd, setsize, 1 << 20)
        except OSError:
            pass  # above /proc/sys/fs/pipe-max-size: keep the default


def _master_error(host: str, status: int, stderr: str) -> SyncError:
    signs = ("IDENTIFICATION HAS CHANGED", "Host key verification failed", "host key is known")
    if any(sign in stderr for sign in signs):
        kind = "CHANGED" if "CHANGED" in stderr else "not known"
        return HostKeyError(
            f"the host key of {host} is {kind} (ssh: {stderr.splitlines()[-1] if stderr else ''}).\n"
            f"Connect once with `ssh {host}`, check the fingerprint it shows against the one your centre "
            f"publishes, and accept it (or, if it changed, ask your centre before removing the old key with "
            f"ssh-keygen -R). moespec never adds host keys by itself.\nssh said:\n{stderr}"
        )
    return SyncError(f"ssh to {host} failed (status {status}): {stderr or 'no message'}")


def _import_paramiko() -> None:
    """Import paramiko (the SFTP client, 50-70 ms of CPU) in the background, not when the first file moves."""
    try:
        import paramiko  # noqa: F401
    except ImportError:  # reported where an SFTP client is made
        pass


class OpenSSHTransport(Transport):
    """Commands and SFTP channels over ``ssh`` processes sharing one ControlMaster."""

    def __init__(self, options: ConnectOptions, base: list[str]):
        self.options = options
        self.host = options.host
        self._base = base
        self._mux: list[str] = []
        self._master: subprocess.Popen | None = None
        self._private_dir: str | None = None
        self._pipes: list[PipeSocket] = []
        self._closed = False
        self._ready = False
        self._socket = ""
        self._lock = threading.Lock()
        self._first: tuple[str, PipeSocket] | None = None  # the master's own session, not yet handed out
        self._ran_command = False  # whether the master runs a first command (and ends with it)
        self._relaunch_lock = threading.Lock()
        self._master_log = None
        self.description = f"{options.host} (system ssh)"

    @classmethod
    def connect(cls, options: ConnectOptions) -> "OpenSSHTransport":
        """Start the master and wait until it is up (``start`` then ``ready``)."""
        transport = cls.start(options)
        transport.ready()
        return transport

    @classmethod
    def start(cls, options: ConnectOptions, first_command: str | None = None) -> "OpenSSHTransport":
        """Launch the master connection and return at once; ``ready`` waits for it.

        The command calls this before it imports the rest of the tool, so that ``ssh``
        connects (another process) while Python imports. With ``first_command`` the master runs
        it on its own session, as ``rsync -e ssh`` runs its server: ``start_stream`` of the same
        command returns that session, which needs no multiplexing client and starts right after
        the login.
        """
        if options.host.startswith("-") or any(c.isspace() for c in options.host):
            raise SyncError(f"'{options.host}' is not a host alias")  # ssh would read it as an option
        if shutil.which("ssh") is None:
            raise SyncError("transport: openssh needs the `ssh` client (apt-get install openssh-client)")
        base = ["ssh"]
        if options.ssh_config is not None:
            base += ["-F", str(options.ssh_config)]
        if options.known_hosts is not None:
            base += ["-o", "UserKnownHostsFile=" + " ".join(shlex.quote(str(p)) for p in options.known_hosts)]
        base += [
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            f"ConnectTimeout={int(options.connect_timeout)}",
            "-o",
            "ClearAllForwardings=yes",
            "-x",
            "-a",
        ]
        if not options.interactive:
            base += ["-o", "BatchMode=yes"]
        transport = cls(options, base)
        try:
            transport._launch_master(first_command)
        except BaseException:
            transport.close()
            raise
        return transport

    def _launch_master(self, first_command: str | None = None) -> None:
        """Start moespec's own master on a private socket (never one from the user's config).

        The master waits for the multiplexed sessions before it exits, also when its own
        session (``first_command``) ends.
        """
        if self._private_dir is None:
            self._private_dir = tempfile.mkdtemp(prefix="moespec-ssh-")
        self._socket = os.path.join(self._private_dir, "cm")  # short: unix socket paths max out near 104 bytes
        # command-line options win over the config's ControlPath / ControlMaster (ssh(1))
        self._mux = ["-o", f"ControlPath={self._socket}", "-o", "ControlMaster=no"]
        master = [
            *self._base,
            "-M",
            "-o",
            f"ControlPath={self._socket}",
            "-o",
            "ControlMaster=yes",
            "-o",
            "ControlPersist=no",
            "-o",
            "ServerAliveInterval=15",
        ]
        self._ran_command = first_command is not None
        if first_command is None:
            self._master_log = tempfile.TemporaryFile()
            self._master = subprocess.Popen(
                [*master, "-N", "-n", self.host],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self._master_log,
            )
            return
        session = PipeSocket([*master, "-T", self.host, first_command])
        session.is_master = True
        self._master, self._master_log = session.process, session._stderr
        self._first = (first_command, session)
        self._pipes.append(session)

    def _master_stderr(self) -> str:
        self._master_log.seek(0)
        return self._master_log.read().decode(errors="replace").strip()

    def ready(self) -> None:
        """Wait until the master is up; raise ``HostKeyError`` / ``SyncError`` (and close) if it is not."""
        if self._ready:
            return
        try:
            self._wait_for_master()
        except BaseException:
            self.close()
            raise
        self._ready = True

    def _wait_for_master(self) -> None:
        wait = self.options.connect_timeout + (120 if self.options.interactive else 0)  # room for a 2FA prompt
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self._master.poll() is not None:
                if self._ran_command and self._master.returncode not in (255,) and self._master.returncode >= 0:
                    # logged in, but the first command ended at once (no shell, a forced command):
                    # a master of its own, and the first session is not handed out
                    with self._lock:
                        self._first = None
                    self._launch_master(None)
                    continue
                raise _master_error(self.host, self._master.returncode, self._master_stderr())
            if os.path.exists(self._socket):  # ssh binds the socket under a temporary name, then renames it
                return
            time.sleep(0.01)
        raise SyncError(f"ssh to {self.host}: no connection after {wait:.0f} s")

    def _mux_ready(self) -> None:
        """Make sure a master serves the multiplexed sessions. One that ran a first command ends
        with that session if no other was open (a forced command, no shell): it is started again,
        without a command; any other end of the master is an error."""
        with self._relaunch_lock:
            master = self._master
            if master is None or not self._ready or master.poll() is None:
                return
            if self._closed:
                raise SyncError(f"the connection to {self.host} is closed")
            if not self._ran_command or master.returncode in (255,) or master.returncode < 0:
                raise _master_error(self.host, master.returncode, self._master_stderr())
            self._launch_master(None)
            self._wait_for_master()

    def run(self, command: str, stdin: bytes = b"", timeout: float | None = None) -> CommandResult:
        self._mux_ready()
        total = None if timeout is None else 10 * timeout
        try:
            result = subprocess.run(
                [*self._base, *self._mux, "-T", self.host, command], input=stdin, capture_output=True, timeout=total
            )
        except subprocess.TimeoutExpired as e:
            raise SyncError(f"remote command on {self.host} timed out after {total:.0f} s") from e
        if result.returncode == 255:
            raise _master_error(self.host, 255, result.stderr.decode(errors="replace").strip())
        return CommandResult(result.returncode, result.stdout, result.stderr)

    def start_stream(self, command: str) -> PipeSocket:
        with self._lock:
            first, self._first = self._first, None
        if first is not None and first[0] == command:
            stream = first[1]
        else:
            self._mux_ready()
            stream = self._register(PipeSocket([*self._base, *self._mux, "-T", self.host, command]))
        if "paramiko" not in sys.modules:  # while the remote login shell starts: this machine waits anyway
            threading.Thread(target=_import_paramiko, daemon=True, name="sync-import").start()
        return stream

    def sftp_over(self, stream: PipeSocket) -> PendingSftp:
        stream.settimeout(None)  # the engine's stall watchdog takes over
        return _PendingPipe(self, stream)  # the SFTP version exchange only when a file is copied

    def open_sftp(self) -> "paramiko.SFTPClient":
        return self._handshake(self._spawn_sftp())

    def start_sftp(self) -> PendingSftp:
        """Start the ``ssh -s sftp`` session (the remote shell runs now); the SFTP client is made by
        ``finish()``, so that a run with nothing to copy makes none."""
        return _PendingPipe(self, self._spawn_sftp())

    def _spawn_sftp(self) -> PipeSocket:
        self._mux_ready()
        return self._register(PipeSocket([*self._base, *self._mux, "-T", "-s", self.host, "sftp"]))

    def _register(self, pipe: PipeSocket) -> PipeSocket:
        """Keep ``pipe`` for ``close``/``abort``; refuse it when the transport was closed meanwhile."""
        with self._lock:
            self._pipes.append(pipe)
            closed = self._closed
        if closed:  # closed meanwhile (a background channel that is no longer wanted)
            pipe.close()
            raise SyncError(f"the connection to {self.host} is closed")
        return pipe

    def _handshake(self, pipe: PipeSocket) -> "paramiko.SFTPClient":
        import paramiko  # here: listing and planning need no SFTP client

        try:
            sftp = paramiko.SFTPClient(pipe)
            pipe.established = True
            return sftp
        except (EOFError, paramiko.SSHException, OSError) as e:
            pipe.kill()
            raise SyncError(f"cannot start an SFTP session on {self.host}: {pipe.stderr_text() or e}") from e

    def abort(self) -> None:
        with self._lock:
            for pipe in self._pipes:
                pipe.kill()
        if self._master is not None and self._master.poll() is None:
            self._master.kill()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pipes, self._pipes = self._pipes, []
        for pipe in sorted(pipes, key=lambda pipe: pipe.is_master):  # the master's own session last
            pipe.end()
        if self._master is not None:
            if self._master.poll() is None:
                self._master.terminate()
                try:
                    self._master.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self._master.kill()
                    self._master.wait()
            self._master_log.close()
            self._master = None
        if self._private_dir is not None:
            shutil.rmtree(self._private_dir, ignore_errors=True)
            self._private_dir = None


class _PendingPipe(PendingSftp):
    """An ``ssh -s sftp`` session already started, waiting for its SFTP version exchange."""

    def __init__(self, transport: OpenSSHTransport, pipe: PipeSocket):
        super().__init__(None)
        self._transport = transport
        self._pipe = pipe

    def finish(self):
        return self._transport._handshake(self._pipe)

    def close(self) -> None:
        self._pipe.close()
