"""Include/exclude globs: rsync-like semantics with known answers."""

from __future__ import annotations

import pytest

from moespec.sync.filters import Filters, Rule, compile_pattern


@pytest.mark.parametrize(
    "pattern,path,expected",
    [
        ("*.h5", "demo/embed/1a/embed.h5", True),  # no slash: any folder boundary
        ("*.h5", "demo/embed/1a/embed.h5.json", False),
        ("embed", "demo/embed/1a/embed.h5", True),  # a folder name covers its contents
        ("embed/", "demo/embed/1a/x.json", True),  # folder-only pattern
        ("embed.h5/", "demo/embed/1a/embed.h5", False),  # ... does not match a file
        ("embed/**", "demo/embed/1a/embed.h5", True),
        ("embed/*.h5", "demo/embed/1a/embed.h5", False),  # * stays within one component
        ("/demo/*.json", "demo/summary.json", True),  # anchored at the root
        ("/demo/*.json", "x/demo/summary.json", False),
        ("demo/*.json", "x/demo/summary.json", True),  # unanchored: any boundary
        ("**/summary.json", "summary.json", True),  # **/ matches zero folders too
        ("run_?", "run_1/a", True),
        ("run_[0-2]", "run_3/a", False),
        ("run_[!0-2]", "run_3/a", True),
        ("a.b", "axb", False),  # regex characters are literal
    ],
)
def test_pattern_semantics(pattern, path, expected):
    assert Rule("exclude", pattern).matches(path) is expected


def test_first_matching_rule_wins_and_cli_rules_come_first():
    filters = Filters.build([("include", "embed/**")], default_include=["*.json"], default_exclude=["*.h5", "*"])
    assert filters.selects("demo/embed/1a/embed.h5")  # CLI include beats the default exclude
    assert not filters.selects("demo/reduce/2b/reduce.h5")
    assert filters.selects("demo/summary.json")
    assert not filters.selects("demo/plot.png")  # the final "*"
    assert Filters.build().selects("anything/at/all")  # no rule: included


def test_partial_and_temporary_files_are_always_excluded():
    filters = Filters.build([("include", "*")])
    assert not filters.selects("demo/.embed.h5.100-1600000000.part")
    assert not filters.selects("demo/embed.h5.tmp")
    assert filters.selects("demo/notes.part")  # not hidden: not ours


@pytest.mark.parametrize("bad", ["", "/", "[abc"])
def test_bad_patterns_are_rejected(bad):
    with pytest.raises(ValueError):
        compile_pattern(bad)
