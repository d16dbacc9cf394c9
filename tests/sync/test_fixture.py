"""The loopback-sshd harness skips on a developer machine without sshd but fails in CI."""

from __future__ import annotations

import pytest

from tests.sync import loopback


def test_missing_sshd_skips_here_and_fails_in_ci(monkeypatch):
    monkeypatch.setattr(loopback, "missing_tools", lambda: ["sshd (apt-get install openssh-server)"])
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="openssh-server"):
        loopback.require_ssh_tools()
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must run the ssh tests"):
        loopback.require_ssh_tools()
