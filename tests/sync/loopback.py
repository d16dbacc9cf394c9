"""Test harness: a throw-away OpenSSH server on 127.0.0.1, and TCP proxies that delay, cut or freeze.

Part of the test suite, not of the package: the ``ssh`` tests (``tests/sync``, fixtures in
``conftest.py``) and the benchmark (``bench/sync.py``, which puts the repository root on
``sys.path`` and imports ``tests.sync.loopback``) use it to exercise the real protocol stack
without touching the user's ``~/.ssh``: every key, ``known_hosts`` and ``ssh_config`` lives in a
private folder, the server accepts only a throw-away client key, and every process started here
is stopped by its PID.

``sshd`` must be started by its absolute path (it re-executes itself, sshd(8)), and when it runs
as root Debian's build needs the privilege-separation folder ``/run/sshd``. Run by another user,
the server can only log in that user, and uses PAM for the account check.

Run ``python tests/sync/loopback.py delay LISTEN_PORT TARGET_PORT RTT_MS`` to start a delay line
in its own process (the benchmark does, so that the proxy does not share a GIL with the client
it measures).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Where Debian, Fedora and Arch put the stock SFTP server binary.
_SFTP_SERVER_CANDIDATES = (
    "/usr/lib/openssh/sftp-server",
    "/usr/libexec/openssh/sftp-server",
    "/usr/lib/ssh/sftp-server",
    "/usr/libexec/sftp-server",
)


def find_sshd() -> Path | None:
    """The absolute path of the OpenSSH server binary, or None when it is not installed."""
    for candidate in (shutil.which("sshd"), "/usr/sbin/sshd", "/usr/local/sbin/sshd"):
        if candidate and os.access(candidate, os.X_OK):
            return Path(candidate).resolve()
    return None


def missing_tools() -> list[str]:
    """Tools the loopback server needs that this machine lacks (empty when all are there)."""
    missing = [] if find_sshd() else ["sshd (apt-get install openssh-server)"]
    for tool in ("ssh", "ssh-keygen"):
        if shutil.which(tool) is None:
            missing.append(f"{tool} (apt-get install openssh-client)")
    return missing


def require_ssh_tools() -> None:
    """Skip (developer machine) or fail (CI) when sshd, ssh or paramiko are missing."""
    import pytest  # here: the benchmark imports this module without pytest

    missing = missing_tools()
    try:
        import paramiko  # noqa: F401
    except ImportError:
        missing.append("paramiko (pip install -e '.[sync]')")
    if not missing:
        return
    message = "ssh tests need: " + ", ".join(missing)
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(message + " — CI must run the ssh tests, not skip them (see tests/sync/ensure_sshd.sh)")
    pytest.skip(message)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def keygen(path: Path, comment: str) -> str:
    """Create an unencrypted ed25519 key pair at ``path``; return the public line (type and base64)."""
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
        check=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    path.chmod(0o600)
    return " ".join(path.with_name(path.name + ".pub").read_text().split()[:2])


def wait_for_banner(port: int, timeout: float, process: subprocess.Popen | None = None) -> None:
    """Wait until something on 127.0.0.1:``port`` answers with an SSH banner."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"sshd exited with status {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                if sock.recv(64).startswith(b"SSH-"):
                    return
        except OSError as e:
            last_error = e
        time.sleep(0.05)
    raise RuntimeError(f"no SSH banner on 127.0.0.1:{port} after {timeout:.0f} s ({last_error})")


def _die_with_parent():
    """A ``preexec_fn`` that makes the child get SIGTERM when its parent dies (Linux), or None.

    A test run killed by a timeout then leaves no server behind. ``prctl`` is looked up here, in
    the parent: importing in the forked child of a threaded process could deadlock.
    """
    if sys.platform != "linux":
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _stop(process: subprocess.Popen | None, timeout: float = 5.0) -> None:
    """Stop one process this module started, by its PID: SIGTERM, then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=timeout)


@dataclass
class LoopbackSshd:
    """One private ``sshd`` on 127.0.0.1 that accepts only the given public keys.

    Parameters
    ----------
    workdir : Path
        Private folder for the host key, config, pid file and log.
    authorized_keys : list of str
        Public key lines accepted for the current user.
    allow_tcp_forwarding : bool
        Needed by a jump host (ProxyJump opens ``direct-tcpip`` channels through it).
    set_env : dict
        Environment for sessions (``SetEnv``), e.g. a ``PATH`` that puts a fake tool first.
    certificate_authority : Path or None
        Private key of a CA that signs the host key (the server then presents a host certificate).
    extra_config : tuple of str
        More ``sshd_config`` lines (e.g. ``ForceCommand internal-sftp``).
    """

    workdir: Path
    authorized_keys: list[str]
    allow_tcp_forwarding: bool = False
    set_env: dict[str, str] = field(default_factory=dict)
    certificate_authority: Path | None = None
    log_level: str = "ERROR"
    extra_config: tuple[str, ...] = ()
    port: int = 0
    host_key: str = ""
    process: subprocess.Popen | None = None

    def start(self, timeout: float = 15.0) -> "LoopbackSshd":
        """Write the keys and config, start the server and wait for its banner."""
        sshd = find_sshd()
        if sshd is None:
            raise RuntimeError("sshd is not installed (apt-get install openssh-server)")
        self.workdir.mkdir(parents=True, exist_ok=True)
        if not self.host_key:
            self.host_key = keygen(self.workdir / "ssh_host_ed25519_key", "moespec-loopback-host")
            if self.certificate_authority is not None:
                subprocess.run(
                    [
                        "ssh-keygen",
                        "-q",
                        "-s",
                        str(self.certificate_authority),
                        "-I",
                        "moespec-loopback",
                        "-h",
                        "-n",
                        "127.0.0.1",
                        str(self.workdir / "ssh_host_ed25519_key.pub"),
                    ],
                    check=True,
                    timeout=30,
                    stdin=subprocess.DEVNULL,
                )
        (self.workdir / "authorized_keys").write_text("".join(k + "\n" for k in self.authorized_keys))
        (self.workdir / "authorized_keys").chmod(0o600)
        _ensure_privsep_dir()
        for _ in range(5):  # free_port() races with other processes; retry on a bind failure
            self.port = free_port()
            (self.workdir / "sshd_config").write_text(self._config())
            subprocess.run([str(sshd), "-t", "-f", str(self.workdir / "sshd_config")], check=True, timeout=30)
            log = open(self.workdir / "sshd.log", "ab")
            self.process = subprocess.Popen(
                [str(sshd), "-D", "-e", "-f", str(self.workdir / "sshd_config")],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=_die_with_parent(),
            )
            log.close()
            try:
                wait_for_banner(self.port, timeout, self.process)
                return self
            except RuntimeError:
                _stop(self.process)
        raise RuntimeError(f"sshd did not start; log: {(self.workdir / 'sshd.log').read_text()[-2000:]}")

    def stop(self) -> None:
        """Stop the server (only the process this object started)."""
        _stop(self.process)
        self.process = None

    def log(self) -> str:
        """The server's log so far."""
        path = self.workdir / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def known_hosts_line(self, port: int | None = None, name: str = "127.0.0.1") -> str:
        """A ``known_hosts`` line for this server as reached on ``port`` (default: its own)."""
        port = self.port if port is None else port
        host = name if port == 22 else f"[{name}]:{port}"
        return f"{host} {self.host_key}"

    def _config(self) -> str:
        sftp_server = next((p for p in _SFTP_SERVER_CANDIDATES if os.access(p, os.X_OK)), "internal-sftp")
        lines = [
            f"Port {self.port}",
            "ListenAddress 127.0.0.1",
            f"HostKey {self.workdir / 'ssh_host_ed25519_key'}",
            f"PidFile {self.workdir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.workdir / 'authorized_keys'}",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "PermitRootLogin prohibit-password",
            f"AllowUsers {getpass.getuser()}",
            # as root, PAM would want a full login setup; as another user, sshd cannot read the
            # shadow file and without PAM takes every password-less account for a locked one
            f"UsePAM {'no' if os.geteuid() == 0 else 'yes'}",
            "StrictModes no",  # the private folder lives under /tmp, which sshd would reject
            "X11Forwarding no",
            f"AllowTcpForwarding {'local' if self.allow_tcp_forwarding else 'no'}",
            "AllowAgentForwarding no",
            "PrintMotd no",
            "MaxSessions 64",
            "MaxStartups 64:30:128",
            f"Subsystem sftp {sftp_server}",
            f"LogLevel {self.log_level}",
        ]
        if self.certificate_authority is not None:
            lines.append(f"HostCertificate {self.workdir / 'ssh_host_ed25519_key-cert.pub'}")
        if self.set_env:
            lines.append("SetEnv " + " ".join(f'{k}="{v}"' for k, v in self.set_env.items()))
        lines += self.extra_config
        return "\n".join(lines) + "\n"


def _ensure_privsep_dir() -> None:
    """As root, Debian's sshd refuses to start without /run/sshd (normally made by systemd)."""
    if os.geteuid() == 0 and not os.path.isdir("/run/sshd"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)


@dataclass
class LoopbackSsh:
    """A client identity and ``known_hosts`` plus any number of loopback servers that trust it.

    Everything lives under ``workdir``; ``write_config`` produces an OpenSSH client config that
    both ``ssh -F`` and moespec read, so that nothing under ``~/.ssh`` is ever used.
    """

    workdir: Path
    servers: dict[str, LoopbackSshd] = field(default_factory=dict)
    client_key: Path = field(init=False)
    client_public: str = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.client_key = self.workdir / "client_key"
        self.client_public = keygen(self.client_key, "moespec-loopback-client")
        self.known_hosts.write_text("")

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "known_hosts"

    def add_server(self, name: str, *, trusted: bool = True, **options) -> LoopbackSshd:
        """Start a server called ``name``; add its host key to ``known_hosts`` when ``trusted``."""
        server = LoopbackSshd(self.workdir / name, authorized_keys=[self.client_public], **options).start()
        self.servers[name] = server
        if trusted:
            with open(self.known_hosts, "a") as fh:
                fh.write(server.known_hosts_line() + "\n")
        return server

    def host_block(self, alias: str, port: int, **extra: str) -> str:
        """An ssh_config ``Host`` block for 127.0.0.1:``port`` with private keys and known_hosts."""
        options = {
            "HostName": "127.0.0.1",
            "Port": str(port),
            "User": getpass.getuser(),
            "IdentityFile": str(self.client_key),
            "IdentitiesOnly": "yes",
            "UserKnownHostsFile": str(self.known_hosts),
            "GlobalKnownHostsFile": "/dev/null",
            "StrictHostKeyChecking": "yes",
            "BatchMode": "yes",
            "ConnectTimeout": "10",
            "LogLevel": "ERROR",
        }
        # OpenSSH and paramiko keep the first value they read, so the overrides go first
        ordered = {**extra, **{k: v for k, v in options.items() if k not in extra}}
        return f"Host {alias}\n" + "".join(f"  {k} {v}\n" for k, v in ordered.items())

    def write_config(self, blocks: list[str], path: Path | None = None) -> Path:
        """Write an ssh_config made of ``blocks`` (default: into the private folder); return its path."""
        path = path or self.workdir / "ssh_config"
        path.write_text("\n".join(blocks))
        return path

    def stop(self) -> None:
        """Stop every server started here."""
        for server in self.servers.values():
            server.stop()


# --------------------------------------------------------------------------------------------------
# TCP proxies: 127.0.0.1:listen -> 127.0.0.1:target


class TcpProxy:
    """A threaded TCP relay that can cut or freeze the server-to-client direction.

    Parameters
    ----------
    target_port : int
        Where the real server listens.
    cut_after : int or None
        Close both sides once this many server-to-client bytes went through (first connection only).
    freeze_after : int or None
        Stop forwarding (but keep the sockets open) after this many bytes (first connection only).
    """

    def __init__(self, target_port: int, cut_after: int | None = None, freeze_after: int | None = None):
        self.target_port = target_port
        self.cut_after = cut_after
        self.freeze_after = freeze_after
        self.connections = 0
        self.tripped = threading.Event()
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(16)
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name="tcp-proxy").start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            first = self.connections == 1
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=10)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sockets += [client, upstream]
            limit_cut = self.cut_after if first else None
            limit_freeze = self.freeze_after if first else None
            for src, dst, limits in ((client, upstream, (None, None)), (upstream, client, (limit_cut, limit_freeze))):
                threading.Thread(target=self._pump, args=(src, dst, *limits), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, cut_after: int | None, freeze_after: int | None) -> None:
        sent = 0
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                for limit, action in ((cut_after, "cut"), (freeze_after, "freeze")):
                    if limit is not None and sent + len(data) >= limit:
                        dst.sendall(data[: max(0, limit - sent)])
                        self.tripped.set()
                        if action == "cut":
                            raise ConnectionAbortedError
                        while not self._closed:  # frozen: hold the sockets open, forward nothing
                            time.sleep(0.05)
                        return
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        """Stop accepting and close every relayed connection."""
        self._closed = True
        for sock in [self._listener, *self._sockets]:
            try:
                sock.close()
            except OSError:
                pass


def _delay_line_main(listen_port: int, target_port: int, rtt_ms: float) -> None:
    """Run a delay line in this process (asyncio, so it scales to many connections)."""
    import asyncio

    delay = rtt_ms / 2000.0

    async def pump(reader, writer):
        # reader and writer are decoupled through a queue so that data in flight is not
        # serialised behind the delay: the line adds latency without capping bandwidth
        queue: asyncio.Queue = asyncio.Queue(maxsize=256)
        loop = asyncio.get_running_loop()

        async def read_side():
            while True:
                data = await reader.read(262144)
                await queue.put((loop.time() + delay, data))
                if not data:
                    return

        async def write_side():
            while True:
                due, data = await queue.get()
                if due > loop.time():
                    await asyncio.sleep(due - loop.time())
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()

        try:
            await asyncio.gather(read_side(), write_side())
        except OSError:
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            client_writer.close()
            return
        for writer in (client_writer, up_writer):
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.gather(pump(client_reader, up_writer), pump(up_reader, client_writer))

    async def main():
        server = await asyncio.start_server(handle, "127.0.0.1", listen_port)
        print("ready", flush=True)
        async with server:
            await server.serve_forever()

    asyncio.run(main())


class DelayLine:
    """A delay line in its own process (see ``_delay_line_main``), stopped by its PID."""

    def __init__(self, target_port: int, rtt_ms: float):
        self.port = free_port()
        self.process = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "delay", str(self.port), str(target_port), str(rtt_ms)],
            stdout=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            preexec_fn=_die_with_parent(),
        )
        assert self.process.stdout is not None
        if self.process.stdout.readline().strip() != b"ready":
            _stop(self.process)
            raise RuntimeError("the delay line did not start")

    def close(self) -> None:
        _stop(self.process)
        self.process.stdout.close()


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "delay":
        _delay_line_main(int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
    else:
        sys.exit("usage: python tests/sync/loopback.py delay LISTEN_PORT TARGET_PORT RTT_MS")
