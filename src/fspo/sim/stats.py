"""Diversity and disagreement of a simulated population, computed from its records alone.

Both work on any `User`/`Preference` lists (simulated or read back from disk), so ``fspo sim stats
DIR`` reports the same numbers as the run that wrote DIR.

Disagreement: the paper's point is that users *disagree* on the same pair, otherwise one generic
reward model would do. For two groups of users g and h, over the pairs labelled by both, we report
the probability that a random labeller from g and one from h pick different answers. Groups are user
types (``metadata.group``: the persona's heaviest trait), or single users for a sample of them.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fspo.data.schema import Preference, User
from fspo.sim.text import words


@dataclass
class Disagreement:
    """`matrix[i, j]`: disagreement between `labels[i]` and `labels[j]` (NaN: no shared pairs)."""

    labels: list[str]
    matrix: np.ndarray
    shared: np.ndarray  # number of pairs both groups labelled
    contested_pairs: float  # share of multiply-labelled pairs whose labels are not unanimous

    def summary(self) -> dict[str, Any]:
        off = self.matrix[~np.eye(len(self.labels), dtype=bool)]
        off = off[~np.isnan(off)]
        diag = np.diag(self.matrix)
        diag = diag[~np.isnan(diag)]
        return {
            "groups": len(self.labels),
            "mean_between_groups": round(float(off.mean()), 4) if off.size else None,
            "max_between_groups": round(float(off.max()), 4) if off.size else None,
            "mean_within_groups": round(float(diag.mean()), 4) if diag.size else None,
            "contested_pairs": round(self.contested_pairs, 4),
        }


def _pair_key(p: Preference) -> tuple[tuple[str, str, str], bool]:
    first, second = sorted((p.chosen, p.rejected))
    return (p.question, first, second), p.chosen == first


def disagreement_matrix(
    users: Sequence[User],
    preferences: Sequence[Preference],
    group_by: str = "group",
    max_groups: int = 40,
    seed: int = 0,
) -> Disagreement:
    """Pairwise disagreement between user groups (``group_by="group"``) or users (``"user"``).

    With more than `max_groups` groups, a seeded sample of them is used (the whole population is
    still used for `contested_pairs`).
    """
    group_of = {
        u.user_id: (u.user_id if group_by == "user" else str((u.metadata or {}).get(group_by, u.user_id)))
        for u in users
    }
    labels = sorted(set(group_of.values()))
    if len(labels) > max_groups:
        labels = sorted(random.Random(seed).sample(labels, max_groups))
    index = {g: i for i, g in enumerate(labels)}
    pair_index: dict[tuple[str, str, str], int] = {}
    firsts: dict[tuple[int, int], int] = defaultdict(int)
    totals: dict[tuple[int, int], int] = defaultdict(int)
    votes: dict[int, list[int]] = defaultdict(lambda: [0, 0])
    for p in preferences:
        key, first_wins = _pair_key(p)
        k = pair_index.setdefault(key, len(pair_index))
        votes[k][0] += first_wins
        votes[k][1] += 1
        g = index.get(group_of.get(p.user_id, ""), -1)
        if g >= 0:
            firsts[k, g] += first_wins
            totals[k, g] += 1
    multi = [v for v in votes.values() if v[1] > 1]
    contested = sum(0 < a < n for a, n in multi) / len(multi) if multi else 0.0

    n_pairs, n_groups = len(pair_index), len(labels)
    a = np.zeros((n_pairs, n_groups))
    n = np.zeros((n_pairs, n_groups))
    for (k, g), t in totals.items():
        n[k, g] = t
        a[k, g] = firsts[k, g]
    seen = (n > 0).astype(float)
    p_first = np.divide(a, n, out=np.zeros_like(a), where=n > 0)
    p_second = seen - p_first
    shared = seen.T @ seen
    differ = p_first.T @ p_second + p_second.T @ p_first
    matrix = np.divide(differ, shared, out=np.full_like(differ, np.nan), where=shared > 0)
    # Within a group: two *different* labellers of the same pair (needs two labels of it).
    two = n >= 2
    within = np.where(two, 2 * a * (n - a) / np.maximum(n * (n - 1), 1), 0.0)
    counts = two.sum(axis=0)
    diag = np.divide(within.sum(axis=0), counts, out=np.full(n_groups, np.nan), where=counts > 0)
    matrix[np.diag_indices(n_groups)] = diag
    return Disagreement(labels, matrix, shared.astype(int), contested)


def _ngrams(tokens: list[str], n: int) -> set[tuple[str, ...]]:
    return set(zip(*(tokens[i:] for i in range(n)), strict=False))


def stats(
    data: Any = None, *, users: Sequence[User] | None = None, preferences: Sequence[Preference] | None = None
) -> dict[str, Any]:
    """Size, diversity, trait coverage and disagreement of a population (`SimData` or records)."""
    users = list(users if users is not None else data.users)
    preferences = list(preferences if preferences is not None else data.preferences)
    answers = sorted({t for p in preferences for t in (p.chosen, p.rejected)})
    questions = sorted({p.question for p in preferences})
    answer_tokens = [words(t) for t in answers]
    lengths = np.array([len(t) for t in answer_tokens]) if answers else np.zeros(1)
    vocabulary = {w for toks in answer_tokens for w in toks}
    vocabulary |= {w for q in questions for w in words(q)}
    vocabulary |= {w for u in users for w in words(u.description or "")}
    per_user = Counter(p.user_id for p in preferences)
    counts = np.array([per_user.get(u.user_id, 0) for u in users]) if users else np.zeros(1)
    splits = Counter(str((u.metadata or {}).get("split", "?")) for u in users)
    coverage: Counter[str] = Counter()
    for u in users:
        for trait, spec in ((u.metadata or {}).get("traits") or {}).items():
            coverage[f"{trait}={spec.get('value')}"] += 1
    margins = [
        p.metadata.get("margin") for p in preferences if isinstance(p.metadata.get("margin"), int | float)
    ]
    domains = sorted({str((u.metadata or {}).get("domain")) for u in users})
    return {
        "domain": domains[0] if len(domains) == 1 else domains,
        "users": len(users),
        "splits": dict(sorted(splits.items())),
        "preferences": len(preferences),
        "preferences_per_user": {
            "min": int(counts.min()),
            "mean": round(float(counts.mean()), 2),
            "max": int(counts.max()),
        },
        "questions": len(questions),
        "distinct_answers": len(answers),
        "answer_words": {
            "min": int(lengths.min()),
            "p5": int(np.percentile(lengths, 5)),
            "median": int(np.median(lengths)),
            "p95": int(np.percentile(lengths, 95)),
            "max": int(lengths.max()),
        },
        "distinct_ngrams": {
            f"{n}-grams": len(set().union(*(_ngrams(t, n) for t in answer_tokens))) if answers else 0
            for n in (1, 2, 3)
        },
        "vocabulary": len(vocabulary),
        "distinct_descriptions": len({u.description for u in users}),
        "trait_coverage": dict(sorted(coverage.items())),
        "refined_personas": sum(1 for u in users if (u.metadata or {}).get("refinements", 0) > 0),
        "mean_margin": round(float(np.mean(margins)), 4) if margins else None,
        "disagreement": disagreement_matrix(users, preferences).summary(),
    }
