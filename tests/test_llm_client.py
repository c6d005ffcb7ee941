"""fspo.llm: LLMClient over real HTTP against the stub server (retries, backoff, re-asks, cache,
concurrency), the request cache, reply parsing, and pairwise questions asked in both orders."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from fspo.core.errors import UserError
from fspo.llm import (
    BackendConfig,
    BackendUnavailable,
    BothOrders,
    Completion,
    LLMClient,
    ParseError,
    ParseFailure,
    RequestCache,
    ask_both_orders,
    both_orders,
    parse_reply,
    request_key,
)
from fspo.llm.backends.openai_http import OpenAIBackend
from fspo.testing import Reply, serve_openai, user_text

QUESTION = [{"role": "system", "content": "Reply in JSON."}, {"role": "user", "content": "A or B?"}]


class Verdict(BaseModel):
    preferred: Literal["A", "B"]


def parse(text: str) -> Verdict:
    return parse_reply(text, Verdict)


def reask(error: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": f"Your reply was unusable: {error}. Reply again."}]


def _client(base_url: str, cache: RequestCache | None = None, **kw: Any) -> LLMClient:
    opts = {"model": "stub", "base_url": base_url, "backoff_base": 0.01, "timeout": 5.0, **kw}
    cfg = BackendConfig(**opts)
    return LLMClient(OpenAIBackend(cfg), cfg, cache)


def _ask(client: LLMClient, sample: str = "") -> Any:
    return client.ask("judge", QUESTION, parse, reask, sample=sample)


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
               Reply('{"preferred": "A"}', delay=5.0)]  # fmt: skip
    with serve_openai(_scripted(*replies)) as server:
        prices = {"price_prompt_per_mtok": 2.0, "price_completion_per_mtok": 4.0}
        # the timeout leaves a loaded CI machine ample time for the normal replies (0.3 s did not)
        client = _client(server.base_url, timeout=1.5, **prices)
        start = time.monotonic()
        reply = _run(client, lambda: _ask(client))
    assert reply.preferred == "B"  # the slow "A" timed out; the retry got the normal answer
    s = client.stats
    assert dict(s.retries) == {"rate_limit": 1, "server": 2, "timeout": 1}
    assert s.sent == 5 and s.succeeded == 1 and len(server.requests) == 5
    assert time.monotonic() - start >= 0.05 + 1.5  # honoured Retry-After, waited for the timeout
    # usage from the response's `usage` field (the stub counts words), priced per million tokens
    assert s.prompt_tokens > 0 and s.completion_tokens == 2
    assert s.cost == pytest.approx((s.prompt_tokens * 2.0 + 2 * 4.0) / 1e6)


def test_gives_up_after_max_retries() -> None:
    with serve_openai(lambda r: Reply(status=502)) as server:
        client = _client(server.base_url, max_retries=2)
        with pytest.raises(BackendUnavailable, match="after 2 retries"):
            _run(client, lambda: _ask(client))
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
        reply = _run(client, lambda: _ask(client))
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
            _run(client, lambda: _ask(client))
    assert len(server.requests) == 2 and client.stats.parse_failures == 1


def test_cache_answers_repeated_requests_without_the_network(tmp_path: Path) -> None:
    with serve_openai(lambda r: '{"preferred": "A"}') as server:
        for _ in range(2):
            client = _client(server.base_url, cache=RequestCache(tmp_path / "c.sqlite"))

            async def both(c: LLMClient = client) -> None:
                await _ask(c)
                await _ask(c, sample="other")

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


def test_a_429_with_retry_after_ms_waits_that_long() -> None:
    replies = [Reply(status=429, headers={"retry-after-ms": "200"})]
    with serve_openai(_scripted(*replies)) as server:
        client = _client(server.base_url, backoff_base=10.0)
        start = time.monotonic()
        _run(client, lambda: _ask(client))
    assert 0.2 <= time.monotonic() - start < 5.0 and client.stats.retries["rate_limit"] == 1


def test_a_file_that_is_not_a_cache_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "verdicts.jsonl"
    path.write_text('{"key": "k", "verdict": "A"}\n' * 100)
    with pytest.raises(UserError, match="verdicts.jsonl: not a request cache"):
        RequestCache(path)


def test_parse_reply_finds_json_in_chatter() -> None:
    assert parse_reply('Sure!\n```json\n{"preferred": "B"}\n```', Verdict).preferred == "B"
    assert parse_reply('{"x": 1} then {"preferred": "A"}', Verdict).preferred == "A"
    with pytest.raises(ParseError, match="no JSON object"):
        parse_reply("I prefer A", Verdict)
    with pytest.raises(ParseError, match="'preferred'"):
        parse_reply('{"preferred": "C"}', Verdict)
    with pytest.raises(ParseError, match="invalid JSON"):
        parse_reply("{'preferred': 'A'}", Verdict)


def test_request_key_depends_on_everything_that_changes_the_answer() -> None:
    m = [{"role": "user", "content": "hi"}]
    p = {"temperature": 0.5, "max_tokens": 10, "seed": None}
    base = request_key("s", m, "model", p, "")
    assert base == request_key("s", [dict(x) for x in m], "model", dict(p), "")
    variants = [
        request_key("t", m, "model", p, ""),
        request_key("s", [{"role": "user", "content": "hi!"}], "model", p, ""),
        request_key("s", m, "other", p, ""),
        request_key("s", m, "model", {**p, "temperature": 0.6}, ""),
        request_key("s", m, "model", p, "user1"),
    ]
    assert len({base, *variants}) == 6


def test_request_cache_survives_reopen_and_sums_usage(tmp_path: Path) -> None:
    cache = RequestCache(tmp_path / "c.sqlite")
    cache.put("k1", "judge", Completion("a", 10, 2), 0.5)
    cache.put("k1", "judge", Completion("other", 1, 1), 9.0)  # first answer wins
    cache.put("k2", "answer", Completion("b", 5, 5), 0.25)
    cache.close()
    cache = RequestCache(tmp_path / "c.sqlite")
    assert cache.get("k1") == Completion("a", 10, 2) and cache.get("nope") is None and len(cache) == 2
    usage = cache.usage_by_stage()
    assert usage["judge"] == {"requests": 1, "prompt_tokens": 10, "completion_tokens": 2, "cost": 0.5}


@pytest.mark.parametrize(
    ("ab", "ba", "score", "winner", "flipped"),
    [
        (1.0, 0.0, 1.0, "a", False),  # a wins shown first and shown second
        (0.0, 1.0, 0.0, "b", False),
        (1.0, 1.0, 0.5, None, True),  # always the answer shown as A: position, not content
        (None, 0.0, 0.5, None, False),  # a missing verdict is a tie, not half a win
        (0.8, 0.4, 0.7, "a", False),  # probabilities are averaged over the orders
    ],
)
def test_both_orders_combines_the_verdicts(ab, ba, score, winner, flipped) -> None:
    pair = BothOrders(ab, ba)
    assert pair.score == pytest.approx(score) and pair.winner == winner and pair.flipped == flipped


def test_ask_both_orders_swaps_the_answers_and_skips_identical_ones() -> None:
    asked: list[tuple[str, str, str]] = []

    async def ask(first: str, second: str, order: str) -> float:
        asked.append((first, second, order))
        return 1.0 if len(first) > len(second) else 0.0  # the longer answer wins, in either position

    pair = asyncio.run(ask_both_orders(ask, "long answer", "short"))
    assert asked == [("long answer", "short", "ab"), ("short", "long answer", "ba")]
    assert pair.score == 1.0 and pair.letters() == ("A", "B")
    assert asyncio.run(ask_both_orders(ask, "same", " same ")).score == 0.5 and len(asked) == 2


def test_both_orders_asks_in_process_with_the_same_rule() -> None:
    asked: list[tuple[str, str, str]] = []

    def ask(first: str, second: str, order: str) -> float:
        asked.append((first, second, order))
        return 1.0 if len(first) > len(second) else 0.0

    assert both_orders(ask, "short", "long answer").score == 0.0
    assert asked == [("short", "long answer", "ab"), ("long answer", "short", "ba")]
    assert both_orders(ask, "same", " same ").score == 0.5 and len(asked) == 2
