"""`LLMClient`: every LLM request of fspo goes through it. Cache, concurrency, rate limit, retries,
re-asks, usage and cost.

One request goes: cache lookup (a hit costs nothing and is not sent) -> wait for the rate limiter and
for one of `max_concurrency` slots -> backend -> on `TransientError`, back off (Retry-After if the
server gave one, else `backoff_base * 2**attempt`, jittered, capped) and retry, up to `max_retries`
-> store the response in the cache. `ask` adds parsing: a reply its parser rejects is re-asked with
the reply and the parser's error appended to the conversation, up to `max_reasks` times (a re-ask
is a new conversation, so the cache never hands back the rejected reply). Every event is counted in
`ClientStats`.

A 429 pauses *every* request until its Retry-After/backoff has passed, not only the one that got it:
a server that says "too many" wants fewer requests from the whole run.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

from fspo.llm.backends import Backend, Completion, Messages, TransientError
from fspo.llm.cache import RequestCache, request_key
from fspo.llm.config import BackendConfig
from fspo.llm.parsing import ParseError

T = TypeVar("T")


class BackendUnavailable(RuntimeError):
    """A request still failed after every retry: the run stops (and resumes when run again)."""


class ParseFailure(RuntimeError):
    """The model never produced a usable reply; the caller records the item as failed."""


@dataclass
class ClientStats:
    """What a client did: requests sent and answered, cache hits, retries by cause, re-asks,
    replies that never parsed, tokens and cost (responses from the cache cost nothing)."""

    sent: int = 0
    cache_hits: int = 0
    succeeded: int = 0
    retries: Counter[str] = field(default_factory=Counter)
    reasks: int = 0
    parse_failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float = 0.0
    in_flight: int = 0
    max_in_flight: int = 0

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["retries"] = dict(self.retries)
        d["cost"] = round(self.cost, 6)
        d.pop("in_flight")
        return d


class LLMClient:
    def __init__(
        self,
        backend: Backend,
        cfg: BackendConfig,
        cache: RequestCache | None = None,
        rng: random.Random | None = None,
    ):
        self.backend = backend
        self.cfg = cfg
        self.cache = cache
        self.stats = ClientStats()
        self.params = cfg.generation_params()
        self._slots = asyncio.Semaphore(cfg.max_concurrency)
        self._interval = 60.0 / cfg.requests_per_minute if cfg.requests_per_minute else 0.0
        self._next_start = 0.0
        self._paused_until = 0.0
        self._rng = rng or random.Random(0)

    # -- one request -----------------------------------------------------------------------------
    async def _wait_turn(self) -> None:
        while True:
            now = time.monotonic()
            if self._paused_until > now:
                await asyncio.sleep(self._paused_until - now)
                continue
            if self._interval:
                start = max(now, self._next_start)
                self._next_start = start + self._interval
                if start > now:
                    await asyncio.sleep(start - now)
            return

    def _backoff(self, attempt: int, err: TransientError) -> float:
        if err.retry_after is not None:
            return min(err.retry_after, self.cfg.backoff_max)
        base = min(self.cfg.backoff_max, self.cfg.backoff_base * 2**attempt)
        return base * (0.5 + 0.5 * self._rng.random())

    async def _send(self, messages: Messages) -> Completion:
        for attempt in range(self.cfg.max_retries + 1):
            await self._wait_turn()
            async with self._slots:
                self.stats.in_flight += 1
                self.stats.max_in_flight = max(self.stats.max_in_flight, self.stats.in_flight)
                self.stats.sent += 1
                try:
                    return await self.backend.complete(messages, self.params)
                except TransientError as err:
                    error = err
                finally:
                    self.stats.in_flight -= 1
            if attempt == self.cfg.max_retries:
                break
            self.stats.retries[error.kind] += 1
            delay = self._backoff(attempt, error)
            if error.kind == "rate_limit":
                self._paused_until = max(self._paused_until, time.monotonic() + delay)
            await asyncio.sleep(delay)
        raise BackendUnavailable(
            f"the backend kept failing ({error}) after {self.cfg.max_retries} retries; "
            "run the same command again to resume"
        )

    async def complete(self, stage: str, messages: Messages, sample: str = "") -> Completion:
        """The response to `messages`, from the cache if this exact request was answered before.

        `stage` names the kind of request (usage is summed per stage); `sample` tells apart repeats
        of the same messages that must get their own answers (e.g. one per user).
        """
        key = request_key(stage, messages, self.backend.model, self.params, sample)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                return hit
        comp = await self._send(messages)
        cost = self.cfg.cost(comp.prompt_tokens, comp.completion_tokens)
        self.stats.succeeded += 1
        self.stats.prompt_tokens += comp.prompt_tokens
        self.stats.completion_tokens += comp.completion_tokens
        self.stats.cost += cost
        if self.cache is not None:
            self.cache.put(key, stage, comp, cost)
        return comp

    # -- parsed ----------------------------------------------------------------------------------
    async def ask(
        self,
        stage: str,
        messages: Messages,
        parse: Callable[[str], T],
        reask: Callable[[str], Messages],
        sample: str = "",
    ) -> T:
        """Ask, and `parse` the reply; re-ask while `parse` raises `ParseError`.

        A re-ask sends the conversation so far, the rejected reply and `reask(error)` (the messages
        that tell the model what was wrong). Raises `ParseFailure` after `max_reasks` re-asks.
        """
        error = ""
        for attempt in range(self.cfg.max_reasks + 1):
            if attempt:
                self.stats.reasks += 1
            comp = await self.complete(stage, messages, sample)
            try:
                return parse(comp.text)
            except ParseError as err:
                error = str(err)
            messages = [*messages, {"role": "assistant", "content": comp.text}, *reask(error)]
        self.stats.parse_failures += 1
        raise ParseFailure(f"{stage}: no usable reply after {self.cfg.max_reasks} re-asks: {error}")

    async def aclose(self) -> None:
        await self.backend.aclose()
