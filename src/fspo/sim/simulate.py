"""`simulate`: personas + answer pools -> labelled preferences, the same way for every domain.

Steps: (1) write each question's answer pool once; (2) featurize every pooled answer once
(a matrix, one row per answer); (3) enumerate all within-question answer pairs, or the domain's
minimal pairs when it writes them (the *pair bank*, shared by all users so that users answer the
same pairs and can disagree); (4) for each persona, score the whole pool with one vectorised
product, keep the pairs whose reward gap reaches the margin, and sample the user's preferences
from them. Chosen is always the higher-reward answer.

Randomness: one `random.Random(seed)` for text and personas, one `numpy` Generator for pair
sampling; never global state, so a seed reproduces a population exactly.

Each preference also names the persona its rejected answer was written for
(`Preference.rejected_description`, from `Domain.rejected_persona`): RAT's rejected target carries it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from fspo.core.errors import UserError
from fspo.data.schema import Preference, User
from fspo.sim.base import Domain, SimData, Traits
from fspo.sim.registry import get_domain


@dataclass
class Pools:
    """Every question's answers, their features and the bank of within-question pairs."""

    questions: list[str]
    answers: list[str]
    question_of: np.ndarray  # answer index -> question index
    features: np.ndarray  # [n_answers, n_columns]
    pair_a: np.ndarray  # the bank: answer indices, a < b, same question
    pair_b: np.ndarray


def build_pools(domain: Domain, rng: random.Random) -> Pools:
    questions = domain.questions()
    answers: list[str] = []
    question_of: list[int] = []
    blocks: list[np.ndarray] = []
    pair_a: list[np.ndarray] = []
    pair_b: list[np.ndarray] = []
    for qi, question in enumerate(questions):
        pool, pairs = domain.answer_pairs(qi, rng)
        start = len(answers)
        answers += pool
        question_of += [qi] * len(pool)
        blocks.append(domain.features(question, pool))
        if pairs is None:
            ia, ib = np.triu_indices(len(pool), k=1)
        else:
            ia, ib = (np.asarray(side, dtype=np.int64) for side in zip(*pairs, strict=True))
        pair_a.append(ia + start)
        pair_b.append(ib + start)
    return Pools(
        questions=questions,
        answers=answers,
        question_of=np.asarray(question_of),
        features=np.concatenate(blocks),
        pair_a=np.concatenate(pair_a),
        pair_b=np.concatenate(pair_b),
    )


def simulate(domain: str, n_users: int, prefs_per_user: int, seed: int = 0, **domain_options: Any) -> SimData:
    """Simulate `n_users` personas of `domain`, each with up to `prefs_per_user` decided preferences.

    A persona gets fewer preferences only if its pool holds fewer decided pairs (counted in
    ``info["short_users"]``). Deterministic for a given seed and options.
    """
    if n_users < 1:
        raise UserError(f"n_users must be >= 1, got {n_users}")
    if prefs_per_user < 1:
        raise UserError(f"prefs_per_user must be >= 1, got {prefs_per_user}")
    dom = get_domain(domain, **domain_options)
    rng = random.Random(seed)
    gen = np.random.default_rng(seed)
    pools = build_pools(dom, rng)
    margin = dom.options.margin

    def gaps(traits: Traits) -> np.ndarray:
        r = dom.score(traits, pools.features)
        return r[pools.pair_a] - r[pools.pair_b]

    def decided(traits: Traits) -> float:
        return float(np.mean(np.abs(gaps(traits)) >= margin))

    def split_of(traits: Traits) -> dict[str, str]:
        split = dom.split(traits)  # None: no mark, the episode sampler holds out users at random
        return {} if split is None else {"split": split}

    users: list[User] = []
    preferences: list[Preference] = []
    refined = redrawn = short = 0
    width = max(5, len(str(n_users - 1)))
    for i in range(n_users):
        persona = dom.sample_persona(rng, decided)
        refined += persona.refinements > 0
        redrawn += persona.redraws
        uid = f"{dom.name}-{i:0{width}d}"
        users.append(
            User(
                user_id=uid,
                description=dom.describe(persona.traits),
                metadata={
                    "domain": dom.name,
                    "traits": persona.traits,
                    **split_of(persona.traits),
                    "group": dom.group(persona.traits),
                    "refinements": persona.refinements,
                },
            )
        )
        gap = gaps(persona.traits)
        ok = np.flatnonzero(np.abs(gap) >= margin)
        short += len(ok) < prefs_per_user
        for k in gen.choice(ok, size=min(prefs_per_user, len(ok)), replace=False):
            a, b = int(pools.pair_a[k]), int(pools.pair_b[k])
            chosen, rejected = (a, b) if gap[k] > 0 else (b, a)
            qi = int(pools.question_of[a])
            preferences.append(
                Preference(
                    user_id=uid,
                    question=pools.questions[qi],
                    chosen=pools.answers[chosen],
                    rejected=pools.answers[rejected],
                    rejected_description=dom.describe(
                        dom.rejected_persona(persona.traits, pools.features[chosen], pools.features[rejected])
                    ),
                    metadata={"domain": dom.name, "question_id": qi, "margin": round(abs(float(gap[k])), 4)},
                )
            )
    info = {
        "questions": len(pools.questions),
        "pooled_answers": len(pools.answers),
        "pair_bank": len(pools.pair_a),
        "refined_personas": refined,
        "redrawn_personas": redrawn,
        "short_users": short,
    }
    return SimData(dom.name, seed, dom.options.model_dump(), users, preferences, info)
