"""``moespec sync`` argument handling (no network: the request is built, not run)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import moespec
from moespec.cli import build_parser, main
from moespec.errors import ConfigError
from moespec.sync.cli import build_request

REMOTES = """\
default: hpc
remotes:
  hpc:
    host: login
    transfer_host: dtn
    root: /scratch/a/results
    channels: 6
    pull: {exclude: ["*.h5"]}
    push: {root: /home/a/moespec, paths: [configs, jobs]}
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    (tmp_path / "sync").mkdir()
    (tmp_path / "sync" / "remotes.yaml").write_text(REMOTES)
    (tmp_path / "configs").mkdir()
    monkeypatch.chdir(tmp_path)
    return tmp_path


def request_for(*argv):
    return build_request(build_parser().parse_args(["sync", *argv]))


def test_pull_request_from_remotes_file(project):
    request = request_for("--from-hpc", "demo", "--include", "embed/**", "--exclude", "*.pt", "-n")
    assert request.direction == "pull" and request.host == "dtn" and request.dry_run
    assert request.remote_root == "/scratch/a/results" and request.local_root == Path("results")
    assert request.scopes == ("demo",) and request.engine.channels == 6
    cli_rules = [(r.action, r.pattern) for r in request.filters.rules][2:]
    assert cli_rules == [("include", "embed/**"), ("exclude", "*.pt"), ("exclude", "*.h5")]
    assert request.filters.selects("demo/embed/x/embed.h5") and not request.filters.selects("demo/r/x.h5")
    assert request_for("--from-hpc", "--all").filters.selects("demo/r/x.h5")


def test_max_delete_from_the_remote_or_the_flag(project):
    assert request_for("--from-hpc").max_delete == 0.5
    assert request_for("--from-hpc", "--max-delete", "0.9").max_delete == 0.9
    with pytest.raises(ConfigError, match="--max-delete: must be a share between 0 and 1, got 2"):
        request_for("--from-hpc", "--max-delete", "2")


def test_push_request_defaults_to_existing_push_paths(project):
    request = request_for("--to-hpc")
    assert request.direction == "push" and request.remote_root == "/home/a/moespec"
    assert request.scopes == ("configs",)  # jobs/ does not exist here


def test_ad_hoc_host_needs_no_remotes_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    request = request_for("--from-hpc", "--host", "h", "--remote-root", "/r", "--local-root", "out")
    assert request.host == "h" and request.remote_root == "/r" and request.local_root == Path("out")


def test_bad_remotes_file_is_reported_with_dotted_keys(project, capsys):
    (project / "sync" / "remotes.yaml").write_text("remotes:\n  hpc: {host: login}\n")
    assert main(["sync", "--from-hpc"]) == 1
    assert "sync/remotes.yaml: remotes.hpc.root: required key is missing" in capsys.readouterr().err


def test_direction_is_required(project):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sync"])


def test_sync_never_imports_torch_and_paramiko_only_for_sftp_or_its_transport():
    code = (
        "import sys, argparse; import moespec.sync.cli as c, moespec.sync.plan, moespec.sync.remotes; "
        "c.register(argparse.ArgumentParser().add_subparsers()); "
        "import moespec.sync.session, moespec.sync.engine, moespec.sync.transport_openssh; "
        "light = 'paramiko' not in sys.modules; "
        "import moespec.sync.transport_paramiko; print(light, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["True", "False"]


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_sync_start_up_imports_no_pydantic_numpy_torch_h5py(project, transport):
    """The whole command as a user runs it, up to a connection that is refused: what it imported.

    Start-up is part of every pull (docs/sync.md, "Start-up"); pydantic alone (through the stage
    registry or a pydantic remotes schema) cost 0.12 s of a 0.4 s no-change pull.
    """
    from tests.sync.loopback import free_port

    config = project / "ssh_config"
    config.write_text(f"Host nowhere\n  HostName 127.0.0.1\n  Port {free_port()}\n")
    argv = ["--host", "nowhere", "--transport", transport, "--ssh-config", str(config), "--batch", "--no-progress"]
    if transport == "openssh" and shutil.which("ssh") is None:
        pytest.skip("the openssh transport needs the ssh client")
    source = str(Path(moespec.__file__).resolve().parents[1])  # this checkout, also from another folder
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([source, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "moespec.cli", "sync", "--from-hpc", *argv],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    lines = result.stderr.splitlines()
    imported = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    assert result.returncode == 1 and "nowhere" in lines[-1]  # it got as far as connecting
    assert {"moespec.sync.session", "moespec.sync.remotes", "yaml"} <= imported
    heavy = sorted(name for name in imported if name.split(".")[0] in ("pydantic", "numpy", "torch", "h5py"))
    assert heavy == []


def test_names_that_leave_the_root_are_rejected(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sync", "--from-hpc", "../elsewhere", "--host", "h", "--remote-root", "/r"]) == 1
    assert "'../elsewhere': not a path under the root" in capsys.readouterr().err


def test_host_that_looks_like_an_option_is_rejected(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["sync", "--from-hpc", "--host=-oProxyCommand=touch /tmp/x", "--remote-root", "/r"]) == 1
    assert "is not a host alias" in capsys.readouterr().err
