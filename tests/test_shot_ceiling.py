"""The Bayes ceiling (`fspo.eval.personal.shot_ceiling`): it must recover a user the shots identify."""

from __future__ import annotations

import random

from fspo.data.schema import Episode, Preference, User
from fspo.eval.personal import shot_ceiling
from fspo.sim import get_domain

BULLETS = {"format": {"value": "bullets", "weight": 1.0}}
PROSE = {"format": {"value": "prose", "weight": 1.0}}


def _episodes(domain, traits, n_episodes: int, shots: int) -> list[Episode]:
    """Episodes of one user whose labels follow `traits`' exact reward (pairs it cannot decide skipped)."""
    rng = random.Random(0)
    questions = domain.questions()
    prefs: list[Preference] = []
    while len(prefs) < n_episodes * (shots + 1):
        qi = rng.randrange(len(questions))
        a, b = rng.sample(domain.answers(qi, rng), 2)
        ra, rb = (domain.reward(traits, questions[qi], t) for t in (a, b))
        if abs(ra - rb) >= 0.5:
            chosen, rejected = (a, b) if ra > rb else (b, a)
            prefs.append(Preference(user_id="u", question=questions[qi], chosen=chosen, rejected=rejected))
    k = shots + 1
    return [
        Episode(episode_id=f"e{i}", user_id="u", shots=prefs[i * k : i * k + shots], query=q)
        for i in range(n_episodes)
        for q in [prefs[i * k + shots]]
    ]


def _users(*personas: dict) -> dict[str, User]:
    """The learner's hypotheses: one simulated roleplay user per persona."""
    return {
        f"h{i}": User(user_id=f"h{i}", metadata={"domain": "roleplay", "traits": traits})
        for i, traits in enumerate(personas)
    }


def _accuracy(curve: dict, n: int) -> float:
    return curve["test_unseen"][str(n)]["accuracy"]


def test_the_shots_pick_the_right_persona_out_of_two_opposite_ones() -> None:
    domain = get_domain("roleplay", traits=["format"], min_traits=1, max_traits=1)
    episodes = _episodes(domain, PROSE, n_episodes=20, shots=2)
    curve = shot_ceiling(_users(BULLETS, PROSE), {"test_unseen": episodes}, max_shots=2, eps=0.05)
    # No shots: whichever persona wins the vote is right only for the users like it; here a prose
    # user and a 1:1 prior, so pairs that differ only in format are an even vote or wrong.
    assert _accuracy(curve, 0) < 0.9
    # One shot decided by format already identifies the prose persona; two make it certain.
    assert _accuracy(curve, 2) == 1.0
    assert curve["test_unseen"]["2"]["n"] == 20


def test_a_learner_holding_only_the_wrong_persona_is_wrong_whatever_the_shots() -> None:
    domain = get_domain("roleplay", traits=["format"], min_traits=1, max_traits=1)
    episodes = _episodes(domain, PROSE, n_episodes=10, shots=2)

    # Where the query pair differs in format and not in relevance (the shared term), format decides
    # it, so a bullets-only learner must rank every such pair wrong.
    def format_only(e: Episode) -> bool:
        feats = domain.features(e.query.question, [e.query.chosen, e.query.rejected])
        d = feats[0] - feats[1]
        return d[domain.columns.index("format=bullets")] != 0 and d[-1] == 0

    only_format = [e for e in episodes if format_only(e)]
    assert only_format
    curve = shot_ceiling(_users(BULLETS), {"test_unseen": only_format}, 2, 0.05)
    assert all(_accuracy(curve, n) == 0.0 for n in range(3))
