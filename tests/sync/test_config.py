"""remotes.yaml validation, ssh_config resolution (Include, ProxyJump) and known_hosts matching."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from moespec.errors import ConfigError, SyncError
from moespec.sync.hostkeys import HostKeyError, KnownHosts, fingerprint, verify_host_key
from moespec.sync.remotes import load_remotes
from moespec.sync.sshconfig import Hop, expand_includes, resolve_host

REPO = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------------------------------
# remotes.yaml


def test_example_remotes_file_is_valid():
    remotes = load_remotes(REPO / "sync" / "remotes.example.yaml")
    cluster = remotes.get(None)
    assert cluster.sync_host == "mycluster-dtn" and cluster.push.paths[:3] == ["configs", "hpc", "jobs"]
    assert remotes.get("other").root == "projects/moespec/results"


def test_remotes_errors_name_the_file_and_dotted_key(tmp_path):
    path = tmp_path / "remotes.yaml"
    path.write_text(
        "default: nope\nremotes:\n  hpc:\n    host: login\n    channels: 0\n    colour: red\n"
        "    pull: {include: ['[bad']}\n"
    )
    with pytest.raises(ConfigError) as info:
        load_remotes(path)
    problems = "\n".join(info.value.problems)
    assert f"{path}: remotes.hpc.root: required key is missing" in problems
    assert f"{path}: remotes.hpc.channels:" in problems and f"{path}: remotes.hpc.colour: unknown key" in problems
    assert f"{path}: remotes.hpc.pull.include: unclosed '['" in problems


def test_remotes_types_are_not_coerced_and_every_problem_is_reported(tmp_path):
    path = tmp_path / "remotes.yaml"
    path.write_text(
        "default: [a]\nextra: 1\nremotes:\n  a:\n    host: '-oProxyCommand=x'\n    root: 5\n    transport: ftp\n"
        "    retries: true\n    max_delete: 2\n    connect_timeout: 0\n    push: {paths: ['../up']}\n"
        "  b: [not, a, mapping]\n"
    )
    with pytest.raises(ConfigError) as info:
        load_remotes(path)
    problems = sorted(p.removeprefix(f"{path}: ") for p in info.value.problems)
    assert problems == [
        "default: expected a string, got ['a']",
        "extra: unknown key",
        "remotes.a.connect_timeout: must be > 0, got 0",
        "remotes.a.host: '-oProxyCommand=x' is not a host alias",
        "remotes.a.max_delete: must be <= 1, got 2",
        "remotes.a.push.paths: '..' component in name",
        "remotes.a.retries: expected an integer, got True",
        "remotes.a.root: expected a string, got 5",
        "remotes.a.transport: expected one of paramiko, openssh, got 'ftp'",
        "remotes.b: expected a mapping, got ['not', 'a', 'mapping']",
    ]


def test_missing_remotes_file_says_what_to_do(tmp_path):
    (tmp_path / "remotes.example.yaml").write_text("remotes: {}\n")
    with pytest.raises(ConfigError, match="copy .*remotes.example.yaml"):
        load_remotes(tmp_path / "remotes.yaml")


def test_tilde_roots_become_home_relative(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("remotes:\n  a: {host: h, root: ~/results/}\n")
    assert load_remotes(path).get(None).root == "results"


# --------------------------------------------------------------------------------------------------
# ssh_config


def test_include_is_inlined_and_the_enclosing_block_resumes(tmp_path):
    (tmp_path / "extra.conf").write_text("Host cluster\n  HostName cluster.example.org\n  User alice\n")
    config = tmp_path / "config"
    config.write_text(f"Host bastion\n  Include {tmp_path}/*.conf\n  Port 2200\nHost *\n  User nobody\n")
    text = expand_includes(config)
    assert "cluster.example.org" in text
    spec = resolve_host("bastion", config)
    assert spec.port == 2200 and spec.user == "nobody"  # Port stayed in the bastion block
    assert resolve_host("cluster", config).hostname == "cluster.example.org"


def test_proxyjump_chain_and_known_hosts_name(tmp_path):
    config = tmp_path / "config"
    config.write_text(
        "Host hpc\n  HostName 10.0.0.5\n  Port 2222\n  ProxyJump alice@gw1:2022,ssh://gw2\n"
        f"  UserKnownHostsFile {tmp_path}/kh\n  IdentityFile ~/.ssh/id_test\n"
    )
    spec = resolve_host("hpc", config)
    assert spec.proxy_jump == (Hop("gw1", "alice", 2022), Hop("gw2"))
    assert spec.known_hosts_name == "[10.0.0.5]:2222"
    assert spec.known_hosts_files[0] == f"{tmp_path}/kh" and spec.identity_files[0].endswith("/.ssh/id_test")
    assert Hop.parse("[fe80::1]:22") == Hop("fe80::1", None, 22)
    with pytest.raises(SyncError):
        Hop.parse("host:notaport")


# --------------------------------------------------------------------------------------------------
# known_hosts


KEY_A = base64.b64decode("AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl")
KEY_B = base64.b64decode("AAAAC3NzaC1lZDI1NTE5AAAAIB3ChlN1h0W6i7u7k9rWKnXcWqIDHDUo2qCeWbgQhmsU")


def _line(hosts: str, blob: bytes, marker: str = "") -> str:
    return f"{marker} {hosts} ssh-ed25519 {base64.b64encode(blob).decode()}".strip()


def _hashed(name: str) -> str:
    salt = b"0123456789abcdefghij"
    digest = hmac.new(salt, name.encode(), hashlib.sha1).digest()
    return f"|1|{base64.b64encode(salt).decode()}|{base64.b64encode(digest).decode()}"


def verify(lines: list[str], name: str, blob: bytes, tmp_path) -> None:
    path = tmp_path / "known_hosts"
    path.write_text("\n".join(lines) + "\n")
    verify_host_key("ssh-ed25519", blob, name, KnownHosts.load([path]), host="h", port=22, alias="h")


@pytest.mark.parametrize("hosts", ["h.example.org", "*.example.org", "other,h.example.org", _hashed("h.example.org")])
def test_known_key_is_accepted(hosts, tmp_path):
    verify(
        ["@cert-authority *.example.org ssh-ed25519 AAAAnotakey", "garbage line", _line(hosts, KEY_A)],
        "h.example.org",
        KEY_A,
        tmp_path,
    )


def test_bracketed_port_names_are_literal(tmp_path):
    verify([_line("[127.0.0.1]:2222", KEY_A)], "[127.0.0.1]:2222", KEY_A, tmp_path)
    with pytest.raises(HostKeyError, match="not known"):
        verify([_line("[127.0.0.1]:2222", KEY_A)], "[127.0.0.1]:2223", KEY_A, tmp_path)


def test_negated_pattern_and_revoked_key_are_refused(tmp_path):
    with pytest.raises(HostKeyError, match="not known"):
        verify([_line("*.example.org,!h.example.org", KEY_A)], "h.example.org", KEY_A, tmp_path)
    with pytest.raises(HostKeyError, match="revoked"):
        verify([_line("h", KEY_A), _line("*", KEY_A, "@revoked")], "h", KEY_A, tmp_path)


def test_mismatch_names_the_line_and_both_fingerprints(tmp_path):
    with pytest.raises(HostKeyError) as info:
        verify([_line("h", KEY_A)], "h", KEY_B, tmp_path)
    message = str(info.value)
    assert "MISMATCH" in message and fingerprint(KEY_A) in message and fingerprint(KEY_B) in message
    assert "known_hosts:1" in message and "ssh-keygen -R" in message


def test_certificate_authority_only_points_to_openssh(tmp_path):
    with pytest.raises(HostKeyError, match="transport: openssh"):
        verify([_line("*.example.org", KEY_B, "@cert-authority")], "h.example.org", KEY_A, tmp_path)
