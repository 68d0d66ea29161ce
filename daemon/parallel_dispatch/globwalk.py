"""Globs over a project without following symlinked folders.

`glob.glob(..., recursive=True)` follows them, so one link back up the tree
(`src/x/up -> ..`) made a `**` glob in a task file run for ever, at validation
(`foreach: files:`) or at run time (a task's `files:`, hashed into its fingerprint).
"""

from __future__ import annotations

import fnmatch
import glob
import os
from pathlib import Path


def glob_files(root: Path, pattern: str) -> list[str]:
    """What `glob.glob(root/pattern, recursive=True)` finds, as paths relative to `root`,
    without following symlinked folders: `glob` follows them, so a link back up the tree
    (`src/x/up -> ..`) made a `**` glob run for ever. Hidden names match only a pattern
    part that starts with '.', as in `glob`; a symlinked file still matches."""
    parts = tuple(p for p in pattern.split("/") if p not in ("", "."))
    fixed: list[str] = []
    for part in parts:  # walk from the longest literal prefix, not the whole project
        if glob.has_magic(part) or part == "**":
            break
        fixed.append(part)
    start = os.path.join(root, *fixed)
    if len(fixed) == len(parts):  # no wildcard: the path itself, as glob gives it
        return ["/".join(parts)] if parts and os.path.lexists(start) else []
    hidden = any(p.startswith(".") for p in parts)
    matcher = _PartsMatcher(parts)
    found = []
    for here, dirs, names in os.walk(start, followlinks=False):
        rel_dir = os.path.relpath(here, root)
        base = () if rel_dir == "." else tuple(rel_dir.split(os.sep))
        dirs[:] = [d for d in dirs if (hidden or not d.startswith("."))
                   and matcher.can_descend((*base, d))]  # as glob: only where it may match
        for name in names:
            if matcher.matches((*base, name)):
                found.append("/".join((*base, name)))
    return found


class _PartsMatcher:
    """A glob pattern's parts (`**` = any number of folders) against a path's parts,
    memoised: `**/**/**/x` against a deep path is polynomial, not exponential."""

    def __init__(self, pattern: tuple[str, ...]) -> None:
        self.pattern = pattern

    def matches(self, path: tuple[str, ...]) -> bool:
        return self._reach(path, prefix=False)

    def can_descend(self, folder: tuple[str, ...]) -> bool:
        """Whether something below `folder` could match: `*.md` never looks below the
        root, `src/*/x.py` never below `src/a/`'s children."""
        return self._reach(folder, prefix=True)

    def _reach(self, path: tuple[str, ...], prefix: bool) -> bool:
        """Whether the pattern matches `path` whole, or (`prefix`) could go on below it."""
        memo: dict[tuple[int, int], bool] = {}

        def at(i: int, j: int) -> bool:
            if (i, j) in memo:
                return memo[i, j]
            if prefix and i == len(path):
                ok = j < len(self.pattern)  # a part is left for what lies below
            elif j == len(self.pattern):
                ok = i == len(path)
            elif self.pattern[j] == "**":
                ok = at(i, j + 1) or (i < len(path) and not path[i].startswith(".")
                                      and at(i + 1, j))
            elif i == len(path):
                ok = False
            else:
                part, name = self.pattern[j], path[i]
                ok = (not name.startswith(".") or part.startswith(".")) and \
                    fnmatch.fnmatchcase(name, part) and at(i + 1, j + 1)
            memo[i, j] = ok
            return ok

        return at(0, 0)
