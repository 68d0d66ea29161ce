"""`writes:` globs: which tasks of the shared tree must never run at the same time.

Two tasks clash when some path could match a glob of each.  Deciding that exactly is
regular-language intersection; this errs on the safe side instead: `**` is exact (zero or
more path segments), and two segments with wildcards are taken to meet unless their
literal heads or tails rule it out (`*.py` and `*.md` never meet; `a*` and `*b` might).
A glob ending in `/` covers everything below that folder.  A false clash only costs
parallelism; a missed one would let two agents edit the same file at once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache

_WILD = re.compile(r"[*?\[]")


def normalise(pattern: str) -> tuple[str, ...]:
    """`src/` → (`src`, `**`); `./a//b` → (`a`, `b`)."""
    text = pattern.strip()
    if text.endswith("/"):
        text += "**"
    return tuple(part for part in text.split("/") if part not in ("", "."))


def _literal_ends(segment: str) -> tuple[str, str]:
    """The literal text before the first wildcard and after the last one."""
    first = _WILD.search(segment)
    assert first is not None
    last = max(m.end() for m in re.finditer(r"\*|\?|\[[^\]]*\]", segment))
    return segment[:first.start()], segment[last:]


def _segments_meet(a: str, b: str) -> bool:
    wild_a, wild_b = bool(_WILD.search(a)), bool(_WILD.search(b))
    if not wild_a and not wild_b:
        return a == b
    if not wild_a or not wild_b:  # a literal against a pattern: match it exactly
        literal, pattern = (a, b) if not wild_a else (b, a)
        return re.fullmatch(_fnmatch_regex(pattern), literal) is not None
    head_a, tail_a = _literal_ends(a)
    head_b, tail_b = _literal_ends(b)
    return ((head_a.startswith(head_b) or head_b.startswith(head_a))
            and (tail_a.endswith(tail_b) or tail_b.endswith(tail_a)))


def _fnmatch_regex(segment: str) -> str:
    import fnmatch

    return fnmatch.translate(segment).removeprefix("(?s:").removesuffix(")\\Z")


@lru_cache(maxsize=4096)
def patterns_meet(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether some path could match both normalised globs (see the module docstring)."""
    if not a and not b:
        return True
    if a and a[0] == "**":
        return patterns_meet(a[1:], b) or (bool(b) and patterns_meet(a, b[1:]))
    if b and b[0] == "**":
        return patterns_meet(a, b[1:]) or (bool(a) and patterns_meet(a[1:], b))
    if not a or not b:
        return False
    return _segments_meet(a[0], b[0]) and patterns_meet(a[1:], b[1:])


def clash(a: Sequence[str], b: Sequence[str]) -> tuple[str, str] | None:
    """The first pair of globs, one from each list, that could name the same path."""
    for pa in a:
        for pb in b:
            if patterns_meet(normalise(pa), normalise(pb)):
                return pa, pb
    return None


def clashes(writes: Sequence[Sequence[str]]) -> dict[tuple[int, int], tuple[str, str]]:
    """Every pair of tasks (i < j) whose `writes:` clash, with the globs that do."""
    found: dict[tuple[int, int], tuple[str, str]] = {}
    declared = [i for i, w in enumerate(writes) if w]
    for n, i in enumerate(declared):
        for j in declared[n + 1:]:
            pair = clash(writes[i], writes[j])
            if pair is not None:
                found[(i, j)] = pair
    return found
