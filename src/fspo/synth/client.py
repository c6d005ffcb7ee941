"""`LLMClient`: what every stage calls. Cache, concurrency, rate limit, retries, parsing, accounting.

One request goes: cache lookup (a hit costs nothing and is not sent) -> wait for the rate limiter and
for one of `max_concurrency` slots -> backend -> on `TransientError`, back off (Retry-After if the
server gave one, else `backoff_base * 2**attempt`, jittered, capped) and retry, up to `max_retries`
-> store the response in the cache -> parse; a reply that does not parse is re-asked with the error
appended to the conversation, up to `max_reasks` times. Every event is counted in `ClientStats`.

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

from pydantic import BaseModel

from fspo.synth.backends import Backend, Completion, Messages, TransientError
from fspo.synth.cache import RequestCache, request_key
from fspo.synth.config import BackendConfig
from fspo.synth.parsing import ParseError, parse_reply
from fspo.synth.prompts import PromptTemplate

M = TypeVar("M", bound=BaseModel)


class BackendUnavailable(RuntimeError):
    """A request still failed after every retry: the run stops (and resumes when run again)."""


class ParseFailure(RuntimeError):
    """The model never produced a usable reply; the item is recorded as failed and counted."""


@dataclass
class ClientStats:
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
        prompts: dict[str, PromptTemplate] | None = None,
        rng: random.Random | None = None,
    ):
        self.backend = backend
        self.cfg = cfg
        self.cache = cache
        self.prompts = prompts or {}
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
        """The response to `messages`, from the cache if this exact request was answered before."""
        key = request_key(stage, messages, self.backend.model, self.params, sample)
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.stats.cache_hits += 1
                return hit
        comp = await self._send(messages)
        cost = (
            comp.prompt_tokens * self.cfg.price_prompt_per_1k
            + comp.completion_tokens * self.cfg.price_completion_per_1k
        ) / 1000
        self.stats.succeeded += 1
        self.stats.prompt_tokens += comp.prompt_tokens
        self.stats.completion_tokens += comp.completion_tokens
        self.stats.cost += cost
        if self.cache is not None:
            self.cache.put(key, stage, comp, cost)
        return comp

    # -- structured ------------------------------------------------------------------------------
    async def ask(
        self,
        prompt: str,
        schema: type[M],
        *,
        sample: str = "",
        check: Callable[[M], str | None] | None = None,
        **variables: Any,
    ) -> M:
        """Render template `prompt`, ask, parse into `schema`; re-ask on a bad reply.

        `check` may reject a reply that parses but is unusable (e.g. too few viewpoints) by returning
        the reason, which is sent back to the model like a parse error. Raises `ParseFailure`.
        """
        messages = self.prompts[prompt].render(**variables)
        error = ""
        for reask in range(self.cfg.max_reasks + 1):
            if reask:
                self.stats.reasks += 1
            comp = await self.complete(prompt, messages, sample)
            try:
                reply = parse_reply(comp.text, schema)
                problem = check(reply) if check else None
                if problem is None:
                    return reply
                error = problem
            except ParseError as err:
                error = str(err)
            messages = [
                *messages,
                {"role": "assistant", "content": comp.text},
                *self.prompts["reask"].render(error=error),
            ]
        self.stats.parse_failures += 1
        raise ParseFailure(f"{prompt}: no usable reply after {self.cfg.max_reasks} re-asks: {error}")

    async def aclose(self) -> None:
        await self.backend.aclose()
