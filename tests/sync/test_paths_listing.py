"""Name checks, the local write guard, and the parsing of remote listings."""

from __future__ import annotations

import os

import pytest

from moespec.errors import SyncError
from moespec.sync.listing import LISTING_MARKER, find_command, list_local, parse_find_output, walk_names
from moespec.sync.paths import LocalRoot, UnsafePath, check_relpath, link_escapes, part_name
from tests.builders import make_tree


@pytest.mark.parametrize(
    "name", ["", "/etc/passwd", "..", "../x", "a/../../x", "a//b", "a/./b", "a/", "a\\..\\b", "nul\x00byte"]
)
def test_unsafe_names_are_refused(name):
    with pytest.raises(UnsafePath):
        check_relpath(name)


@pytest.mark.parametrize("name", ["a", "demo/embed/1a2b/embed.h5", "..hidden", "a..b/c", "sp ace/ünï"])
def test_ordinary_names_pass(name):
    assert check_relpath(name) == name


@pytest.mark.parametrize(
    "link,target,escapes",
    [
        ("d/l", "x", False),
        ("d/l", "../d2/x", False),
        ("d/l", "../../x", True),
        ("l", "..", True),
        ("d/l", "/abs", True),
        ("d/e/l", "../../x", False),
        ("d/l", "", True),
    ],
)
def test_link_escape(link, target, escapes):
    assert link_escapes(link, target) is escapes


def test_part_names_are_hidden_tagged_and_short():
    assert part_name("embed.h5", 100, 1600000000.9) == ".embed.h5.100-1600000000.part"
    assert len(part_name("x" * 250, 1, 1)) <= 255


def test_local_root_refuses_folders_that_resolve_outside(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "root"
    (root / "demo").mkdir(parents=True)
    os.symlink(outside, root / "demo" / "evil")
    local = LocalRoot(root)
    with pytest.raises(SyncError, match="outside"):
        local.check_parent("demo/evil/x.json")
    os.symlink(root / "demo", root / "alias")  # a link that stays inside is fine
    assert local.check_parent("alias/sub/x.json") == root / "alias" / "sub" / "x.json"
    assert list(outside.iterdir()) == []


def test_list_local_does_not_follow_links(tmp_path):
    make_tree(tmp_path, {"demo/a.json": b"{}", "demo/sub/b.h5": 10})
    os.symlink("/etc", tmp_path / "demo" / "etc")
    got = list_local(tmp_path, ("demo", "missing"))
    assert set(got.entries) == {"demo", "demo/a.json", "demo/sub", "demo/sub/b.h5", "demo/etc"}
    assert got.entries["demo/etc"].kind == "link" and got.entries["demo/etc"].target == "/etc"
    assert got.entries["demo/sub/b.h5"].size == 10 and got.missing == ["missing"]


def record(start, kind, size, mtime, mode, rel, target=""):
    return b"\0".join(x.encode() for x in (start, kind, str(size), mtime, mode, rel, target)) + b"\0"


def test_find_output_is_parsed_after_shell_noise():
    data = (
        b"Welcome to the cluster!\n"
        + LISTING_MARKER
        + record("/r/demo", "d", 4096, "1.5", "755", "")
        + record("/r/demo", "f", 12, "1600000000.25", "640", "a b/c.json")
        + record("/r/demo", "l", 3, "1600000000.0", "777", "ln", "c.json")
    )
    got = parse_find_output(data, "/r", ("demo", "gone"))
    assert got.entries["demo/a b/c.json"].size == 12 and got.entries["demo/a b/c.json"].mode == 0o640
    assert got.entries["demo/ln"].target == "c.json" and got.missing == ["gone"]


def test_find_output_refuses_hostile_records():
    data = (
        LISTING_MARKER
        + record("/r", "d", 1, "1", "755", "")
        + record("/r", "f", 1, "1", "644", "../x")
        + record("/r", "f", 1, "1", "644", "a/../../x")
        + record("/elsewhere", "f", 1, "1", "644", "x")
        + record("/r", "f", "NaN-size", "1", "644", "ok")
    )
    got = parse_find_output(data, "/r", ("",))
    assert not got.entries and len(got.refused) == 4


def test_truncated_listing_is_an_error():
    with pytest.raises(ValueError, match="truncated"):
        parse_find_output(LISTING_MARKER + b"/r\0f\0", "/r", ("",))
    with pytest.raises(ValueError, match="marker"):
        parse_find_output(b"", "/r", ("",))


def test_find_command_quotes_paths():
    assert "'/scratch/my results/demo'" in find_command("/scratch/my results", ("demo",))


class _Attr:
    def __init__(self, filename, mode, size=0):
        self.filename, self.st_mode, self.st_size, self.st_mtime = filename, mode, size, 1600000000


class _HostileSftp:
    """An SFTP server that lists names no real file system has."""

    def stat(self, path):
        return _Attr("", 0o040755)

    def listdir(self, path):
        return [_Attr("..", 0o100644), _Attr("a/../../x", 0o100644), _Attr("ok.json", 0o100644, 3)]

    def readlink(self, path):
        return ""


def test_sftp_walk_refuses_hostile_names():
    got = walk_names(_HostileSftp(), "/r", ("",))
    assert list(got.entries) == ["ok.json"] and len(got.refused) == 2


class _LockedSftp(_HostileSftp):
    """A server where one folder cannot be read."""

    def listdir(self, path):
        if path == "/r/locked":
            raise PermissionError(13, "Permission denied")
        return [_Attr("locked", 0o040755), _Attr("ok.json", 0o100644, 3)] if path == "/r" else []


def test_sftp_walk_reports_unreadable_folders():
    got = walk_names(_LockedSftp(), "/r", ("",))
    assert sorted(got.entries) == ["locked", "ok.json"]
    assert got.warnings == ["cannot read /r/locked: Permission denied"]
