"""Judges end to end: the OpenAI judge over real HTTP against a local stub server, the exact judge."""

from __future__ import annotations

import asyncio
import itertools
import json
import re
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from fspo.core.errors import UserError
from fspo.eval.judges import ExactRewardJudge, OpenAIJudge, make_judge, parse_verdict
from fspo.testing import Reply, StubServer, serve_openai, toy_reward_for, toy_users


@contextmanager
def openai_server(responder: Callable[[dict, int], str | int]) -> Iterator[StubServer]:
    """The stub server; `responder(body, n)` (n: the call's number, from 1) gives the reply's text
    or an HTTP status to fail with (with `retry-after-ms: 1`, so the client's backoff stays short)."""
    calls = itertools.count(1)

    def reply(body: dict) -> Reply:
        out = responder(body, next(calls))
        if isinstance(out, int):
            return Reply(status=out, headers={"retry-after-ms": "1"})
        return Reply(out, usage=(100, 1))

    with serve_openai(reply) as server:
        yield server


def _answers(body: dict) -> tuple[str, str]:
    text = next(m["content"] for m in body["messages"] if m["role"] == "user")  # the question, not a re-ask
    a = re.search(r"## Response A\n(.*?)\n\n## Response B", text, re.S).group(1)
    b = re.search(r"## Response B\n(.*?)\n\nWhich", text, re.S).group(1)
    return a, b


def longer_wins(body: dict, n: int) -> str:
    a, b = _answers(body)
    return "A" if len(a) >= len(b) else "B"


def judge_for(server, tmp_path, **kw) -> OpenAIJudge:
    return OpenAIJudge(
        model="stub-judge", base_url=server.base_url, api_key="k", cache_path=tmp_path / "cache.sqlite", **kw
    )


ITEMS = [("short", "a much longer answer"), ("a very long answer indeed", "tiny"), ("xx", "yyyy")]


def test_position_bias_always_a_is_all_ties(tmp_path):
    user = toy_users(1)[0]
    with openai_server(lambda body, n: "A") as server:
        judge = judge_for(server, tmp_path)
        scores = [judge.prefer(user, "q?", a, b) for a, b in ITEMS]
    assert scores == [0.5, 0.5, 0.5]
    assert len(server.requests) == 2 * len(ITEMS)  # both orders asked for every pair
    assert judge.usage.flips == len(ITEMS)


def test_judge_answers_when_the_caller_runs_an_event_loop(tmp_path):
    user = toy_users(1)[0]

    async def from_a_running_loop(judge: OpenAIJudge) -> float:  # a notebook or a server calls it so
        return judge.prefer(user, "q?", "a much longer answer", "short")

    with openai_server(longer_wins) as server:
        judge = judge_for(server, tmp_path)
        assert asyncio.run(from_a_running_loop(judge)) == 1.0
        assert judge.prefer(user, "q?", "short", "a much longer answer") == 0.0  # and without one
        judge.close()


def test_consistent_judge_decides_and_both_orders_agree(tmp_path):
    user = toy_users(1)[0]
    with openai_server(longer_wins) as server:
        judge = judge_for(server, tmp_path, price_prompt_per_mtok=1.0)
        scores = [judge.prefer(user, "q?", a, b) for a, b in ITEMS]
    assert scores == [0.0, 1.0, 0.0]
    usage = judge.usage.as_dict()
    assert usage["succeeded"] == 6 and usage["prompt_tokens"] == 600 and usage["pairs"] == 3
    assert usage["cost"] == pytest.approx(600 / 1e6)
    first = server.requests[0]["messages"]
    assert user.description in first[-1]["content"]  # the user's description is in the prompt


def test_identical_answers_tie_without_requests(tmp_path):
    with openai_server(longer_wins) as server:
        assert judge_for(server, tmp_path).prefer(toy_users(1)[0], "q?", "same", " same ") == 0.5
    assert len(server.requests) == 0


def test_malformed_answers_are_reasked(tmp_path):
    def flaky(body, n):
        return "I cannot decide." if n % 2 == 1 else longer_wins(body, n)

    with openai_server(flaky) as server:
        judge = judge_for(server, tmp_path)
        assert judge.prefer(toy_users(1)[0], "q?", "long answer here", "short") == 1.0
    assert len(server.requests) == 4 and judge.usage.client.reasks == 2
    reask = server.requests[1]["messages"]  # the unusable reply, then a reminder of the answer format
    assert reask[-2] == {"role": "assistant", "content": "I cannot decide."}
    assert "A or B" in reask[-1]["content"]


def test_always_malformed_is_a_tie_after_bounded_retries(tmp_path):
    with openai_server(lambda body, n: "maybe?") as server:
        judge = judge_for(server, tmp_path, max_parse_retries=1)
        assert judge.prefer(toy_users(1)[0], "q?", "one", "two") == 0.5
    assert len(server.requests) == 4  # 2 orders x (1 + 1 retry)
    assert judge.usage.client.parse_failures == 2


def test_retries_on_500_and_429(tmp_path):
    def unreliable(body, n):
        return {1: 500, 2: 429, 3: 503}.get(n) or longer_wins(body, n)

    with openai_server(unreliable) as server:
        judge = judge_for(server, tmp_path)
        assert judge.prefer(toy_users(1)[0], "q?", "long answer here", "short") == 1.0
    assert len(server.requests) == 5  # three failures retried by the client, then two good answers
    assert judge.usage.client.succeeded == 2 and sum(judge.usage.client.retries.values()) == 3


def test_gives_up_after_max_retries(tmp_path):
    with openai_server(lambda body, n: 500) as server:
        judge = judge_for(server, tmp_path, max_retries=1)
        with pytest.raises(UserError, match="judge endpoint .*stub-judge"):
            judge.prefer(toy_users(1)[0], "q?", "one", "two")
    # Each order is one request, sent once and retried once (max_retries=1), never more; the orders run
    # concurrently, so the second may or may not have used its retry when the first gave up.
    sends = Counter(json.dumps(body["messages"], sort_keys=True) for body in server.requests)
    assert max(sends.values()) == 2 and len(sends) <= 2


def test_cache_hits_on_rerun_make_no_requests(tmp_path):
    user = toy_users(1)[0]
    with openai_server(longer_wins) as server:
        first = [judge_for(server, tmp_path).prefer(user, "q?", a, b) for a, b in ITEMS]
        before = len(server.requests)
        judge = judge_for(server, tmp_path)  # a new judge re-reads the cache file
        second = [judge.prefer(user, "q?", a, b) for a, b in ITEMS]
    assert second == first
    assert len(server.requests) == before  # zero new requests
    assert judge.usage.client.cache_hits == 2 * len(ITEMS) and judge.usage.client.sent == 0


def test_prefer_many_in_threads(tmp_path):
    user = toy_users(1)[0]
    with openai_server(longer_wins) as server:
        judge = judge_for(server, tmp_path)
        scores = judge.prefer_many([(user, "q?", a, b) for a, b in ITEMS * 3], workers=4)
    assert scores == [0.0, 1.0, 0.0] * 3


def test_parse_verdict():
    assert parse_verdict("A") == "A"
    assert parse_verdict(" **B**") == "B"
    assert parse_verdict("Response A is better") == "A"
    assert parse_verdict("(b)") == "B"
    assert parse_verdict("Both are fine") is None
    assert parse_verdict("") is None


def test_exact_judge_with_fake_reward():
    user = toy_users(1)[0]  # favourite colour: red
    judge = ExactRewardJudge(reward_for=toy_reward_for)
    assert judge.prefer(user, "q", "red red", "red blue") == 1.0
    assert judge.prefer(user, "q", "blue", "red") == 0.0
    assert judge.prefer(user, "q", "blue", "green") == 0.5


def test_exact_judge_on_sim_users_agrees_with_their_labels():
    """The simulator labels preferences with the same reward the exact judge rebuilds from metadata."""
    sim = pytest.importorskip("fspo.sim")
    if not hasattr(sim, "reward_for"):
        pytest.skip("fspo.sim.reward_for is not there yet")
    from fspo.sim.simulate import simulate

    data = simulate("roleplay", n_users=2, prefs_per_user=4, seed=0)
    users = {u.user_id: u for u in data.users}
    judge = ExactRewardJudge()
    scores = [judge.prefer(users[p.user_id], p.question, p.chosen, p.rejected) for p in data.preferences]
    assert scores and min(scores) > 0.0 and sum(scores) / len(scores) > 0.9


def test_unknown_judge_is_a_clear_error():
    with pytest.raises(UserError, match="unknown judge 'gpt5'.*exact, openai, local"):
        make_judge("gpt5")


def test_openai_judge_needs_a_model(monkeypatch):
    monkeypatch.delenv("FSPO_JUDGE_MODEL", raising=False)
    with pytest.raises(UserError, match="model name"):
        OpenAIJudge(base_url="http://127.0.0.1:9/v1")


def test_local_judge_gives_order_averaged_probability():
    from fspo.eval.judges import LocalJudge
    from fspo.testing import tiny_lm

    model, tok = tiny_lm(["Response A is better. Response B is better. A B"] * 5)
    tok.chat_template = None  # exercise the raw-prompt path
    judge = LocalJudge(model, tok)
    user = toy_users(1)[0]
    p = judge.prefer(user, "q?", "red answer", "blue answer")
    q = judge.prefer(user, "q?", "blue answer", "red answer")
    assert 0.0 <= p <= 1.0 and p + q == pytest.approx(1.0)  # swapping a and b mirrors the probability

    async def from_a_running_loop() -> float:  # a notebook or a server calls it with a loop running
        return judge.prefer(user, "q?", "red answer", "blue answer")

    assert asyncio.run(from_a_running_loop()) == p
