"""Pull and push against a real OpenSSH server on 127.0.0.1: incremental, filtered, dry-run, safe."""

from __future__ import annotations

import os
import stat

import pytest

from moespec.sync.engine import EngineSettings
from moespec.sync.filters import Filters
from moespec.sync.session import SyncRequest, run_sync
from tests.builders import OLD, RESULTS, make_tree, parts, pull_request, snapshot

pytestmark = pytest.mark.ssh


@pytest.fixture
def setup(ssh_lab, tmp_path):
    """A remote results tree, an empty local root and an ssh config for this test."""
    remote = make_tree(tmp_path / "remote" / "results", RESULTS)
    local = tmp_path / "local" / "results"
    config = ssh_lab.config(tmp_path)
    return remote, local, config


def pull(remote, local, config, **options) -> SyncRequest:
    return pull_request("hpc", remote, local, config, **options)


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_pull_copies_everything_then_nothing(setup, transport):
    remote, local, config = setup
    os.chmod(remote / "demo/summary.json", 0o640)
    first = run_sync(pull(remote, local, config, transport=transport))
    assert first.ok, first.failed
    assert first.files == len(RESULTS) and first.listing_method == "find"
    assert snapshot(local) == snapshot(remote)  # contents and whole-second mtimes
    assert stat.S_IMODE(os.stat(local / "demo/summary.json").st_mode) == 0o640
    assert not parts(local)
    second = run_sync(pull(remote, local, config, transport=transport))
    assert second.ok and second.files == 0 and second.bytes == 0
    assert second.plan.unchanged == len(RESULTS)


def test_pull_only_changed_files_move(setup):
    remote, local, config = setup
    run_sync(pull(remote, local, config))
    (remote / "demo/summary.json").write_bytes(b'{"tasks": 4}\n')  # same size, newer mtime
    os.utime(remote / "demo/reduce/3c4d/plot.png", (OLD + 60, OLD + 60))  # only the mtime
    report = run_sync(pull(remote, local, config))
    assert sorted(a.path for a in report.plan.copies) == ["demo/reduce/3c4d/plot.png", "demo/summary.json"]
    assert snapshot(local) == snapshot(remote)


def test_pull_named_experiments_only(setup):
    remote, local, config = setup
    report = run_sync(pull(remote, local, config, scopes=("other",)))
    assert report.ok and sorted(snapshot(local)) == ["other/summary.json"]
    missing = run_sync(pull(remote, local, config, scopes=("nope",)))
    assert not missing.ok and "nope" in missing.problems[0]


def test_include_exclude_first_match_wins(setup):
    remote, local, config = setup
    # the remote's defaults leave out large files; the command line asks for the embeddings
    filters = Filters.build([("include", "embed/**")], default_exclude=["*.h5", "*.pt"])
    report = run_sync(pull(remote, local, config, filters=filters))
    got = set(snapshot(local))
    assert "demo/embed/1a2b/embed.h5" in got
    assert "demo/reduce/3c4d/reduce.h5" not in got and "demo/train/5e6f/ckpt.pt" not in got
    assert report.plan.excluded == 2
    only_json = run_sync(
        pull(
            remote,
            local,
            config,
            filters=Filters.build([("include", "*.json"), ("exclude", "*")]),
            local_root=local.parent / "json",
        )
    )
    assert sorted(snapshot(local.parent / "json")) == ["demo/summary.json", "other/summary.json"]
    assert only_json.plan.excluded == len(RESULTS) - 2


def test_dry_run_changes_nothing(setup):
    remote, local, config = setup
    report = run_sync(pull(remote, local, config, dry_run=True))
    assert len(report.plan.copies) == len(RESULTS) and report.files == 0
    assert not local.exists()
    assert "would have pulled 8 files" in report.summary()


def test_local_newer_file_is_kept_unless_forced(setup):
    remote, local, config = setup
    run_sync(pull(remote, local, config))
    (local / "demo/summary.json").write_bytes(b"edited here\n")  # now, newer than the remote
    report = run_sync(pull(remote, local, config))
    assert [k.path for k in report.plan.kept] == ["demo/summary.json"]
    assert (local / "demo/summary.json").read_bytes() == b"edited here\n"
    forced = run_sync(pull(remote, local, config, force=True))
    assert forced.files == 1 and (local / "demo/summary.json").read_bytes() == RESULTS["demo/summary.json"]


def test_delete_only_when_asked_and_never_excluded(setup):
    remote, local, config = setup
    run_sync(pull(remote, local, config))
    (local / "demo/stale.json").write_text("{}")
    (local / "demo/notes.tmp").write_text("mine")  # *.tmp is always excluded, hence protected
    run_sync(pull(remote, local, config))
    assert (local / "demo/stale.json").exists()
    report = run_sync(pull(remote, local, config, delete=True))
    assert report.deleted == 1
    assert not (local / "demo/stale.json").exists() and (local / "demo/notes.tmp").exists()


def test_checksum_finds_same_size_same_mtime_changes(setup):
    remote, local, config = setup
    run_sync(pull(remote, local, config))
    target = local / "demo/reduce/3c4d/plot.png"
    target.write_bytes(os.urandom(5_000))  # same size ...
    os.utime(target, (OLD, OLD))  # ... and same mtime: invisible to the quick check
    assert run_sync(pull(remote, local, config)).files == 0
    report = run_sync(pull(remote, local, config, checksum=True))
    assert report.files == 1 and snapshot(local) == snapshot(remote)
    assert run_sync(pull(remote, local, config, checksum=True)).files == 0


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_push_configs_to_hpc(ssh_lab, tmp_path, transport):
    project = make_tree(
        tmp_path / "project",
        {
            "configs/experiments/demo.yaml": b"experiment: demo\n",
            "hpc/clusters/x.yaml": b"partition: gpu\n",
            "jobs/run.sbatch": 200,
        },
    )
    os.chmod(project / "jobs/run.sbatch", 0o755)
    remote = tmp_path / "remote" / "project"
    request = SyncRequest(
        "push",
        "hpc",
        str(remote),
        project,
        ("configs", "hpc", "jobs"),
        transport=transport,
        ssh_config=ssh_lab.config(tmp_path),
        retries=0,
        connect_timeout=10,
    )
    report = run_sync(request)
    assert report.ok and report.files == 3, (report.failed, report.problems)
    assert snapshot(remote) == snapshot(project)
    assert stat.S_IMODE(os.stat(remote / "jobs/run.sbatch").st_mode) == 0o755
    assert not parts(remote)
    assert run_sync(request).files == 0
    (remote / "hpc/clusters/x.yaml").write_text("edited on the cluster\n")  # remote newer: kept
    again = run_sync(request)
    assert again.files == 0 and [k.path for k in again.plan.kept] == ["hpc/clusters/x.yaml"]


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_several_channels_share_the_work(setup, transport, monkeypatch):
    from moespec.sync import sftp_channels

    remote, local, config = setup
    channels = []
    original = sftp_channels.PullChannel.__init__

    def counting_init(self, *args, **kwargs):
        channels.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(sftp_channels.PullChannel, "__init__", counting_init)
    # one channel per byte (so: as many as allowed) and two files in flight each
    settings = EngineSettings(channels=3, bytes_per_channel=1, files_per_channel=2, stall_timeout=30)
    report = run_sync(pull(remote, local, config, transport=transport, engine=settings))
    assert report.ok and len(channels) == 3
    assert snapshot(local) == snapshot(remote) and not parts(local)


def _count_sftp_channels(monkeypatch) -> list[str]:
    """Record every SFTP channel opened apart from the listing's own session."""
    from moespec.sync.transport_openssh import OpenSSHTransport
    from moespec.sync.transport_paramiko import ParamikoTransport

    opened: list[str] = []
    for cls in (ParamikoTransport, OpenSSHTransport):
        for name in ("open_sftp", "start_sftp"):
            if name in vars(cls):
                original = vars(cls)[name]

                def counted(self, _original=original, _name=name):
                    opened.append(_name)
                    return _original(self)

                monkeypatch.setattr(cls, name, counted)
    return opened


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_pull_lists_and_copies_on_one_session(setup, transport, monkeypatch):
    """Each session runs the remote login shell: a small pull needs one, as rsync does."""
    remote, local, config = setup
    opened = _count_sftp_channels(monkeypatch)
    report = run_sync(pull(remote, local, config, transport=transport, engine=EngineSettings(channels=1)))
    assert report.ok and report.files == len(RESULTS) and snapshot(local) == snapshot(remote)
    assert opened == []


@pytest.mark.parametrize("transport", ["paramiko", "openssh"])
def test_pull_without_a_known_sftp_server_opens_the_subsystem(setup, transport, monkeypatch):
    remote, local, config = setup
    monkeypatch.setattr("moespec.sync.listing.SFTP_SERVERS", ("/nonexistent/sftp-server",))
    opened = _count_sftp_channels(monkeypatch)
    report = run_sync(pull(remote, local, config, transport=transport, engine=EngineSettings(channels=1)))
    assert report.ok and report.listing_method == "find" and snapshot(local) == snapshot(remote)
    assert opened  # the SFTP subsystem, as before


def test_pull_with_a_missing_scope_falls_back_to_the_plain_listing(setup, monkeypatch):
    """find fails on the missing scope: the precise listing reports it, the other scope is pulled."""
    remote, local, config = setup
    opened = _count_sftp_channels(monkeypatch)
    report = run_sync(pull(remote, local, config, scopes=("other", "nope")))
    assert sorted(snapshot(local)) == ["other/summary.json"] and opened
    assert not report.ok and report.problems == [f"nope: not found under {remote} on hpc"]


def _started_with_listing(request: SyncRequest):
    """The openssh transport as ``moespec sync`` starts it: the master runs the listing itself."""
    from moespec.sync.listing import list_then_serve_command
    from moespec.sync.transport import start_early

    first = list_then_serve_command(request.remote_root, request.scopes, request.listing_token)
    return start_early("openssh", request.connect_options(), first)


def test_openssh_master_lists_and_serves_on_its_own_session(setup, monkeypatch):
    """Like ``rsync -e ssh``: one ssh process, no multiplexed session for a small pull."""
    from moespec.sync.transport_openssh import OpenSSHTransport

    remote, local, config = setup
    spawned = []
    original = OpenSSHTransport._register
    monkeypatch.setattr(OpenSSHTransport, "_register", lambda self, pipe: spawned.append(pipe) or original(self, pipe))
    request = pull(remote, local, config, transport="openssh", engine=EngineSettings(channels=1))
    report = run_sync(request, transport=_started_with_listing(request))
    assert report.ok and report.files == len(RESULTS) and snapshot(local) == snapshot(remote)
    assert spawned == []
    again = pull(remote, local, config, transport="openssh")
    assert run_sync(again, transport=_started_with_listing(again)).plan.unchanged == len(RESULTS)


def test_openssh_master_keeps_serving_when_its_listing_is_not_used(setup):
    """find fails on a missing scope: the precise listing and the copies go through the master."""
    remote, local, config = setup
    request = pull(remote, local, config, transport="openssh", scopes=("other", "nope"))
    report = run_sync(request, transport=_started_with_listing(request))
    assert sorted(snapshot(local)) == ["other/summary.json"]
    assert report.problems == [f"nope: not found under {remote} on hpc"]
