"""Did-you-mean suggestions that stay cheap when thousands of names are unknown.

`difflib.get_close_matches` compares a word with every name, so a file with U
unknown dependencies among N task ids costs U × N ratio computations: 4,000 of
them took minutes.  `Suggester` keeps difflib's suggestions while a per-file
budget of comparisons lasts (small files see no difference) and then answers
from an index of names one edit away — a letter dropped, added, changed, or two
swapped: what a typo is — in time proportional to the word's length.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable

CUTOFF = 0.6
"""difflib's similarity cutoff (its default)."""
DIFFLIB_BUDGET = 5_000
"""Name comparisons per `Suggester` done with difflib (≈0.1 s at worst)."""
MAX_INDEXED_LEN = 64
"""Longer names are left out of the one-edit index (it holds len+1 keys per name)."""


class Suggester:
    """The closest known name for each unknown one; near-linear in total."""

    def __init__(self, names: Iterable[str], budget: int = DIFFLIB_BUDGET) -> None:
        self.names = list(dict.fromkeys(names))
        self.budget = budget
        self._index: dict[str, list[int]] | None = None

    def hint(self, word: str) -> str:
        """`"; did you mean 'x'?"`, or "" when nothing is close."""
        match = self.closest(word)
        return f"; did you mean '{match}'?" if match else ""

    def closest(self, word: str) -> str | None:
        if not self.names:
            return None
        if len(self.names) <= self.budget:
            self.budget -= len(self.names)
            found = difflib.get_close_matches(word, self.names, n=1, cutoff=CUTOFF)
            return found[0] if found else None
        return self._one_edit(word)

    def _one_edit(self, word: str) -> str | None:
        """A name within one edit of `word` (symmetric-delete lookup), best ratio first."""
        if len(word) > MAX_INDEXED_LEN:
            return None
        index = self._index if self._index is not None else self._build()
        hits: set[int] = set()
        for key in _deletes(word):
            hits.update(index.get(key, ()))
        best: tuple[float, int] | None = None
        for i in sorted(hits):
            ratio = difflib.SequenceMatcher(None, word, self.names[i]).ratio()
            if ratio >= CUTOFF and (best is None or ratio > best[0]):
                best = (ratio, i)
        return self.names[best[1]] if best else None

    def _build(self) -> dict[str, list[int]]:
        index: dict[str, list[int]] = {}
        get = index.get
        for i, name in enumerate(self.names):
            if len(name) > MAX_INDEXED_LEN:
                continue
            for key in (name, *[name[:j] + name[j + 1:] for j in range(len(name))]):
                bucket = get(key)
                if bucket is None:
                    index[key] = [i]
                elif bucket[-1] != i:  # (a doubled letter gives the same key twice)
                    bucket.append(i)
        self._index = index
        return index


def _deletes(word: str) -> set[str]:
    """The word and every string one deletion away from it."""
    return {word, *(word[:i] + word[i + 1:] for i in range(len(word)))}


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """One-off suggestion (a few choices, e.g. the keys a section allows)."""
    return Suggester(choices).hint(word)
