"""`reward_for`: a simulated user's exact reward, rebuilt from its `User` record alone.

Why from the record: the judge that scores a model's generated answers may run in another process,
days later, with only ``users.jsonl`` at hand. Everything the reward needs (domain, traits,
weights) is in `User.metadata`; the question's keywords are read off the question text itself.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

from fspo.core.errors import UserError
from fspo.data.schema import User
from fspo.sim.base import Domain
from fspo.sim.registry import get_domain


@cache
def _domain(name: str) -> Domain:
    # Rewards never depend on generation options (pool size, margin), so defaults are exact.
    return get_domain(name)


def reward_for(user: User) -> Callable[[str, str], float]:
    """``r_u(question, text)``: the user's exact reward of `text` as an answer to `question`.

    Accepts any strings (empty, garbage, very long). Raises `UserError` if the record does not
    carry simulated-user metadata.
    """
    meta = user.metadata or {}
    name = meta.get("domain")
    if not isinstance(name, str):
        raise UserError(f"user {user.user_id!r} has no metadata.domain: not a simulated user")
    domain = _domain(name)
    traits = domain.check_traits(meta.get("traits"))

    def reward(question: str, text: str) -> float:
        return domain.reward(traits, str(question), str(text))

    return reward


# Rewards closer than this are a tie. A reward is a weighted sum of features in floating point, so two
# answers a user values equally can come out a few ulps apart (0.1 + 0.2 != 0.3): that noise must not
# decide a pair.
# One rule for every judge of a simulated user: `prefer` (the online study's simulated votes) and
# `fspo.eval.judges.ExactRewardJudge` (the offline win rate) both decide with `prefer_rewards`.
TIE_MARGIN = 1e-9


def prefer_rewards(ra: float, rb: float, tie_margin: float = TIE_MARGIN) -> float:
    """1 when reward `ra` beats `rb`, 0 when it loses, 0.5 when they are within `tie_margin`."""
    diff = ra - rb
    if abs(diff) <= tie_margin:
        return 0.5
    return 1.0 if diff > 0 else 0.0


def prefer(user: User, question: str, a: str, b: str, tie_margin: float = TIE_MARGIN) -> float:
    """Probability that `user` prefers `a` over `b` by their exact reward: 1, 0, or 0.5 on a tie
    (the judge API)."""
    r = reward_for(user)
    return prefer_rewards(r(question, a), r(question, b), tie_margin)
