"""Surface-level text measurements shared by every simulated domain.

Why these are so plain: a simulated user's reward is applied to *any* string, most importantly
to what a small model generates. So every detector is a count over lowercase word tokens or a
line/punctuation pattern: defined on the empty string, on garbage and on megabytes of text, and
capped so that repeating a marker a hundred times earns no more than using it twice.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

_WORD = re.compile(r"[a-z]+")
_BULLET = re.compile(r"^[ \t]*- \S", re.MULTILINE)
_SENTENCE_END = re.compile(r"[.!?\n]+")


def wordlist(text: str) -> list[str]:
    """Whitespace-separated words: keeps long word lists in the source readable."""
    return text.split()


def wordset(text: str) -> frozenset[str]:
    return frozenset(text.split())


# Small function words that never carry a question's topic (used when a question is not ours).
STOPWORDS = wordset(
    "a an the and or but of to in on at for with about from by as is are was were be been it its this "
    "that these those i you he she we they me my your our their what which who whom how why when where "
    "can could should would will do does did get got have has had not no so if than then there here "
    "good way start know enjoy better people some any more most much many one two please tell explain "
    "write review movie idea behind"
)


def words(text: str) -> list[str]:
    """Lowercase alphabetic tokens; punctuation, digits and symbols are separators."""
    return _WORD.findall(text.lower())


def normalized(text: str) -> str:
    """Tokens joined by single spaces, so multi-word markers match across punctuation/newlines."""
    return " ".join(words(text))


def phrase_pattern(phrases: Iterable[str]) -> re.Pattern[str]:
    """A regex counting whole-word occurrences of any phrase in `normalized` text."""
    alternatives = sorted({p.lower() for p in phrases}, key=len, reverse=True)
    return re.compile(r"\b(?:" + "|".join(re.escape(p) for p in alternatives) + r")\b")


def count_words(counts: Counter[str], vocabulary: Iterable[str]) -> int:
    return sum(counts[w] for w in vocabulary)


def capped(count: float, cap: float) -> float:
    """`count / cap` clipped to [0, 1]: the marker is fully present after `cap` uses."""
    return min(max(count, 0.0), cap) / cap


def ramp(value: float, low: float, high: float) -> float:
    """0 at or below `low`, 1 at or above `high`, linear in between."""
    return min(max((value - low) / (high - low), 0.0), 1.0)


def bullet_lines(text: str) -> int:
    return len(_BULLET.findall(text))


def ends_with_question(text: str) -> bool:
    return text.rstrip().endswith("?")


def sentence_lengths(text: str) -> list[int]:
    """Words per sentence (sentences end at . ! ? or a line break); empty sentences are skipped."""
    return [n for n in (len(words(s)) for s in _SENTENCE_END.split(text)) if n]


def keyword_coverage(tokens: set[str], keywords: Iterable[str], needed: int) -> float:
    """Fraction of `needed` distinct `keywords` present: the relevance term every user shares."""
    keys = set(keywords)
    if not keys:
        return 0.0
    return min(len(keys & tokens), needed) / min(needed, len(keys))


def content_words(text: str) -> list[str]:
    """The words of an unknown question that may name its topic (fallback keywords)."""
    return [w for w in words(text) if w not in STOPWORDS and len(w) > 2]
