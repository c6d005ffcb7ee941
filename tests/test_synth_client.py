"""LLMClient over real HTTP against the stub server: retries, backoff, re-asks, cache, concurrency."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from fspo.core.errors import UserError
from fspo.synth.backends.openai_http import OpenAIBackend
from fspo.synth.cache import RequestCache
from fspo.synth.client import BackendUnavailable, LLMClient, ParseFailure
from fspo.synth.config import BackendConfig
from fspo.synth.parsing import JudgeReply
from fspo.synth.prompts import load_prompts
from openai_stub import Reply, serve_openai, user_text

JUDGE = {"persona": "p", "question": "q", "answer_a": "a", "answer_b": "b"}


def _client(base_url: str, cache: RequestCache | None = None, **kw: Any) -> LLMClient:
    opts = {"model": "stub", "base_url": base_url, "backoff_base": 0.01, "timeout": 5.0, **kw}
    cfg = BackendConfig(**opts)
    return LLMClient(OpenAIBackend(cfg), cfg, cache, load_prompts())


def _run(client: LLMClient, make: Any) -> Any:
    """Run `make()` (a coroutine factory, so gather() is called inside the loop), then close."""

    async def main() -> Any:
        try:
            return await make()
        finally:
            await client.aclose()

    return asyncio.run(main())


def _scripted(*replies: Any):
    """A responder that plays `replies` in order, then answers well forever."""
    queue = list(replies)

    def responder(request: dict) -> Any:
        return queue.pop(0) if queue else '{"preferred": "B"}'

    return responder


def test_retries_429_500_and_timeouts_are_counted() -> None:
    replies = [Reply(status=429, headers={"retry-after": "0.05"}), Reply(status=500), Reply(status=503),
               Reply('{"preferred": "A"}', delay=1.0)]  # fmt: skip
    with serve_openai(_scripted(*replies)) as server:
        client = _client(server.base_url, timeout=0.3, price_prompt_per_1k=2.0, price_completion_per_1k=4.0)
        start = time.monotonic()
        reply = _run(client, lambda: client.ask("judge", JudgeReply, **JUDGE))
    assert reply.preferred == "B"  # the slow "A" timed out; the retry got the normal answer
    s = client.stats
    assert dict(s.retries) == {"rate_limit": 1, "server": 2, "timeout": 1}
    assert s.sent == 5 and s.succeeded == 1 and len(server.requests) == 5
    assert time.monotonic() - start >= 0.05 + 0.3  # honoured Retry-After, waited for the timeout
    # usage from the response's `usage` field (the stub counts words), priced per 1k tokens
    assert s.prompt_tokens > 0 and s.completion_tokens == 2
    assert s.cost == pytest.approx((s.prompt_tokens * 2.0 + 2 * 4.0) / 1000)


def test_gives_up_after_max_retries() -> None:
    with serve_openai(lambda r: Reply(status=502)) as server:
        client = _client(server.base_url, max_retries=2)
        with pytest.raises(BackendUnavailable, match="after 2 retries"):
            _run(client, lambda: client.ask("judge", JudgeReply, **JUDGE))
    assert len(server.requests) == 3 and client.stats.retries["server"] == 2


def test_client_errors_are_user_errors_not_retried() -> None:
    with serve_openai(lambda r: Reply(status=401)) as server:
        client = _client(server.base_url)
        with pytest.raises(UserError, match="HTTP 401.*backend.model"):
            _run(client, lambda: client.complete("x", [{"role": "user", "content": "hi"}]))
    assert len(server.requests) == 1


def test_malformed_reply_is_reasked_with_the_error() -> None:
    with serve_openai(_scripted("I like A better", '{"preferred": "Z"}')) as server:
        client = _client(server.base_url)
        reply = _run(client, lambda: client.ask("judge", JudgeReply, **JUDGE))
    assert reply.preferred == "B" and client.stats.reasks == 2 and client.stats.parse_failures == 0
    last = server.requests[-1]["messages"]
    assert last[-2] == {"role": "assistant", "content": '{"preferred": "Z"}'}
    assert (
        "'preferred'" in last[-1]["content"]
        and "no JSON object" in server.requests[1]["messages"][-1]["content"]
    )


def test_parse_failure_after_max_reasks_is_counted() -> None:
    with serve_openai(lambda r: "no json here") as server:
        client = _client(server.base_url, max_reasks=1)
        with pytest.raises(ParseFailure, match="judge: no usable reply"):
            _run(client, lambda: client.ask("judge", JudgeReply, **JUDGE))
    assert len(server.requests) == 2 and client.stats.parse_failures == 1


def test_cache_answers_repeated_requests_without_the_network(tmp_path: Path) -> None:
    with serve_openai(lambda r: '{"preferred": "A"}') as server:
        for _ in range(2):
            client = _client(server.base_url, cache=RequestCache(tmp_path / "c.sqlite"))

            async def both(c: LLMClient = client) -> None:
                await c.ask("judge", JudgeReply, **JUDGE)
                await c.ask("judge", JudgeReply, sample="other", **JUDGE)

            _run(client, both)
    assert len(server.requests) == 2  # the second client got both from the cache
    assert client.stats.cache_hits == 2 and client.stats.sent == 0


def test_keeps_exactly_max_concurrency_requests_in_flight() -> None:
    with serve_openai(lambda r: Reply(user_text(r), delay=0.05)) as server:
        client = _client(server.base_url, max_concurrency=6)
        msgs = [[{"role": "user", "content": f"m{i}"}] for i in range(30)]
        out = _run(client, lambda: asyncio.gather(*(client.complete("x", m) for m in msgs)))
    assert [c.text for c in out] == [f"m{i}" for i in range(30)]
    assert server.max_in_flight == 6 and client.stats.max_in_flight == 6


def test_rate_limit_spaces_requests() -> None:
    with serve_openai(lambda r: "ok") as server:
        client = _client(server.base_url, requests_per_minute=600)  # one every 0.1 s
        start = time.monotonic()
        _run(
            client,
            lambda: asyncio.gather(
                *(client.complete("x", [{"role": "user", "content": str(i)}]) for i in range(5))
            ),
        )
    assert time.monotonic() - start >= 0.4


def test_a_429_pauses_every_request() -> None:
    seen: Counter[str] = Counter()

    def responder(request: dict) -> Any:
        text = user_text(request)
        seen[text] += 1
        if text == "m0" and seen[text] == 1:
            return Reply(status=429, headers={"retry-after": "0.3"})
        return Reply(text, delay=0.01)

    with serve_openai(responder) as server:
        client = _client(server.base_url, max_concurrency=1)
        start = time.monotonic()
        _run(
            client,
            lambda: asyncio.gather(
                *(client.complete("x", [{"role": "user", "content": f"m{i}"}]) for i in range(4))
            ),
        )
    assert time.monotonic() - start >= 0.3 and client.stats.retries["rate_limit"] == 1
