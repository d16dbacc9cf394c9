"""Include/exclude globs, rsync-like: ordered rules, the first match decides.

Patterns are matched against paths relative to the sync root (``demo/embed/1a2b/embed.h5``):

- ``*`` matches within one path component, ``**`` across components, ``?`` one character,
  ``[abc]`` / ``[!abc]`` a character class;
- a pattern that starts with ``/`` is anchored at the root; otherwise it may match at any folder
  boundary (``embed/**`` matches ``demo/embed/1a2b/embed.h5``);
- a pattern matches a file when it matches the file's path or the path of one of its folders, so
  ``--exclude embed`` leaves out everything under any folder called ``embed``; a trailing ``/``
  restricts the pattern to folders.

Unlike rsync, a rule never hides a folder from the rules after it: every file is tested against
every rule, so ``--include '*.json' --exclude '*'`` selects the JSON files at every depth.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Literal

#: Never transferred, never deleted: artifacts being written (``*.tmp``, see artifacts.py) and
#: the partial files of this tool (``.name....part``).
ALWAYS_EXCLUDED = ("*.tmp", ".*.part")


def _translate(body: str) -> str:
    """Regex for a glob body (no leading/trailing ``/``)."""
    out, i, n = [], 0, len(body)
    while i < n:
        char = body[i]
        if body.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif body.startswith("**", i):
            out.append(".*")
            i += 2
        elif char == "*":
            out.append("[^/]*")
            i += 1
        elif char == "?":
            out.append("[^/]")
            i += 1
        elif char == "[":
            end = body.find("]", i + 2 if body.startswith("[!", i) or body.startswith("[]", i) else i + 1)
            if end < 0:
                raise ValueError(f"unclosed '[' in pattern '{body}'")
            inner = body[i + 1 : end]
            if inner.startswith("!"):
                inner = "^" + inner[1:]
            out.append("[" + inner.replace("\\", "\\\\") + "]")
            i = end + 1
        else:
            out.append(re.escape(char))
            i += 1
    return "".join(out)


@lru_cache(maxsize=512)
def compile_pattern(pattern: str) -> re.Pattern:
    """Compile one glob into a regex over relative paths (see the module docstring).

    Raises
    ------
    ValueError
        The pattern is empty or malformed.
    """
    if not pattern or pattern in ("/", "//"):
        raise ValueError(f"'{pattern}' is not a pattern")
    anchored = pattern.startswith("/")
    folders_only = pattern.endswith("/")
    body = pattern.strip("/")
    if not body:
        raise ValueError(f"'{pattern}' is not a pattern")
    prefix = "" if anchored else "(?:.*/)?"
    # a folder pattern must be followed by more path; a plain one may also match a whole folder
    suffix = "/.*" if folders_only else "(?:/.*)?"
    return re.compile(f"^{prefix}{_translate(body)}{suffix}$", re.DOTALL)


@dataclass(frozen=True)
class Rule:
    """One filter rule: include or exclude what ``pattern`` matches."""

    action: Literal["include", "exclude"]
    pattern: str

    def matches(self, path: str, is_dir: bool = False) -> bool:
        # a folder is matched as "its path/", so that folder-only patterns apply to it
        return bool(compile_pattern(self.pattern).match(path + "/" if is_dir else path))


@dataclass(frozen=True)
class Filters:
    """Ordered rules; paths that match no rule are included."""

    rules: tuple[Rule, ...] = ()

    @classmethod
    def build(
        cls,
        cli_rules: Iterable[tuple[str, str]] = (),
        default_include: Iterable[str] = (),
        default_exclude: Iterable[str] = (),
    ) -> "Filters":
        """Command-line rules first (in their order), then a remote's defaults (includes first)."""
        rules = [Rule("exclude", p) for p in ALWAYS_EXCLUDED]
        rules += [Rule(action, pattern) for action, pattern in cli_rules]
        rules += [Rule("include", p) for p in default_include]
        rules += [Rule("exclude", p) for p in default_exclude]
        for rule in rules:
            compile_pattern(rule.pattern)
        return cls(tuple(rules))

    def decide(self, path: str, is_dir: bool = False) -> Rule | None:
        """The first rule that matches ``path``, or None."""
        return next((rule for rule in self.rules if rule.matches(path, is_dir)), None)

    def selects(self, path: str, is_dir: bool = False) -> bool:
        """Whether ``path`` is transferred (and, with ``--delete``, whether it may be deleted)."""
        rule = self.decide(path, is_dir)
        return rule is None or rule.action == "include"
