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


def prefer(user: User, question: str, a: str, b: str) -> float:
    """Probability that `user` prefers `a` over `b`: 1, 0, or 0.5 on an exact tie (the judge API)."""
    r = reward_for(user)
    ra, rb = r(question, a), r(question, b)
    return 1.0 if ra > rb else 0.0 if ra < rb else 0.5
