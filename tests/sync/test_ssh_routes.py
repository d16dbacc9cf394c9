"""Reaching the host the way ssh_config says: ProxyJump chains, ProxyCommand, Include, the agent, the CLI."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from moespec.cli import main as moespec_main
from moespec.errors import SyncError
from moespec.sync.session import run_sync
from tests.sync.loopback import free_port, keygen
from tests.builders import make_tree, pull_request as pull, snapshot

pytestmark = pytest.mark.ssh


@pytest.mark.parametrize(
    "host,transport",
    [
        ("hpc-via-jump", "paramiko"),
        ("hpc-via-2-jumps", "paramiko"),
        ("hpc-via-proxycommand", "paramiko"),
        ("hpc-via-2-jumps", "openssh"),
    ],
)
def test_pull_through_jump_hosts(ssh_lab, tmp_path, host, transport):
    remote = make_tree(tmp_path / "remote", {"demo/a.json": b"{}", "demo/b.h5": 70_000})
    report = run_sync(pull(host, remote, tmp_path / "local", ssh_lab.config(tmp_path), transport=transport))
    assert report.ok and snapshot(tmp_path / "local") == snapshot(remote)


def test_proxyjump_is_really_used(ssh_lab, tmp_path):
    """With the jump host down the connection fails, although the target itself is up."""
    config = ssh_lab.config(
        tmp_path,
        ssh_lab.env.host_block("deadjump", free_port()),
        ssh_lab.block("hpc-via-dead-jump", ProxyJump="deadjump"),
    )
    with pytest.raises(SyncError, match="deadjump"):
        run_sync(pull("hpc-via-dead-jump", tmp_path, tmp_path / "local", config))


def test_include_in_ssh_config_is_followed(ssh_lab, tmp_path):
    (tmp_path / "conf.d").mkdir()
    ssh_lab.env.write_config([ssh_lab.block("included-hpc")], tmp_path / "conf.d" / "cluster.conf")
    config = tmp_path / "main_config"
    config.write_text(f"Include {tmp_path}/conf.d/*.conf\n")
    remote = make_tree(tmp_path / "remote", {"demo/a.json": b"{}"})
    assert run_sync(pull("included-hpc", remote, tmp_path / "local", config)).ok


def test_agent_keys_are_used(ssh_lab, tmp_path, monkeypatch):
    """No usable IdentityFile: authentication succeeds through an ssh-agent holding the key."""
    socket_path = tmp_path / "agent.sock"
    agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(socket_path)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not socket_path.exists():
            if agent.poll() is not None or time.monotonic() > deadline:
                pytest.fail("ssh-agent did not start")
            time.sleep(0.05)
        env = {**os.environ, "SSH_AUTH_SOCK": str(socket_path)}
        subprocess.run(["ssh-add", "-q", str(ssh_lab.env.client_key)], env=env, check=True, timeout=30)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(socket_path))
        config = ssh_lab.config(
            tmp_path, ssh_lab.block("by-agent", IdentityFile=str(tmp_path / "no-such-key"), IdentitiesOnly="no")
        )
        remote = make_tree(tmp_path / "remote", {"demo/a.json": b"{}"})
        assert run_sync(pull("by-agent", remote, tmp_path / "local", config)).ok
    finally:
        agent.terminate()
        agent.wait(10)


def test_cli_dry_run_then_pull(ssh_lab, tmp_path, capsys, monkeypatch):
    remote = make_tree(
        tmp_path / "remote", {"demo/a.json": b"{}", "demo/embed/x/embed.h5": 1000, "other/b.json": b"[]"}
    )
    monkeypatch.chdir(tmp_path)  # the local root defaults to results/ under the current folder
    common = [
        "sync",
        "--from-hpc",
        "demo",
        "--host",
        "hpc",
        "--remote-root",
        str(remote),
        "--ssh-config",
        str(ssh_lab.config(tmp_path)),
        "--batch",
        "--exclude",
        "*.h5",
    ]
    assert moespec_main([*common, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "would copy    demo/a.json" in out and "embed.h5" not in out
    assert not (tmp_path / "results").exists()
    assert moespec_main(common) == 0
    assert "pulled 1 file" in capsys.readouterr().out
    assert sorted(snapshot(tmp_path / "results")) == ["demo/a.json"]


def test_host_certificates_need_the_openssh_transport(new_lab, tmp_path):
    """A centre that signs host keys publishes one @cert-authority line; paramiko cannot check it."""
    from moespec.sync.hostkeys import HostKeyError

    ca_public = keygen(tmp_path / "host_ca", "moespec-test-ca")
    server = new_lab.add_server("signed", trusted=False, certificate_authority=tmp_path / "host_ca")
    new_lab.known_hosts.write_text(f"@cert-authority * {ca_public}\n")
    config = new_lab.write_config([new_lab.host_block("signed", server.port)], tmp_path / "ssh_config")
    remote = make_tree(tmp_path / "remote", {"demo/a.json": b"{}"})
    with pytest.raises(HostKeyError, match="transport: openssh"):
        run_sync(pull("signed", remote, tmp_path / "paramiko", config))
    assert run_sync(pull("signed", remote, tmp_path / "openssh", config, transport="openssh")).ok


def test_openssh_transport_multiplexes_over_its_own_master(ssh_lab, tmp_path):
    """One login (one 2FA prompt) for the whole run, on moespec's own master, whatever the config says."""
    from moespec.sync.transport import ConnectOptions, connect

    users_socket = tmp_path / "cm"
    config = ssh_lab.config(tmp_path, ssh_lab.block("muxed", ControlMaster="auto", ControlPath=str(users_socket)))
    transport = connect("openssh", ConnectOptions("muxed", config))
    try:
        assert transport._master is not None and transport._master.poll() is None
        assert transport.run("echo via-master").stdout == b"via-master\n"
        assert not users_socket.exists()  # the config's ControlPath was not used
    finally:
        transport.close()
