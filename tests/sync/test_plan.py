"""The pure planner: listings and filters in, actions out."""

from __future__ import annotations

from moespec.sync.filters import Filters
from moespec.sync.listing import Entry, Listing, Refusal
from moespec.sync.plan import checksum_candidates, plan_sync

T = 1_600_000_000


def listing(*entries: Entry, **kwargs) -> Listing:
    out = Listing(**kwargs)
    for entry in entries:
        out.add(entry)
    return out


def f(path, size=10, mtime=T, **kw) -> Entry:
    return Entry(path, "file", size, mtime, **kw)


def test_quick_check_new_changed_unchanged():
    source = listing(f("a"), f("b", size=11), f("c", mtime=T + 5), f("d", mtime=T + 0.7))
    dest = listing(f("b"), f("c"), f("d"))
    plan = plan_sync(source, dest, Filters.build())
    assert {(a.path, a.reason) for a in plan.copies} == {("a", "new"), ("b", "size differs"), ("c", "mtime differs")}
    assert plan.unchanged == 1  # d: same whole second (SFTP v3 carries whole seconds)


def test_destination_newer_is_kept_unless_forced():
    source, dest = listing(f("a", mtime=T)), listing(f("a", size=3, mtime=T + 100))
    plan = plan_sync(source, dest, Filters.build())
    assert not plan.copies and plan.kept[0].path == "a" and "newer" in plan.kept[0].reason
    assert [a.path for a in plan_sync(source, dest, Filters.build(), force=True).copies] == ["a"]


def test_copies_are_largest_first_and_bytes_add_up():
    plan = plan_sync(listing(f("small", 1), f("big", 100), f("mid", 10)), listing(), Filters.build())
    assert [a.path for a in plan.copies] == ["big", "mid", "small"] and plan.bytes == 111


def test_excluded_files_are_counted_not_copied():
    plan = plan_sync(listing(f("x.h5"), f("x.json")), listing(), Filters.build([("exclude", "*.h5")]))
    assert [a.path for a in plan.copies] == ["x.json"] and plan.excluded == 1


def test_links_inside_are_recreated_links_outside_refused():
    source = listing(
        Entry("d/in", "link", target="../d/x"),
        Entry("d/abs", "link", target="/etc"),
        Entry("d/out", "link", target="../../x"),
    )
    plan = plan_sync(source, listing(), Filters.build())
    assert [a.path for a in plan.links] == ["d/in"]
    assert sorted(r.path for r in plan.refused) == ["d/abs", "d/out"]


def test_type_conflicts_are_left_alone():
    source = listing(f("a"), Entry("b", "dir"), f("b/c"))
    dest = listing(Entry("a", "dir"), f("b"))  # a folder where a file goes; a file where a folder goes
    plan = plan_sync(source, dest, Filters.build(), force=True, delete=True)
    assert not plan.copies and not plan.deletes and {k.path for k in plan.kept} == {"a", "b/c"}


def test_delete_only_when_asked_protects_excluded_and_refused():
    source = listing(f("keep"), refused=[Refusal("link", "leaves the root")])
    dest = listing(f("keep"), f("gone"), f("mine.tmp"), f("link"), Entry("old", "dir"), f("old/x"))
    assert not plan_sync(source, dest, Filters.build()).deletes
    plan = plan_sync(source, dest, Filters.build(), delete=True, force=True)  # force: old/ is emptied
    assert [a.path for a in plan.deletes] == ["old/x", "gone", "old"]  # contents before their folder


def test_delete_never_empties_an_experiment_nor_takes_more_than_the_share():
    dest = listing(*(f(f"a/{i}") for i in range(4)), *(f(f"b/{i}") for i in range(4)), *(f(f"c/{i}") for i in range(4)))
    source = listing(f("a/0"), f("a/1"), f("a/2"), f("b/0"), Entry("c", "dir"))  # a: 1 gone, b: 3 gone, c: empty
    plan = plan_sync(source, dest, Filters.build(), delete=True)
    assert [a.path for a in plan.deletes] == ["a/3"]
    assert [line.split(":")[0] for line in plan.deletes_refused] == ["b", "c"]
    assert "no files there" in plan.deletes_refused[1] and "--force" in plan.deletes_refused[1]
    assert len(plan_sync(source, dest, Filters.build(), delete=True, max_delete=0.8).deletes) == 4  # a/3 and b/*
    assert len(plan_sync(source, dest, Filters.build(), delete=True, force=True).deletes) == 8


def test_links_are_resolved_through_the_links_of_the_tree():
    source = listing(
        Entry("demo/up", "link", target=".."),
        Entry("demo/x", "dir"),
        Entry("demo/chain", "link", target="up/x/up/x/../../../../etc"),
        Entry("demo/fine", "link", target="up/demo/x"),
    )
    plan = plan_sync(source, listing(Entry("demo/out", "link", target="/elsewhere")), Filters.build())
    assert [r.path for r in plan.refused] == ["demo/chain"]
    assert sorted(a.path for a in plan.links) == ["demo/fine", "demo/up"]
    through_local = listing(Entry("demo/via", "link", target="out/x"))
    assert [
        r.path
        for r in plan_sync(
            through_local, listing(Entry("demo/out", "link", target="/elsewhere")), Filters.build()
        ).refused
    ] == ["demo/via"]


def test_incomplete_source_listing_deletes_nothing():
    source = listing(f("keep"), missing=["demo"])
    plan = plan_sync(source, listing(f("keep"), f("gone")), Filters.build(), delete=True)
    assert not plan.deletes and "nothing deleted" in plan.notes[0]


def test_checksums_decide_for_equal_sizes():
    source, dest = (
        listing(f("same"), f("differs"), f("touch", mtime=T + 9)),
        listing(f("same"), f("differs"), f("touch")),
    )
    assert checksum_candidates(source, dest, Filters.build()) == ["differs", "same", "touch"]
    sums = ({"same": "1", "differs": "2", "touch": "3"}, {"same": "1", "differs": "X", "touch": "3"})
    plan = plan_sync(source, dest, Filters.build(), checksums=sums)
    assert [(a.path, a.reason) for a in plan.copies] == [("differs", "checksum differs")]
    assert [a.path for a in plan.touches] == ["touch"] and plan.unchanged == 1


def test_stale_partial_files_are_found():
    source = listing(f("d/x.h5", size=100, mtime=T))
    dest = listing(
        f("d/.x.h5.100-1600000000.part"), f("d/.x.h5.90-1500000000.part"), f("d/.gone.h5.5-1.part"), f("d/.x.h5.part")
    )
    plan = plan_sync(source, dest, Filters.build())
    assert plan.stale_parts == ["d/.gone.h5.5-1.part", "d/.x.h5.90-1500000000.part"]
