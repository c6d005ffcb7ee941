"""Pairwise questions asked in both orders: "which answer is better, A or B?" with a shown as A, then
with b shown as A.

LLMs favour a position (often the first answer). Asking both orders and combining the verdicts
cancels that bias instead of averaging it into the result: a verdict that flips with the order is a
tie. The synth labels stage and the judges all ask through `ask_both_orders` (or `both_orders`, for
a judge computing in-process), so they share one combination rule.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

# What a letter verdict says about the answer shown as A: it won (1.0) or lost (0.0).
LETTER_SCORES = {"A": 1.0, "B": 0.0}


@dataclass(frozen=True)
class BothOrders:
    """The verdicts on one pair (a, b). `ab`: asked with a shown as A; `ba`: with b shown as A.

    Each is the probability that the answer shown as A wins (1.0 / 0.0 for a letter verdict, any value
    between for a judge that gives probabilities), or None when the model gave no usable verdict.
    """

    ab: float | None
    ba: float | None

    @property
    def answered(self) -> bool:
        return self.ab is not None and self.ba is not None

    @property
    def score(self) -> float:
        """P(a wins): the mean over both orders; a missing verdict makes the pair a tie (0.5)."""
        if self.ab is None or self.ba is None:
            return 0.5
        return (self.ab + (1.0 - self.ba)) / 2

    @property
    def winner(self) -> str | None:
        """'a' or 'b' when the orders agree on one; None for a tie or a missing verdict."""
        if not self.answered or self.score == 0.5:
            return None
        return "a" if self.score > 0.5 else "b"

    @property
    def flipped(self) -> bool:
        """Both orders answered, and the verdict followed the position, not the answer."""
        return self.answered and self.winner is None

    def letters(self) -> tuple[str | None, str | None]:
        """The (ab, ba) letter verdicts ('A', 'B' or None) of a letter-verdict pair."""
        return _letter(self.ab), _letter(self.ba)


def _letter(p: float | None) -> str | None:
    return next((k for k, v in LETTER_SCORES.items() if v == p), None)


def _same(a: str, b: str) -> bool:
    """Identical answers are a tie without asking: there is nothing to judge."""
    return a.strip() == b.strip()


def both_orders(ask: Callable[[str, str, str], float | None], a: str, b: str) -> BothOrders:
    """`ask(shown_as_a, shown_as_b, order)` for (a, b, "ab") then (b, a, "ba"), for judges that
    compute their verdict in-process (a local model); see `ask_both_orders` for `ask`'s contract."""
    if _same(a, b):
        return BothOrders(None, None)
    return BothOrders(ask(a, b, "ab"), ask(b, a, "ba"))


async def ask_both_orders(
    ask: Callable[[str, str, str], Awaitable[float | None]], a: str, b: str
) -> BothOrders:
    """`ask(shown_as_a, shown_as_b, order)` for (a, b, "ab") and (b, a, "ba"), concurrently.

    `ask` returns the probability that the answer shown as A wins (`LETTER_SCORES[letter]` for a
    letter verdict) or None. Identical answers are a tie without asking.
    """
    if _same(a, b):
        return BothOrders(None, None)
    ab, ba = await asyncio.gather(ask(a, b, "ab"), ask(b, a, "ba"))
    return BothOrders(ab, ba)
