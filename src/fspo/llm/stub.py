"""A scripted OpenAI-compatible server on 127.0.0.1 (FastAPI + uvicorn, in a thread): chat completions,
and text completions (streamed or not) as vLLM serves them.

For tests and benchmarks of everything built on `fspo.llm` (retries, re-asks, caching, concurrency,
throughput) without a real endpoint. Usage::

    def responder(request: dict) -> str | dict | Reply:
        return '{"preferred": "A"}'            # the assistant's text, wrapped in a full response

    with serve_openai(responder) as server:  # listens on 127.0.0.1, a free port
        client = openai.OpenAI(base_url=server.base_url, api_key="x")
        ...
    server.requests       # every request body received, in arrival order
    server.max_in_flight  # the most requests the server was handling at once

A responder returns the assistant text (str), a whole response body (dict), or a `Reply` to fail
(`Reply(status=429, headers={"retry-after": "0"})`), to be slow (`Reply("ok", delay=2.0)`), or both;
`Reply(usage=(prompt_tokens, completion_tokens))` fixes the reported usage (default: word counts),
`Reply(cached_tokens=n)` adds ``usage.prompt_tokens_details.cached_tokens`` (vLLM's prefix-cache hits).
A request's ``stop`` strings are honoured as vLLM does: the text ends before the first one found,
which is not sent, and the finish reason is "stop".
It is called in the server's event loop thread: keep it quick and make it thread-safe.

``POST /v1/completions`` (what `fspo.serve`'s remote backend sends: the prompt as a list of token ids)
asks the same responder (the request has ``prompt`` instead of ``messages``). With ``"stream": true``
the text goes out as server-sent events, one chunk per word (``Reply(chunk_delay=...)`` paces them),
then a chunk with ``Reply.finish_reason``, a usage chunk if ``stream_options.include_usage``, and
``data: [DONE]``. ``server.chunks_sent`` counts the text chunks each streamed request got, so a test
can see a client close the stream early.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from fspo.core.loopback import serve_in_thread


@dataclass
class Reply:
    content: str | None = None
    status: int = 200
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    body: dict[str, Any] | None = None
    usage: tuple[int, int] | None = None  # (prompt_tokens, completion_tokens); default: word counts
    finish_reason: str = "stop"  # of a text completion
    chunk_delay: float = 0.0  # seconds between the chunks of a streamed text completion
    cached_tokens: int | None = None  # reported as usage.prompt_tokens_details.cached_tokens


Responder = Callable[[dict[str, Any]], "str | dict[str, Any] | Reply"]


def user_text(request: dict[str, Any]) -> str:
    """The content of the last user message of a chat request (what most responders look at)."""
    return next(m["content"] for m in reversed(request["messages"]) if m["role"] == "user")


def usage_body(usage: tuple[int, int], cached_tokens: int | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "prompt_tokens": usage[0],
        "completion_tokens": usage[1],
        "total_tokens": sum(usage),
    }
    if cached_tokens is not None:
        body["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    return body


def apply_stop(content: str, stop: Any) -> tuple[str, bool]:
    """`content` cut before the earliest of the request's `stop` strings (a string or a list), and
    whether it was cut."""
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    found = [i for i in (content.find(s) for s in stops if s) if i >= 0]
    return (content[: min(found)], True) if found else (content, False)


def chat_body(content: str, model: str, usage: tuple[int, int]) -> dict[str, Any]:
    return {
        "id": "chatcmpl-stub",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}
        ],
        "usage": usage_body(usage),
    }


def completion_body(
    content: str, model: str, usage: tuple[int, int], finish_reason: str, cached_tokens: int | None = None
) -> dict[str, Any]:
    return {
        "id": "cmpl-stub",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": content, "finish_reason": finish_reason, "logprobs": None}],
        "usage": usage_body(usage, cached_tokens),
    }


def _prompt_size(prompt: Any) -> int:
    """Prompt tokens of a completions request: ids are counted, text is counted in words."""
    if isinstance(prompt, list):
        return len(prompt)
    return len(str(prompt).split())


class StubServer:
    def __init__(self, responder: Responder):
        self.responder = responder
        self.requests: list[dict[str, Any]] = []
        self.chunks_sent: list[int] = []  # per streamed completions request, in arrival order
        self.in_flight = 0
        self.max_in_flight = 0
        self.base_url = ""
        self.app = FastAPI()
        self.app.post("/v1/chat/completions")(self._chat)
        self.app.post("/chat/completions")(self._chat)
        self.app.post("/v1/completions")(self._completions)
        self.app.post("/completions")(self._completions)

    async def _reply(self, body: dict[str, Any]) -> Reply | JSONResponse:
        """The responder's scripted reply to `body`, after its delay; a whole response when the script
        gives an error status or a raw body."""
        reply = self.responder(body)
        if not isinstance(reply, Reply):
            reply = Reply(body=reply) if isinstance(reply, dict) else Reply(content=reply)
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.status != 200:
            err = {"error": {"message": f"stub error {reply.status}", "code": reply.status}}
            return JSONResponse(reply.body or err, status_code=reply.status, headers=reply.headers)
        if reply.body is not None:
            return JSONResponse(reply.body, headers=reply.headers)
        return reply

    async def _chat(self, request: Request) -> JSONResponse:
        body = await request.json()
        self.requests.append(body)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            reply = await self._reply(body)
            if isinstance(reply, JSONResponse):
                return reply
            content, _ = apply_stop(reply.content or "", body.get("stop"))
            words_in = sum(len(str(m.get("content", "")).split()) for m in body["messages"])
            usage = reply.usage or (words_in, len(content.split()))
            return JSONResponse(chat_body(content, body.get("model", "stub"), usage), headers=reply.headers)
        finally:
            self.in_flight -= 1

    async def _completions(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        reply = await self._reply(body)
        if isinstance(reply, JSONResponse):
            return reply
        content, stopped = apply_stop(reply.content or "", body.get("stop"))
        finish_reason = "stop" if stopped else reply.finish_reason
        usage = reply.usage or (_prompt_size(body.get("prompt")), len(content.split()))
        model = body.get("model", "stub")
        if not body.get("stream"):
            return JSONResponse(
                completion_body(content, model, usage, finish_reason, reply.cached_tokens),
                headers=reply.headers,
            )
        slot = len(self.chunks_sent)
        self.chunks_sent.append(0)
        with_usage = bool((body.get("stream_options") or {}).get("include_usage"))

        async def events() -> Any:
            def event(text: str | None, finish: str | None, last_usage: bool = False) -> str:
                chunk = completion_body(text or "", model, usage, "stop", reply.cached_tokens)
                chunk["choices"][0]["finish_reason"] = finish
                if text is None:  # the usage chunk: no choices
                    chunk["choices"] = []
                if not last_usage:
                    chunk["usage"] = None
                return f"data: {json.dumps(chunk)}\n\n"

            for piece in re.findall(r"\s*\S+\s*|\s+", content):
                yield event(piece, None)
                self.chunks_sent[slot] += 1
                if reply.chunk_delay:
                    await asyncio.sleep(reply.chunk_delay)
            yield event("", finish_reason)
            if with_usage:
                yield event(None, None, last_usage=True)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=reply.headers)


@contextmanager
def serve_openai(responder: Responder) -> Iterator[StubServer]:
    """Start a stub server on 127.0.0.1 (free port) in a thread; stop it on exit."""
    stub = StubServer(responder)
    with serve_in_thread(stub.app) as url:
        stub.base_url = f"{url}/v1"
        yield stub
