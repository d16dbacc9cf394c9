"""Guards against a real sshd: link chains, --delete against an empty source, odd names, local errors."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from moespec.cli import main as moespec_main
from moespec.sync.hostkeys import HostKeyError
from moespec.sync import session
from moespec.sync.listing import SFTP_SERVERS
from moespec.sync.session import run_sync
from tests.builders import make_tree, pull_request as pull, snapshot

pytestmark = pytest.mark.ssh


def cli(config: Path, remote: Path, local: Path, *extra: str) -> list[str]:
    """``moespec sync --from-hpc`` arguments for host ``hpc`` of ``config``."""
    return [
        "sync",
        "--from-hpc",
        "--host",
        "hpc",
        "--remote-root",
        str(remote),
        "--local-root",
        str(local),
        "--ssh-config",
        str(config),
        "--batch",
        "--no-progress",
        "--retries",
        "0",
        *extra,
    ]


# --------------------------------------------------------------------------------------------------
# links


def test_a_link_through_a_link_is_resolved_before_it_is_made(ssh_lab, tmp_path):
    remote = make_tree(tmp_path / "remote", {"demo/a.json": b"{}", "x/keep.txt": b"x"})
    os.symlink("..", remote / "demo/up")
    os.symlink("up/x/up/x/../../../../etc", remote / "demo/chain")  # lexically demo/etc; really /etc or above
    os.symlink("up/demo/a.json", remote / "demo/fine")
    long_name = "l" * 250
    os.symlink("a.json", remote / "demo" / long_name)
    local = tmp_path / "local"
    report = run_sync(pull("hpc", remote, local, ssh_lab.config(tmp_path)))
    assert [r.path for r in report.plan.refused] == ["demo/chain"]
    assert not os.path.lexists(local / "demo/chain")
    assert report.ok and report.links == 3
    assert (local / "demo/fine").read_bytes() == b"{}" and os.readlink(local / "demo" / long_name) == "a.json"


# --------------------------------------------------------------------------------------------------
# --delete


def test_delete_never_empties_an_experiment_from_an_empty_source(ssh_lab, tmp_path, capsys):
    remote = tmp_path / "remote"
    (remote / "demo").mkdir(parents=True)  # a purged scratch: the folder is there, empty
    local = make_tree(tmp_path / "local", {f"demo/r{i}.json": b"{}" for i in range(6)})
    config = ssh_lab.config(tmp_path)
    assert moespec_main(cli(config, remote, local, "demo", "--delete", "--dry-run")) == 1
    out, err = capsys.readouterr()
    assert "would delete" not in out and "deleted" not in out
    assert "demo: --delete would remove 6 of its 6 files" in err and "--force" in err
    assert moespec_main(cli(config, remote, local, "demo", "--delete")) == 1
    assert len(snapshot(local)) == 6
    make_tree(remote, {f"demo/r{i}.json": b"{}" for i in range(4)})  # two went: a third, under the share
    assert moespec_main(cli(config, remote, local, "demo", "--delete", "--dry-run")) == 0
    out = capsys.readouterr().out
    assert out.count("would delete") == 2 and "2 deleted" in out.splitlines()[-1]
    assert moespec_main(cli(config, remote, local, "demo", "--delete")) == 0
    assert sorted(snapshot(local)) == [f"demo/r{i}.json" for i in range(4)]


def test_delete_past_the_share_needs_force(ssh_lab, tmp_path):
    remote = make_tree(tmp_path / "remote", {"demo/r0.json": b"{}"})
    local = make_tree(tmp_path / "local", {f"demo/r{i}.json": b"{}" for i in range(4)})
    config = ssh_lab.config(tmp_path)
    refused = run_sync(pull("hpc", remote, local, config, delete=True))
    assert not refused.ok and "more than --max-delete 50%" in refused.problems[0] and len(snapshot(local)) == 4
    assert run_sync(pull("hpc", remote, local, config, delete=True, max_delete=0.8)).deleted == 3


# --------------------------------------------------------------------------------------------------
# host keys: never through a master someone else opened


def test_openssh_transport_never_reuses_a_master_it_did_not_start(ssh_lab, tmp_path):
    """The user's master was opened with host-key checking off; moespec must check the key itself."""
    socket_path = tmp_path / "cm"
    empty = tmp_path / "known_hosts_empty"
    empty.write_text("")
    config = ssh_lab.config(
        tmp_path,
        ssh_lab.block("muxed", ControlMaster="auto", ControlPath=str(socket_path), UserKnownHostsFile=str(empty)),
    )
    master = subprocess.Popen(
        [
            "ssh",
            "-F",
            str(config),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-M",
            "-N",
            "-n",
            "muxed",
        ],
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 15
        while not socket_path.exists():
            if master.poll() is not None or time.monotonic() > deadline:
                pytest.fail("the test's ControlMaster did not start")
            time.sleep(0.05)
        remote = make_tree(tmp_path / "remote", {"demo/a.json": b"{}"})
        with pytest.raises(HostKeyError, match="not known"):
            run_sync(pull("muxed", remote, tmp_path / "local", config, transport="openssh"))
        assert not (tmp_path / "local").exists()
        assert master.poll() is None  # the user's master is left alone
    finally:
        master.terminate()
        master.wait(10)


# --------------------------------------------------------------------------------------------------
# names that are not UTF-8, or that a terminal would act on

ODD = {b"demo/caf\xe9.json": b"latin-1 name", "demo/bell\x1b[2J.json".encode(): b"escape sequence"}


def _odd_tree(root: Path) -> Path:
    make_tree(root, {"demo/ok.json": b"{}"})
    for name, content in ODD.items():
        with open(os.path.join(os.fsencode(root), name), "wb") as fh:
            fh.write(content)
    return root


def _odd_snapshot(root: Path) -> dict[bytes, bytes]:
    out = {}
    for folder, _, names in os.walk(os.fsencode(root)):
        for name in names:
            path = os.path.join(folder, name)
            out[os.path.relpath(path, os.fsencode(root))] = open(path, "rb").read()
    return out


def test_odd_names_over_find_and_printed_escaped(ssh_lab, tmp_path, capsys):
    remote = _odd_tree(tmp_path / "remote")
    local = tmp_path / "local"
    assert moespec_main(cli(ssh_lab.config(tmp_path), remote, local, "-v")) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "demo/bell\\x1b[2J.json" in out and "demo/caf\\xe9.json" in out
    assert _odd_snapshot(local) == _odd_snapshot(remote)


def test_odd_names_over_the_sftp_walk_and_on_push(new_lab, tmp_path):
    server = new_lab.add_server("noshell", set_env={"PATH": str(tmp_path / "no-tools")})  # no find: walk over SFTP
    config = new_lab.write_config([new_lab.host_block("hpc", server.port)], tmp_path / "ssh_config")
    remote = _odd_tree(tmp_path / "remote")
    local = tmp_path / "local"
    report = run_sync(pull("hpc", remote, local, config))
    assert report.ok and report.listing_method == "sftp-walk"
    assert _odd_snapshot(local) == _odd_snapshot(remote)
    pushed = tmp_path / "pushed"
    report = run_sync(pull("hpc", pushed, local, config, direction="push", scopes=("demo",)))
    assert report.ok and _odd_snapshot(pushed) == _odd_snapshot(remote)


def _sftp_server() -> str:
    """The sftp-server binary (``ForceCommand internal-sftp`` would refuse commands at once, with a
    message: an external server waits for a packet instead, as some sites' forced commands do)."""
    found = next((path for path in SFTP_SERVERS if os.access(path, os.X_OK)), None)
    if found is None:
        pytest.skip("no sftp-server binary")
    return found


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_sftp_only_server_is_walked_without_waiting(new_lab, tmp_path, transport, monkeypatch):
    """A data-transfer node that forces SFTP on every session never answers the listing script:
    the probe ends that session (no timeout) and the pull walks the tree over SFTP."""
    server = new_lab.add_server("sftponly", extra_config=("ForceCommand " + _sftp_server(),))
    config = new_lab.write_config([new_lab.host_block("hpc", server.port)], tmp_path / "ssh_config")
    remote = _odd_tree(tmp_path / "remote")
    local = tmp_path / "local"
    reads = []

    def read_through(stream, endings, _original=session._read_through):
        try:
            reads.append(_original(stream, endings))
        except Exception as e:
            reads.append(e)
            raise

    monkeypatch.setattr(session, "_read_through", read_through)
    report = run_sync(pull("hpc", remote, local, config, transport=transport))
    assert report.ok and report.listing_method == "sftp-walk"
    assert _odd_snapshot(local) == _odd_snapshot(remote)
    assert len(reads) == 1 and isinstance(reads[0], bytes)  # the session ended; nothing timed out


def test_sftp_only_server_with_the_openssh_master_running_the_listing(new_lab, tmp_path):
    """The master's own session ends at once (forced command): a new master serves the SFTP walk."""
    from moespec.sync.listing import list_then_serve_command
    from moespec.sync.transport import start_early

    server = new_lab.add_server("sftponly", extra_config=("ForceCommand " + _sftp_server(),))
    config = new_lab.write_config([new_lab.host_block("hpc", server.port)], tmp_path / "ssh_config")
    remote = _odd_tree(tmp_path / "remote")
    local = tmp_path / "local"
    request = pull("hpc", remote, local, config, transport="openssh")
    first = list_then_serve_command(request.remote_root, request.scopes, request.listing_token)
    report = run_sync(request, transport=start_early("openssh", request.connect_options(), first))
    assert report.ok and report.listing_method == "sftp-walk"
    assert _odd_snapshot(local) == _odd_snapshot(remote)


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_a_reader_that_went_away_leaves_no_ssh_behind(ssh_lab, tmp_path, transport):
    """``moespec sync | head -c 10``: printing fails before the pull starts; the connection
    begun at start-up (the openssh master) must still be closed."""
    remote = make_tree(tmp_path / "remote", {"demo/a.json": b"{}"})
    private = tmp_path / "tmp"  # the openssh transport's control folder goes here (TMPDIR)
    private.mkdir()
    source = str(Path(moespec_main.__code__.co_filename).resolve().parents[1])
    env = {
        **os.environ,
        "TMPDIR": str(private),
        "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")]),
    }
    argv = cli(ssh_lab.config(tmp_path), remote, tmp_path / "local", "--transport", transport)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before anything is printed
    try:
        subprocess.run(
            [sys.executable, "-u", "-m", "moespec.cli", *argv], stdout=write_end, env=env, cwd=tmp_path, timeout=60
        )
    finally:
        os.close(write_end)
        left = [pid for pid in _processes_mentioning(str(private))]
        for pid in left:
            os.kill(pid, 9)
    assert left == [] and list(private.glob("moespec-ssh-*")) == []


def _processes_mentioning(text: str) -> list[int]:
    """PIDs of this user's processes whose command line contains ``text`` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text.encode() in (entry / "cmdline").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


# --------------------------------------------------------------------------------------------------
# errors: one clear line and a non-zero exit each


UNREADABLE_FIND = """#!/bin/sh
# As root nothing is unreadable: report the folder as real find does for another user.
/usr/bin/find "$@"
echo "find: '{folder}': Permission denied" >&2
exit 1
"""


def test_unreadable_remote_folder_is_an_error(ssh_lab, new_lab, tmp_path, capsys):
    remote = make_tree(tmp_path / "remote", {"demo/a.json": b"{}", "demo/secret/b.json": b"{}"})
    secret = remote / "demo/secret"
    if os.geteuid() != 0:
        secret.chmod(0)
        config = ssh_lab.config(tmp_path)
    else:
        fake_bin = tmp_path / "fakebin"
        fake_bin.mkdir()
        (fake_bin / "find").write_text(UNREADABLE_FIND.format(folder=secret))
        (fake_bin / "find").chmod(0o755)
        server = new_lab.add_server("unreadable", set_env={"PATH": f"{fake_bin}:/usr/bin:/bin"})
        config = new_lab.write_config([new_lab.host_block("hpc", server.port)], tmp_path / "ssh_config")
    try:
        assert moespec_main(cli(config, remote, tmp_path / "local")) == 1
    finally:
        secret.chmod(0o755)
    [error] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ERROR")]
    assert error.startswith("ERROR: on hpc: find: ") and str(secret) in error and "Permission denied" in error


@contextlib.contextmanager
def read_only_folder(path: Path):
    """A folder nobody may write in: permissions as a user; a read-only mount as root (which ignores them)."""
    path.mkdir()
    if os.geteuid() != 0:
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(0o755)
        return
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"as root a read-only folder needs a read-only mount: {mounted.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_local_root_that_cannot_be_written_is_one_error(ssh_lab, tmp_path, capsys):
    remote = make_tree(tmp_path / "remote", {f"demo/r{i}.json": b"{}" for i in range(20)})
    config = ssh_lab.config(tmp_path)
    with read_only_folder(tmp_path / "ro") as folder:
        assert moespec_main(cli(config, remote, folder / "results")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write in" in err[0] and str(tmp_path / "ro") in err[0]
    (tmp_path / "file").write_text("not a folder")
    assert moespec_main(cli(config, remote, tmp_path / "file")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moespec sync: error: local root {tmp_path / 'file'}: exists and is not a folder"]


def test_symlinked_local_root_stays_incremental(ssh_lab, tmp_path):
    remote = make_tree(tmp_path / "remote", {"demo/a.json": b"{}", "demo/b.json": b"[]"})
    (tmp_path / "data").mkdir()
    os.symlink(tmp_path / "data", tmp_path / "results")
    config = ssh_lab.config(tmp_path)
    assert run_sync(pull("hpc", remote, tmp_path / "results", config)).files == 2
    again = run_sync(pull("hpc", remote, tmp_path / "results", config))
    assert again.ok and again.files == 0 and again.plan.unchanged == 2


def test_resume_hint_only_where_a_partial_file_was_kept(ssh_lab, tmp_path, capsys):
    remote = make_tree(tmp_path / "remote", {"demo/big.h5": 200_000})
    part = tmp_path / "local/demo/.big.h5.200000-1600000000.part"  # this remote version, wrong bytes
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 100_000)
    assert moespec_main(cli(ssh_lab.config(tmp_path), remote, tmp_path / "local")) == 1
    [failure] = [line for line in capsys.readouterr().err.splitlines() if line.startswith("FAILED")]
    assert "does not match" in failure and "resume" not in failure and failure.endswith("(run again to retry)")
    assert not part.exists()
