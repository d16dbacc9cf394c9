"""Fixtures of the sync tests (the loopback sshd lives in sshd_fixture.py)."""

from tests.sync.sshd_fixture import _no_user_agent, ssh_lab  # noqa: F401  (fixtures)
