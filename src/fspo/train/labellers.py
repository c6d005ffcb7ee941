"""Who labels on-policy samples: scores for one episode's answers, from the labeller of the training data.

`fspo.train.onpolicy` samples several answers per training episode and pairs the best with the worst
by these scores. A `Labeller` scores a batch of (user, question, answers) items:

* `ExactLabeller`: the simulated user's exact reward (`fspo.sim.reward_for`), which made the simulated
  preferences; its scores are rewards, comparable across episodes;
* `PairwiseLabeller`: any pairwise judge (``prefer(user, question, a, b) -> P(a wins)``, the interface
  of `fspo.eval.judges`) ranks an episode's answers by their mean win probability against each other;
* `SynthJudge`: the judge of `fspo synth`'s labels stage (the LLM role-plays the user's persona with
  the synth config's prompt and endpoint, both orders), which made LLM-made users' preferences.

Here, in `train`, because training reads them; `fspo.eval.judges` (a layer above) decides win rates.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from itertools import combinations
from pathlib import Path
from typing import Any, Protocol

from fspo.core.errors import UserError
from fspo.data.schema import User

JUDGE_CACHE = "judge_cache.sqlite"

Item = tuple[User, str, list[str]]  # a user, a question, answers to rank for that user


class Labeller(Protocol):
    """Scores one episode's answers for its user; higher is preferred. `absolute`: the scores are
    rewards, comparable across episodes (their mean means something), not ranks within one."""

    name: str
    absolute: bool

    def score(self, items: Sequence[Item]) -> list[list[float]]: ...


class ExactLabeller:
    """The simulated user's exact reward (`fspo.sim.reward_for`, rebuilt from the user's metadata)."""

    name = "exact"
    absolute = True

    def __init__(self, reward_for: Callable[[User], Callable[[str, str], float]] | None = None):
        from fspo.sim import reward_for as sim_reward_for

        self._reward_for = reward_for or sim_reward_for
        self._rewards: dict[str, Callable[[str, str], float]] = {}

    def score(self, items: Sequence[Item]) -> list[list[float]]:
        out = []
        for user, question, answers in items:
            if user.user_id not in self._rewards:
                self._rewards[user.user_id] = self._reward_for(user)
            out.append([self._rewards[user.user_id](question, a) for a in answers])
        return out


class PairwiseLabeller:
    """Ranks one episode's answers with a pairwise judge (the interface of `fspo.eval.judges`:
    ``prefer(user, question, a, b) -> P(a beats b)``, or `prefer_many` over such items): an answer's
    score is its mean probability of beating the others (its Copeland score), so the best and the
    worst of two answers are the judge's own verdict."""

    absolute = False

    def __init__(self, judge: Any):
        self.judge, self.name = judge, judge.name

    def score(self, items: Sequence[Item]) -> list[list[float]]:
        pairs = [(k, i, j) for k, (_, _, a) in enumerate(items) for i, j in combinations(range(len(a)), 2)]
        asks = [(items[k][0], items[k][1], items[k][2][i], items[k][2][j]) for k, i, j in pairs]
        batch = getattr(self.judge, "prefer_many", None)
        probs = batch(asks) if batch is not None else [self.judge.prefer(*ask) for ask in asks]
        wins = [[0.0] * len(a) for _, _, a in items]
        for (k, i, j), p in zip(pairs, probs, strict=True):
            wins[k][i] += p
            wins[k][j] += 1.0 - p
        return [[w / max(1, len(row) - 1) for w in row] for row in wins]


class SynthJudge:
    """The judge of `fspo synth`'s labels stage: the LLM role-plays the user's persona (its
    description) with the synth config's ``judge`` prompt and endpoint, in both orders
    (`fspo.llm.ask_both_orders`: a verdict that flips with the order is a tie). Requests are cached in
    `cache_path`, so a resumed round asks nothing twice."""

    name = "synth"

    def __init__(self, config_path: str | Path, cache_path: str | Path):
        from fspo.synth.config import load_config
        from fspo.synth.prompts import load_prompts

        self.config = load_config(config_path)
        self.prompts = load_prompts(self.config.prompts_dir)
        self.cache_path = Path(cache_path)

    def prefer_many(self, items: Sequence[tuple[User, str, str, str]]) -> list[float]:
        missing = [u.user_id for u, *_ in items if not (u.description or "").strip()]
        if missing:
            raise UserError(f"user {missing[0]!r} has no description: the synth judge role-plays it")
        return asyncio.run(self._all(items))

    async def _all(self, items: Sequence[tuple[User, str, str, str]]) -> list[float]:
        from fspo.llm import LLMClient, RequestCache, make_backend

        backend = self.config.backend
        cache = RequestCache(self.cache_path)
        client = LLMClient(make_backend(backend), backend, cache)
        try:
            return list(await asyncio.gather(*(self._prefer(client, *item) for item in items)))
        finally:
            await client.aclose()
            cache.close()

    async def _prefer(self, client: Any, user: User, question: str, a: str, b: str) -> float:
        from fspo.llm import LETTER_SCORES, BackendUnavailable, ParseFailure, ask_both_orders
        from fspo.synth.parsing import JudgeReply
        from fspo.synth.prompts import ask_prompt

        async def ask(first: str, second: str, order: str) -> float | None:
            try:
                reply = await ask_prompt(
                    client, self.prompts, "judge", JudgeReply, sample=f"{user.user_id}:{order}",
                    persona=user.description, question=question, answer_a=first, answer_b=second,
                )  # fmt: skip
            except ParseFailure:
                return None
            return LETTER_SCORES[reply.preferred]

        try:
            return (await ask_both_orders(ask, a, b)).score
        except BackendUnavailable as err:
            raise UserError(f"synth judge (model {self.config.backend.model}): {err}") from None


def make_labeller(judge: str, out: str | Path) -> Labeller:
    """The labeller of a judge spec (`OnPolicyConfig.judge`)."""
    if judge == "exact":
        return ExactLabeller()
    return PairwiseLabeller(SynthJudge(judge.partition(":")[2], Path(out) / JUDGE_CACHE))
