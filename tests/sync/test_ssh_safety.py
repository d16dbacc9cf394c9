"""Safety against a real sshd: host keys, a cut or frozen connection, hostile names and links."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from moespec.errors import SyncError
from moespec.sync.engine import EngineSettings
from moespec.sync.hostkeys import HostKeyError
from moespec.sync.session import run_sync
from tests.sync.loopback import TcpProxy, free_port, keygen
from tests.builders import make_tree, parts, pull_request as pull, snapshot

pytestmark = pytest.mark.ssh


# --------------------------------------------------------------------------------------------------
# host keys


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_unknown_host_key_is_refused_with_instructions(ssh_lab, tmp_path, transport):
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    config = ssh_lab.config(tmp_path, ssh_lab.block("stranger", UserKnownHostsFile=str(empty)))
    remote = make_tree(tmp_path / "remote", {"demo/a.json": b"{}"})
    with pytest.raises(HostKeyError) as info:
        run_sync(pull("stranger", remote, tmp_path / "local", config, transport=transport))
    message = str(info.value)
    assert "not known" in message and "never adds host keys" in message
    if transport == "paramiko":
        assert "SHA256:" in message and "ssh-keyscan -p" in message
    assert empty.read_text() == ""  # nothing was added
    assert not (tmp_path / "local").exists()


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_changed_host_key_is_refused(ssh_lab, tmp_path, transport):
    impostor = keygen(tmp_path / "other_host_key", "impostor")
    wrong = tmp_path / "known_hosts_wrong"
    wrong.write_text(f"[127.0.0.1]:{ssh_lab.main.port} {impostor}\n")
    config = ssh_lab.config(tmp_path, ssh_lab.block("changed", UserKnownHostsFile=str(wrong)))
    remote = make_tree(tmp_path / "remote", {"demo/a.json": b"{}"})
    with pytest.raises(HostKeyError) as info:
        run_sync(pull("changed", remote, tmp_path / "local", config, transport=transport))
    assert "MISMATCH" in str(info.value) or "CHANGED" in str(info.value)
    assert not (tmp_path / "local").exists()


# --------------------------------------------------------------------------------------------------
# interrupted transfers


def _proxied_config(ssh_lab, tmp_path, proxy: TcpProxy) -> Path:
    # HostKeyAlias: the proxy's port is not in known_hosts, the server behind it is
    return ssh_lab.config(
        tmp_path, ssh_lab.block("hpc-flaky", proxy.port, HostKeyAlias=f"[127.0.0.1]:{ssh_lab.main.port}")
    )


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_cut_connection_leaves_a_part_that_the_next_run_resumes(ssh_lab, tmp_path, transport):
    size = 6 << 20
    remote = make_tree(tmp_path / "remote", {"demo/big.h5": size})
    local = tmp_path / "local"
    proxy = TcpProxy(ssh_lab.main.port, cut_after=2 << 20)
    try:
        report = run_sync(
            pull("hpc-flaky", remote, local, _proxied_config(ssh_lab, tmp_path, proxy), transport=transport)
        )
    finally:
        proxy.close()
    assert proxy.tripped.is_set() and not report.ok
    assert report.failed[0].retryable
    assert not (local / "demo/big.h5").exists()  # never a partial file under the final name
    [part] = parts(local)
    kept = part.stat().st_size
    assert 0 < kept < size
    resumed = run_sync(pull("hpc", remote, local, ssh_lab.config(tmp_path), transport=transport))
    assert resumed.ok and resumed.files == 1
    assert resumed.bytes == size - kept  # only the missing tail moved (the 64 KiB overlap is compared, not counted)
    assert snapshot(local) == snapshot(remote) and not parts(local)


def test_cut_connection_is_retried_within_the_run(ssh_lab, tmp_path):
    remote = make_tree(tmp_path / "remote", {"demo/big.h5": 3 << 20, "demo/a.json": b"{}"})
    local = tmp_path / "local"
    proxy = TcpProxy(ssh_lab.main.port, cut_after=1 << 20)  # only the first connection is cut
    try:
        report = run_sync(pull("hpc-flaky", remote, local, _proxied_config(ssh_lab, tmp_path, proxy), retries=2))
    finally:
        proxy.close()
    assert proxy.tripped.is_set() and report.ok and report.attempts == 2
    assert snapshot(local) == snapshot(remote) and not parts(local)


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_frozen_connection_is_torn_down_by_the_watchdog(ssh_lab, tmp_path, transport):
    remote = make_tree(tmp_path / "remote", {"demo/big.h5": 4 << 20})
    local = tmp_path / "local"
    proxy = TcpProxy(ssh_lab.main.port, freeze_after=1 << 20)
    started = time.monotonic()
    try:
        report = run_sync(
            pull(
                "hpc-flaky",
                remote,
                local,
                _proxied_config(ssh_lab, tmp_path, proxy),
                engine=EngineSettings(stall_timeout=2),
                transport=transport,
            )
        )
    finally:
        proxy.close()
    assert proxy.tripped.is_set() and not report.ok
    assert "no progress" in report.failed[0].reason
    assert time.monotonic() - started < 30
    assert not (local / "demo/big.h5").exists()


# --------------------------------------------------------------------------------------------------
# hostile names


def test_links_that_leave_the_root_are_refused(ssh_lab, tmp_path):
    remote = make_tree(tmp_path / "remote", {"demo/sub/a.json": b"{}"})
    os.symlink("/etc", remote / "demo/etc")
    os.symlink("../../..", remote / "demo/up")
    os.symlink("sub/a.json", remote / "demo/ok")
    local = tmp_path / "local"
    report = run_sync(pull("hpc", remote, local, ssh_lab.config(tmp_path)))
    assert sorted(r.path for r in report.plan.refused) == ["demo/etc", "demo/up"]
    assert os.readlink(local / "demo/ok") == "sub/a.json" and report.links == 1
    assert not os.path.lexists(local / "demo/etc") and not os.path.lexists(local / "demo/up")


FAKE_FIND = r"""#!/bin/sh
# A compromised or buggy server: the real listing, plus names that try to leave the root.
/usr/bin/find "$@"
start="$2"
for name in '../escape.txt' '../../escape.txt' 'a/../../escape.txt' '/etc/passwd' 'a//b'; do
  printf '%s\0f\0%s\0%s\0%s\0%s\0\0' "$start" 5 1600000000.0 644 "$name"
done
printf '/elsewhere\0f\0%s\0%s\0%s\0%s\0\0' 5 1600000000.0 644 'x.txt'
"""


def test_hostile_remote_names_are_refused(new_lab, tmp_path):
    fake_bin = tmp_path / "fakebin"
    fake_bin.mkdir()
    (fake_bin / "find").write_text(FAKE_FIND)
    (fake_bin / "find").chmod(0o755)
    server = new_lab.add_server("hostile", set_env={"PATH": f"{fake_bin}:/usr/bin:/bin"})
    config = new_lab.write_config([new_lab.host_block("hostile", server.port)], tmp_path / "ssh_config")
    base = tmp_path / "srv"
    remote = make_tree(base / "results", {"demo/a.json": b"{}"})
    (base / "escape.txt").write_text("outside the remote root: must never be fetched")
    local = tmp_path / "client" / "results"
    report = run_sync(pull("hostile", remote, local, config, scopes=("demo",)))
    refused = {r.path for r in report.plan.refused}
    assert len(refused) == 6, refused
    assert sorted(snapshot(local)) == ["demo/a.json"]
    assert sorted(p.name for p in (tmp_path / "client").iterdir()) == ["results"]


def test_local_symlinked_folder_cannot_carry_writes_outside(ssh_lab, tmp_path):
    remote = make_tree(tmp_path / "remote", {"demo/sub/a.json": b"{}"})
    local = tmp_path / "local"
    outside = tmp_path / "outside"
    outside.mkdir()
    (local / "demo").mkdir(parents=True)
    os.symlink(outside, local / "demo/sub")  # planted locally, points out of the root
    report = run_sync(pull("hpc", remote, local, ssh_lab.config(tmp_path)))
    assert not report.ok or report.plan.kept
    assert list(outside.iterdir()) == []


def test_unreachable_host_is_a_sync_error(ssh_lab, tmp_path):
    config = ssh_lab.config(tmp_path, ssh_lab.block("down", free_port()))
    with pytest.raises(SyncError, match="cannot connect"):
        run_sync(pull("down", tmp_path, tmp_path / "local", config))


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_unknown_client_key_is_an_authentication_error(ssh_lab, tmp_path, transport):
    keygen(tmp_path / "stranger_key", "stranger")
    config = ssh_lab.config(tmp_path, ssh_lab.block("wrong-key", IdentityFile=str(tmp_path / "stranger_key")))
    with pytest.raises(SyncError, match="authentication|Permission denied"):
        run_sync(pull("wrong-key", tmp_path, tmp_path / "local", config, transport=transport))
