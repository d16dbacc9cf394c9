"""Fixtures of the sync tests: throw-away OpenSSH servers on 127.0.0.1 for the ``ssh`` tests.

``ssh_lab`` (session-wide) starts two servers that accept only a fresh client key:

- ``main``: the "cluster" (no TCP forwarding);
- ``jump``: a bastion that allows ``direct-tcpip``, for the ProxyJump and ProxyCommand tests.

``new_lab`` gives a test its own client identity and servers (a hostile server, a signed host
key...), stopped when the test ends. The harness itself is ``tests/sync/loopback.py``.

Nothing under ``~/.ssh`` is read or written: every test gets an ssh_config that names the
private key and a private known_hosts, and ``SSH_AUTH_SOCK`` is removed for the test.

Without ``sshd`` (``apt-get install openssh-server``) the tests skip, except when the ``CI``
environment variable is set: CI must run them, so there they fail.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.sync.loopback import LoopbackSsh, LoopbackSshd, require_ssh_tools


@dataclass
class SshLab:
    """The running servers plus helpers to write ssh configs that point at them."""

    env: LoopbackSsh
    main: LoopbackSshd
    jump: LoopbackSshd

    @property
    def known_hosts(self) -> Path:
        return self.env.known_hosts

    def block(self, alias: str, port: int | None = None, **extra: str) -> str:
        """A Host block for ``alias`` -> the main server (or ``port``), private keys and known_hosts."""
        return self.env.host_block(alias, self.main.port if port is None else port, **extra)

    def config(self, directory: Path, *extra_blocks: str) -> Path:
        """An ssh_config in ``directory`` with the standard aliases plus ``extra_blocks``.

        Standard aliases: ``hpc`` (main), ``jump``, ``hpc-via-jump`` (ProxyJump jump),
        ``hpc-via-2-jumps`` (ProxyJump jump,jump) and ``hpc-via-proxycommand``.
        """
        path = directory / "ssh_config"
        blocks = [
            *extra_blocks,
            self.block("hpc-via-jump", ProxyJump="jump"),
            self.block("hpc-via-2-jumps", ProxyJump="jump,jump"),
            self.block("hpc-via-proxycommand", ProxyCommand=f"ssh -F {path} -W %h:%p jump"),
            self.env.host_block("jump", self.jump.port),
            self.block("hpc"),
        ]
        return self.env.write_config(blocks, path)


@pytest.fixture(scope="session")
def ssh_lab(tmp_path_factory) -> SshLab:
    """Two loopback sshd servers for the whole session; stopped (by PID) at the end."""
    require_ssh_tools()
    env = LoopbackSsh(tmp_path_factory.mktemp("ssh-lab"))
    try:
        main = env.add_server("main")
        jump = env.add_server("jump", allow_tcp_forwarding=True)
        yield SshLab(env, main, jump)
    finally:
        env.stop()


@pytest.fixture
def new_lab(tmp_path):
    """A private ``LoopbackSsh`` for one test (its own client key and servers), stopped afterwards."""
    require_ssh_tools()
    lab = LoopbackSsh(tmp_path / "lab")
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(autouse=True)
def _no_user_agent(monkeypatch):
    """Never use the developer's ssh-agent (or their keys through it)."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
