"""Whether a generated answer degenerated into a repetition loop, the way a small model's decoding does.

Here, below `train` and `eval`, because both read it: the report counts each system's loops
(`fspo.eval.personal.loop_shares`), and on-policy training (`fspo.train.onpolicy`) counts the loops
among the answers it trains on, so that a reward that rises by looping shows.

Why hand-written: a loop is defined here for fspo's reports rather than taken from a text-quality
library; the definition is a dozen lines over word ids.
"""

from __future__ import annotations

import numpy as np

LOOP_MIN_WORDS = 12


def repetition_loop(text: str, min_words: int = LOOP_MIN_WORDS) -> bool:
    """Whether `text` holds a repetition loop: a stretch of at least `min_words` consecutive words
    (split at whitespace, compared case-insensitively, punctuation kept) in which every word equals the
    word n places before it, for some period n, and that holds two or more whole copies of its n-word
    unit (the stretch is at least 2n words long).

    So a unit repeated back to back until it fills `min_words` is a loop ("ha" twelve times, "I love
    it." four times, a sentence of six or more words twice); a short repeat ("very very good"), a
    phrase that comes back after other words, or a list whose items share a start are not.
    """
    words = text.lower().split()
    if len(words) < min_words:
        return False
    index: dict[str, int] = {}
    ids = np.array([index.setdefault(w, len(index)) for w in words])
    for n in range(1, len(words) // 2 + 1):
        same = np.concatenate(([0], (ids[n:] == ids[:-n]).astype(np.int8), [0]))
        edges = np.diff(same)
        runs = np.flatnonzero(edges == -1) - np.flatnonzero(edges == 1)  # runs of word == word n before
        longest = int(runs.max()) if runs.size else 0
        if longest >= n and longest + n >= min_words:
            return True
    return False
