"""Word n-gram Jaccard similarity with an exact prefix-filter index.

``shingles(text, n)`` is the set of word n-grams of the case-folded text (words are runs of
letters/digits, so punctuation and spacing do not matter); a text shorter than n words is
one gram.

``SimilarityIndex`` answers "which indexed set has Jaccard >= t with this one?" without
comparing every pair: under one global order of grams (rarest first), two sets with
Jaccard >= t must share a gram among the first ``|S| - ceil(t * |S|) + 1`` grams of each
(the prefix-filtering lemma), so only sets sharing a prefix gram are compared, exactly.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Iterable

Gram = tuple[str, ...]
_WORD = re.compile(r"\w+")


def shingles(text: str, n: int) -> frozenset[Gram]:
    words = _WORD.findall(text.casefold())
    if len(words) <= n:
        return frozenset([tuple(words)])
    return frozenset(tuple(words[i : i + n]) for i in range(len(words) - n + 1))


def jaccard(a: frozenset[Gram], b: frozenset[Gram]) -> float:
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def gram_order(sets: Iterable[frozenset[Gram]]) -> dict[Gram, int]:
    """A global order of grams: rarest first, ties broken by the gram itself."""
    freq: Counter[Gram] = Counter()
    for s in sets:
        freq.update(s)
    return {g: i for i, g in enumerate(sorted(freq, key=lambda g: (freq[g], g)))}


class SimilarityIndex:
    """Sets added under keys; ``best(s)`` is the indexed key with the highest Jaccard >= threshold."""

    def __init__(self, threshold: float, order: dict[Gram, int]):
        self.threshold = threshold
        self.order = order
        self._sets: dict[Hashable, frozenset[Gram]] = {}
        self._postings: dict[Gram, list[Hashable]] = {}

    def _prefix(self, s: frozenset[Gram]) -> list[Gram]:
        ranked = sorted(s, key=lambda g: (self.order.get(g, -1), g))
        keep = len(ranked) - math.ceil(self.threshold * len(ranked)) + 1
        return ranked[: max(1, keep)]

    def add(self, key: Hashable, s: frozenset[Gram]) -> None:
        self._sets[key] = s
        for g in self._prefix(s):
            self._postings.setdefault(g, []).append(key)

    def best(self, s: frozenset[Gram]) -> tuple[Hashable, float] | None:
        candidates: dict[Hashable, None] = {}
        for g in self._prefix(s):
            for key in self._postings.get(g, ()):
                candidates[key] = None
        found: tuple[Hashable, float] | None = None
        for key in candidates:
            score = jaccard(s, self._sets[key])
            if score >= self.threshold and (found is None or score > found[1]):
                found = (key, score)
        return found
