"""Judges: who decides which of two answers a user prefers.

Every judge has one method, ``prefer(user, question, a, b) -> float``: the probability that answer
`a` wins for `user` (0.5 is a tie). Win rates, reports and the CLI only ever see that interface,
so a simulated user's exact reward and an LLM judge are interchangeable.

* `ExactRewardJudge` - the simulated user's own reward (`fspo.sim.reward_for`). Exact, free and
  deterministic: the primary judge of this project, since LLM judges are unreliable on
  personalization (people have been found to rate personalized answers no better than generic
  ones while LLM judges rate them higher).
* `OpenAIJudge` - any OpenAI-compatible endpoint with an AlpacaEval-style pairwise prompt extended
  with the user's description, through `fspo.llm.LLMClient`. Each pair is asked in BOTH orders
  (`fspo.llm.ask_both_orders`) and a verdict that flips with the order counts as a tie, which
  cancels position bias instead of averaging it in.
* `LocalJudge` - a transformers model; compares next-token probabilities of "A" and "B", both orders.
"""

from __future__ import annotations

import asyncio
import os
import re
import threading
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any, Protocol, TypeVar, runtime_checkable

from fspo.core.errors import UserError
from fspo.data.schema import User
from fspo.llm import (
    LETTER_SCORES,
    BackendConfig,
    BackendUnavailable,
    ClientStats,
    LLMClient,
    ParseError,
    ParseFailure,
    RequestCache,
    ask_both_orders,
    both_orders,
    make_backend,
)

PROMPTS = Path(__file__).parent / "prompts"
NO_DESCRIPTION = "(no description of this user is available)"
REASK = "Answer with a single letter: A or B."
MAX_WORKERS = 64
RewardFn = Callable[[str, str], float]
T = TypeVar("T")


@runtime_checkable
class Judge(Protocol):
    """The one judge interface: the probability that `a` beats `b` for `user` (0.5 = tie)."""

    name: str

    def prefer(self, user: User, question: str, a: str, b: str) -> float: ...


def prefer_many(judge: Judge, items: Sequence[tuple[User, str, str, str]], workers: int = 1) -> list[float]:
    """`judge.prefer` over many (user, question, a, b) items; judges with I/O may run them in threads."""
    batch = getattr(judge, "prefer_many", None)
    if batch is not None:
        return list(batch(items, workers=workers))
    return [judge.prefer(*item) for item in items]


# --------------------------------------------------------------------------------------------- exact
def _sim_reward_for(user: User) -> RewardFn:
    from fspo.sim import reward_for

    return reward_for(user)


class ExactRewardJudge:
    """The simulated user's exact reward decides: higher reward wins, equal rewards tie.

    Rewards closer than `tie_margin` (default `fspo.sim.reward.TIE_MARGIN`) count as ties, by the
    rule of `fspo.sim.reward.prefer_rewards`, so this judge decides every pair as the study's
    simulated participants (`fspo.sim.reward.prefer`) vote on it. `reward_for` is injectable (tests,
    other simulators); by default it is `fspo.sim.reward_for`, which rebuilds the user's reward from
    `User.metadata`.
    """

    name = "exact"

    def __init__(self, reward_for: Callable[[User], RewardFn] | None = None, tie_margin: float | None = None):
        from fspo.sim.reward import TIE_MARGIN, prefer_rewards  # fspo.sim only when this judge is used

        self._reward_for = reward_for or _sim_reward_for
        self._cache: dict[str, RewardFn] = {}
        self._decide = prefer_rewards
        self.tie_margin = TIE_MARGIN if tie_margin is None else tie_margin

    def reward(self, user: User) -> RewardFn:
        if user.user_id not in self._cache:
            try:
                self._cache[user.user_id] = self._reward_for(user)
            except (KeyError, ValueError, TypeError) as err:
                raise UserError(
                    f"user {user.user_id!r}: cannot rebuild its exact reward from metadata ({err}); "
                    "the exact judge only works for simulated users"
                ) from err
        return self._cache[user.user_id]

    def prefer(self, user: User, question: str, a: str, b: str) -> float:
        fn = self.reward(user)
        return self._decide(fn(question, a), fn(question, b), self.tie_margin)


# ------------------------------------------------------------------------------------------- prompts
@dataclass(frozen=True)
class PairwisePrompt:
    """The judge prompt (system + user message), read from `fspo/eval/prompts/` template files."""

    system: str
    user: Template

    @classmethod
    def load(cls, folder: str | Path = PROMPTS, name: str = "pairwise") -> PairwisePrompt:
        folder = Path(folder)
        try:
            system = (folder / f"{name}_system.txt").read_text(encoding="utf-8").strip()
            user = (folder / f"{name}_user.txt").read_text(encoding="utf-8").strip()
        except FileNotFoundError as err:
            raise UserError(f"judge prompt template not found: {err.filename}") from err
        return cls(system, Template(user))

    def render(self, user: User, question: str, first: str, second: str) -> str:
        return self.user.substitute(
            description=(user.description or "").strip() or NO_DESCRIPTION,
            question=question.strip(),
            output_a=first.strip(),
            output_b=second.strip(),
        )


_VERDICT = re.compile(r"^[\s\"'*(\[]*(?:(?:response|output|answer)\s*)?\(?([AB])\b", re.IGNORECASE)


def parse_verdict(text: str | None) -> str | None:
    """'A' or 'B' from a judge's reply, or None when the reply is malformed (then we re-ask)."""
    if not text:
        return None
    match = _VERDICT.match(text.strip())
    return match.group(1).upper() if match else None


def _parse_letter(text: str) -> str:
    verdict = parse_verdict(text)
    if verdict is None:
        raise ParseError("the reply does not start with A or B")
    return verdict


def _reask(error: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"{REASK} ({error})"}]


# ------------------------------------------------------------------------------------------ openai
@dataclass
class JudgeUsage:
    """What a judge run cost: the LLM client's counters (requests sent and answered, cache hits,
    retries, re-asks, replies that never gave a verdict, tokens, cost) and the judge's own: pairs
    judged and pairs whose verdict flipped with the order."""

    client: ClientStats
    pairs: int = 0
    flips: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**self.client.as_dict(), "pairs": self.pairs, "flips": self.flips}


class OpenAIJudge:
    """Pairwise LLM judge over any OpenAI-compatible endpoint (OpenAI, vLLM, llama.cpp, ...).

    Requests go through `fspo.llm.LLMClient`: retries of 429, 5xx, timeouts and connection errors
    (`max_retries`, exponential backoff honouring Retry-After), the SQLite request cache at
    `cache_path` (a re-run sends no request it already has an answer to), usage and cost (prices per
    million tokens). A reply without a verdict is re-asked up to `max_parse_retries` times, with the
    reply and a reminder to answer A or B; still none, that order counts as a tie. Both orders are
    asked through `fspo.llm.ask_both_orders`.
    """

    name = "openai"

    def __init__(
        self,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        cache_path: str | Path | None = None,
        *,
        max_retries: int = 5,
        max_parse_retries: int = 2,
        timeout: float = 60.0,
        temperature: float = 0.0,
        max_tokens: int = 8,
        price_prompt_per_mtok: float = 0.0,
        price_completion_per_mtok: float = 0.0,
        prompt: PairwisePrompt | None = None,
    ):
        self.model = model or os.environ.get("FSPO_JUDGE_MODEL")
        if not self.model:
            raise UserError("the openai judge needs a model name (--judge-model or FSPO_JUDGE_MODEL)")
        base_url = base_url or os.environ.get("FSPO_JUDGE_BASE_URL") or os.environ.get("OPENAI_BASE_URL")
        api_key = api_key or os.environ.get("FSPO_JUDGE_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not api_key:
            if not base_url:
                raise UserError("the openai judge needs an API key: set FSPO_JUDGE_API_KEY or OPENAI_API_KEY")
            api_key = "not-needed"  # local servers (vLLM, llama.cpp) accept any key
        self.base_url = base_url
        cfg = BackendConfig(
            model=self.model,
            base_url=base_url,
            api_key=api_key,
            temperature=temperature,
            max_tokens=max_tokens,
            timeout=timeout,
            max_retries=max_retries,
            max_reasks=max_parse_retries,
            max_concurrency=MAX_WORKERS,  # `prefer_many(workers=...)` sets how many are in flight
            price_prompt_per_mtok=price_prompt_per_mtok,
            price_completion_per_mtok=price_completion_per_mtok,
        )
        cache = RequestCache(cache_path) if cache_path is not None else None
        self.client = LLMClient(make_backend(cfg), cfg, cache)
        self.prompt = prompt or PairwisePrompt.load()
        self.usage = JudgeUsage(self.client.stats)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    async def _verdict(
        self, limit: asyncio.Semaphore, user: User, question: str, first: str, second: str
    ) -> float | None:
        """P(the answer shown first wins): 1.0 or 0.0 from the letter, None if no reply gave one."""
        messages = [
            {"role": "system", "content": self.prompt.system},
            {"role": "user", "content": self.prompt.render(user, question, first, second)},
        ]
        async with limit:
            try:
                letter = await self.client.ask("pairwise", messages, _parse_letter, _reask)
            except ParseFailure:
                return None
            except (BackendUnavailable, UserError) as err:
                raise UserError(
                    f"judge endpoint {self.base_url or 'api.openai.com'} (model {self.model}): {err}"
                ) from err
        return LETTER_SCORES[letter]

    async def _prefer(self, limit: asyncio.Semaphore, user: User, question: str, a: str, b: str) -> float:
        pair = await ask_both_orders(
            lambda first, second, _order: self._verdict(limit, user, question, first, second), a, b
        )
        self.usage.pairs += 1
        self.usage.flips += int(pair.flipped)
        return pair.score

    def prefer(self, user: User, question: str, a: str, b: str) -> float:
        return self.prefer_many([(user, question, a, b)], workers=1)[0]

    def notes(self) -> list[str]:
        """What a caller should tell the user about this judge's run: that the endpoint was never
        contacted, when no pair needed it (identical answers, verdicts from the cache), since a
        mistyped or unreachable --base-url then goes unnoticed until a run that does need it."""
        stats = self.usage.client
        if self.usage.pairs == 0 or stats.sent > 0:
            return []
        return [
            f"the judge endpoint {self.base_url or 'api.openai.com'} (model {self.model}) was not contacted: "
            f"all {self.usage.pairs} pairs were settled without it ({stats.cache_hits} verdicts from the "
            "cache, the rest identical answers), so whether it is reachable was not checked"
        ]

    def prefer_many(self, items: Sequence[tuple[User, str, str, str]], workers: int = 4) -> list[float]:
        """Judge every item, with at most `workers` (up to `MAX_WORKERS`) requests in flight."""

        async def judge_all() -> list[float]:
            limit = asyncio.Semaphore(workers)
            tasks = [asyncio.ensure_future(self._prefer(limit, *item)) for item in items]
            try:
                return list(await asyncio.gather(*tasks))
            finally:  # a failed item stops the others: none keeps running into the next call
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

        return self._run(judge_all())

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the judge's own event loop, in a thread of its own, and wait for it.

        One loop for the judge's life, since its HTTP connection pool lives on it; in its own thread,
        so that a caller that already runs a loop (a notebook, a server) can call the judge too.
        """
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="openai-judge", daemon=True)
            self._thread.start()
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:  # Ctrl-C while waiting: stop the requests too
            future.cancel()
            raise

    def close(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._run(self.client.aclose())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()
            self._loop = self._thread = None
        if self.client.cache is not None:
            self.client.cache.close()


# ------------------------------------------------------------------------------------------- local
class LocalJudge:
    """A local causal LM as judge: P(A) vs P(B) as the next token after the judge prompt.

    Both orders are scored through `fspo.llm.both_orders` and averaged (P(a wins) =
    (P_A(a first) + P_B(a second)) / 2), which cancels the model's position bias in expectation. Uses
    the tokenizer's chat template when it has one; otherwise the raw prompt followed by "Answer:".
    Several spellings of each letter ("A", " A") are summed, since which one a tokenizer uses after
    the prompt varies.
    """

    name = "local"

    def __init__(self, model: Any, tokenizer: Any, prompt: PairwisePrompt | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prompt = prompt or PairwisePrompt.load()
        self._ids = {letter: self._letter_ids(letter) for letter in "AB"}

    @classmethod
    def from_pretrained(cls, path: str | Path) -> LocalJudge:
        from fspo.models.loading import load_model, load_tokenizer

        return cls(load_model(path), load_tokenizer(path))

    def _letter_ids(self, letter: str) -> list[int]:
        ids = set()
        for text in (letter, " " + letter):
            toks = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if toks:
                ids.add(toks[0])
        return sorted(ids)

    def _text(self, body: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.prompt.system}, {"role": "user", "content": body}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return f"{self.prompt.system}\n\n{body}\nAnswer:"

    def prob_first(self, text: str) -> float:
        import torch

        ids = self.tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, -1].float()
        probs = torch.softmax(logits, dim=-1)
        pa = float(probs[self._ids["A"]].sum())
        pb = float(probs[self._ids["B"]].sum())
        return 0.5 if pa + pb == 0 else pa / (pa + pb)

    def prefer(self, user: User, question: str, a: str, b: str) -> float:
        def ask(first: str, second: str, _order: str) -> float:
            return self.prob_first(self._text(self.prompt.render(user, question, first, second)))

        return both_orders(ask, a, b).score


# ----------------------------------------------------------------------------------------- factory
JUDGES = ("exact", "openai", "local")


def make_judge(name: str, **options: Any) -> Judge:
    """Build a judge by name: 'exact', 'openai' (options: model, base_url, api_key, cache_path, ...)
    or 'local' (option: model_path). Unknown names are a `UserError` listing the known ones."""
    if name == "exact":
        return ExactRewardJudge(**options)
    if name == "openai":
        return OpenAIJudge(**options)
    if name == "local":
        path = options.pop("model_path", None)
        if not path:
            raise UserError("the local judge needs a model folder (--judge-model)")
        return LocalJudge.from_pretrained(path)
    raise UserError(f"unknown judge {name!r}; known judges: {', '.join(JUDGES)}")
